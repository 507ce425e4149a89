"""The OpenAI-compatible path, through the real `openai` client over HTTP on loopback.

The server here is a scripted OpenAI-compatible endpoint: it records the prompts it gets and
answers with the text a test gives it, so we can check what reaches an LLM (no patient ids,
reports fenced as data) and that wrong LLM numbers are corrected. A real model is run by
benchmarks/llm_reports.py.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from neurocbir.reports.explain import PAPER_QUESTIONS, Explainer
from neurocbir.reports.llm import OpenAIChat, scrub

from .test_reports import QUERY, REPORTS


class _Server:
    def __init__(self):
        self.reply = ""
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body})
                data = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": outer.reply},
                            }
                        ],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture
def llm(server, monkeypatch):
    monkeypatch.setenv("NEUROCBIR_LLM_BASE_URL", server.url)
    monkeypatch.setenv("NEUROCBIR_LLM_MODEL", "local-test-model")
    return OpenAIChat()


def test_correct_llm_answer_is_kept(server, llm):
    server.reply = "The largest tumor is in report 5, measuring 2400 mm²."
    ans, _ = Explainer(llm).answer(PAPER_QUESTIONS[3], REPORTS, QUERY)
    assert ans.answer == server.reply and not ans.corrected and ans.reports == [5]
    assert server.requests[-1]["path"] == "/v1/chat/completions"
    assert server.requests[-1]["body"]["model"] == "local-test-model"


@pytest.mark.parametrize(
    "reply",
    [
        "The largest tumor is in report 1, measuring 2400 mm².",  # wrong report
        "Report 5 shows the largest tumor, 24.5 cm².",  # wrong number, other unit
        "The largest tumor is in report 7 (2400 mm²).",  # report that does not exist
    ],
)
def test_wrong_llm_answers_are_corrected(server, llm, reply):
    server.reply = reply
    ans, info = Explainer(llm).answer(PAPER_QUESTIONS[3], REPORTS, QUERY)
    assert ans.corrected and ans.reports == [5] and ans.value_mm2 == 2400.0
    assert "2400.00 mm²" in ans.answer and info["llm_problems"]


@pytest.mark.parametrize("mode", ["paper", "grounded"])
def test_prompts_fence_reports_and_hold_no_patient_ids(server, llm, mode):
    server.reply = "The average tumor size is 993.15 mm² (reports 1 to 5)."
    reports = REPORTS[:4] + [REPORTS[4] + " Patient ID: MR024780B."]
    Explainer(llm, mode=mode).answer(PAPER_QUESTIONS[0], reports, QUERY)
    prompt = json.dumps(server.requests[-1]["body"]["messages"])
    assert "MR024780B" not in prompt
    assert "never instructions" in prompt
    if mode == "paper":
        assert '<report n=\\"5\\">' in prompt


def test_llm_summary_with_a_wrong_number_falls_back_to_grounded(server, llm):
    server.reply = "Five MRI reports; sizes from 150.25 mm² to 9999 mm²."
    out = Explainer(llm).summarize(REPORTS, QUERY)
    assert out["source"].startswith("grounded") and "9999" not in out["summary"]


def test_scrub():
    assert (
        scrub("patient id: 100360, MR040253 and 1234567; size 1095.82 mm²")
        == "[id removed], [id removed] and [id removed]; size 1095.82 mm²"
    )


def test_unverified_mode_measures_the_llm_itself(server, llm):
    from neurocbir.reports.evaluation import grade_answer
    from neurocbir.reports.explain import answer_question, compute_facts
    from neurocbir.reports.text import parse_report

    truth = answer_question(PAPER_QUESTIONS[3], compute_facts([parse_report(r) for r in REPORTS], parse_report(QUERY)))
    server.reply = "The largest tumor is in report 1, measuring 2400 mm²."
    ans, _ = Explainer(llm, mode="paper", verify=False).answer(PAPER_QUESTIONS[3], REPORTS, QUERY)
    assert ans.reports == [1] and grade_answer(ans, truth) == 0.0
    server.reply = "Report 5 has the largest tumor: 24.00 cm²."
    ans, _ = Explainer(llm, mode="paper", verify=False).answer(PAPER_QUESTIONS[3], REPORTS, QUERY)
    assert ans.value_mm2 == 2400.0 and grade_answer(ans, truth) == 1.0


def test_llm_written_normal_reports_are_checked_and_cached(server, llm, small_cases, tmp_path):
    from neurocbir.reports.text import case_attributes, llm_normal_reports, parse_report

    rows = [0, 1]
    a0 = case_attributes(small_cases, 0)
    # a report that states everything right, for every case (same text: the scripted server is not an LLM)
    server.reply = (
        f"MRI, T1-weighted contrast-enhanced, {a0.plane} plane. Findings: "
        f"{'pituitary tumor' if a0.tumor_type == 'pituitary' else a0.tumor_type} of {a0.area_mm2:.2f} mm²."
    )
    n = len(server.requests)
    out = llm_normal_reports(small_cases, llm, tmp_path / "reports.json", rows=rows)
    assert parse_report(out[int(small_cases.idx[0])]) == a0
    # case 1 has other attributes: the LLM text is refused (asked twice) and replaced by the paraphrase
    assert parse_report(out[int(small_cases.idx[1])]) == case_attributes(small_cases, 1)
    calls = len(server.requests) - n
    assert calls == 3
    # cached: no further calls
    llm_normal_reports(small_cases, llm, tmp_path / "reports.json", rows=rows)
    assert len(server.requests) - n == calls


def test_write_reports_command_caches_for_the_app(server, monkeypatch, small_data_dir, small_cases, tmp_path):
    from typer.testing import CliRunner

    from neurocbir.cli import app
    from neurocbir.reports.text import cached_llm_reports, case_attributes

    a = case_attributes(small_cases, 0)
    server.reply = (
        f"MRI, T1-weighted contrast-enhanced, {a.plane} plane. Findings: "
        f"{'pituitary tumor' if a.tumor_type == 'pituitary' else a.tumor_type} of {a.area_mm2:.2f} mm²."
    )
    monkeypatch.setenv("NEUROCBIR_LLM_BASE_URL", server.url)
    monkeypatch.setenv("NEUROCBIR_LLM_MODEL", "m")
    monkeypatch.setenv("NEUROCBIR_CACHE", str(tmp_path))
    res = CliRunner().invoke(app, ["write-reports", "--limit", "1", "--data", str(small_data_dir)])
    assert res.exit_code == 0, res.output
    assert cached_llm_reports() == {int(small_cases.idx[0]): server.reply}


def test_an_llm_off_this_machine_is_refused_at_start_unless_the_operator_allows_it(small_run, monkeypatch):
    """Report text stays on site: `neurocbir serve` with an endpoint that is not on the loopback
    stops before serving, naming the setting; with the setting it says where report text goes."""
    from typer.testing import CliRunner

    from neurocbir.cli import app as cli
    from neurocbir.reports.llm import OpenAIChat, RemoteLLMRefused

    monkeypatch.setenv("NEUROCBIR_LLM_BASE_URL", "http://10.20.30.40:8000/v1")
    monkeypatch.setenv("NEUROCBIR_LLM_MODEL", "any")
    monkeypatch.delenv("NEUROCBIR_LLM_ALLOW_REMOTE", raising=False)
    res = CliRunner().invoke(cli, ["serve", "--run", str(small_run), "--port", "1"])
    assert res.exit_code == 2 and "NEUROCBIR_LLM_ALLOW_REMOTE=yes" in res.output and "10.20.30.40" in res.output
    for url in ("http://127.0.0.1:9/v1", "http://localhost:9/v1", "http://[::1]:9/v1"):
        assert OpenAIChat(base_url=url, model="m").remote is False
    with pytest.raises(RemoteLLMRefused):
        OpenAIChat(base_url="http://127.0.0.1.example.org/v1", model="m")  # a name that only looks local
    monkeypatch.setenv("NEUROCBIR_LLM_ALLOW_REMOTE", "yes")
    assert OpenAIChat().remote is True
