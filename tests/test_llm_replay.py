"""Replay of real exchanges with a local LLM (Qwen2.5-Coder-1.5B via llama.cpp's
OpenAI-compatible server), recorded by benchmarks/llm_reports.py. Each recorded reply goes
back through the real `openai` client and the verification: a reply that disagrees with the
facts is corrected, one that agrees is shown as written, and no prompt held a patient id."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from neurocbir.reports.evaluation import grade_answer
from neurocbir.reports.explain import Explainer, answer_question, check_against, compute_facts, read_answer
from neurocbir.reports.text import parse_report

from .test_llm import _Server

RECORDED = Path(__file__).parent / "data" / "llm_exchanges.json"


def _exchanges() -> list[dict]:
    return json.loads(RECORDED.read_text())["exchanges"]


def _paper_questions() -> list[dict]:
    """The recorded paper-mode exchanges that ask a question (not a summary)."""
    return [e for e in _exchanges() if e["mode"] == "paper" and "Question: " in e["messages"][-1]["content"]]


@pytest.fixture(scope="module")
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()


@pytest.mark.parametrize("i", range(len(_paper_questions())))
def test_replayed_paper_answers_are_verified(i, server, monkeypatch):
    from neurocbir.reports.llm import OpenAIChat

    ex = _paper_questions()[i]
    prompt = ex["messages"][-1]["content"]
    assert not re.search(r"\bMR\d{4,}", prompt)
    reports = re.findall(r'<report n="\d+">(.*?)</report>', prompt)
    question = re.search(r"Question: (.*)", prompt)
    assert question is not None and len(reports) == 5
    query = re.search(r'<report n="query">(.*?)</report>', prompt)
    query = query.group(1) if query else None
    facts = compute_facts([parse_report(r) for r in reports], parse_report(query) if query else None)
    truth = answer_question(question.group(1), facts)
    server.reply = ex["reply"]
    monkeypatch.setenv("NEUROCBIR_LLM_BASE_URL", server.url)
    monkeypatch.setenv("NEUROCBIR_LLM_MODEL", "replay")
    ans, _ = Explainer(OpenAIChat(), mode="paper").answer(question.group(1), reports, query)
    # judged independently of the verifier: is what the reply says (its reports, its number) right?
    wrong = grade_answer(read_answer(ex["reply"], truth.intent), truth) == 0
    assert ans.corrected == wrong, (ex["reply"], check_against(ex["reply"], truth, facts))
    assert ans.reports == truth.reports and ans.value_mm2 == truth.value_mm2
    shown = ans.answer if ans.corrected else ex["reply"]
    assert ans.answer == shown and grade_answer(read_answer(shown, truth.intent), truth) == 1
