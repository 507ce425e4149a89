"""Summaries of retrieved reports and answers to questions about them.

Grounded by default: the reports are parsed into attributes and every fact (sizes in one
unit, planes, types, closest / largest case) is computed deterministically. An LLM, when
configured, only phrases those facts, and its answer is checked against them: a wrong number
or report reference is corrected, not shown. Report text is data: nothing in a report can
change what is computed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from neurocbir.errors import InvalidInput
from neurocbir.reports.grounding import (
    PLANE_WORDS,
    TYPE_STEMS,
    attributed_sizes,
    compute_facts,
    grade_summary,
    in_order,
    report_refs,
    same_size,
    sizes_mm2,
)
from neurocbir.reports.text import TYPE_PHRASE, parse_report

PAPER_QUESTIONS = (
    "What is the average tumor size in the retrieved reports?",
    "Which retrieved reports show the tumor in the same anatomical plane as the query?",
    "Which retrieved report has the tumor size closest to the query's tumor?",
    "Which retrieved report shows the largest tumor?",
)


def _fmt(v: float) -> str:
    return f"{v:.2f} mm²"


def _refs(nums: list[int]) -> str:
    if not nums:
        return "none of the reports"
    words = [f"report {n}" for n in nums]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


#: what a summary or an answer says where none of the retrieved cases has a report
NO_REPORTS = (
    "None of the retrieved cases has a report, nor a recorded plane and size to write one from: "
    "there is nothing to summarise or to answer from."
)


def left_out(nums: list[int]) -> str:
    """What a summary or an answer says of the retrieved cases it could not read (their ranks)."""
    verb = "is" if len(nums) == 1 else "are"
    return f"{_refs(nums).capitalize()} {verb} left out: no report, nor a recorded plane and size to write one from."


def _all_reports(nums: list[int]) -> str:
    if in_order(nums):
        return f"All {len(nums)} retrieved reports"
    return f"The {len(nums)} retrieved reports ({_refs(nums)})"


def render_summary(f: dict) -> str:
    types = "; ".join(f"{TYPE_PHRASE[t]} in {_refs(n)}" for t, n in f["tumor_types"].items())
    planes = "; ".join(f"{p} in {_refs(n)}" for p, n in f["planes"].items())
    return (
        f"{_all_reports(f['report_numbers'])} are {' / '.join(f['modalities'])} scans "
        f"({' / '.join(f['techniques'])}). Tumor types: {types}. "
        f"Tumor size: smallest {_fmt(f['size_min_mm2'])} (report {f['size_min_report']}), largest "
        f"{_fmt(f['size_max_mm2'])} (report {f['size_max_report']}), average {_fmt(f['size_mean_mm2'])}. "
        f"Anatomical planes: {planes}."
    )


@dataclass
class Answer:
    answer: str
    reports: list[int] = field(default_factory=list)
    value_mm2: float | None = None
    intent: str = "unknown"
    corrected: bool = False

    def as_dict(self) -> dict:
        return {"answer": self.answer, "reports": self.reports, "value_mm2": self.value_mm2}


def answer_question(question: str, f: dict) -> Answer:
    """Deterministic answer from the facts: intent by keywords, values from the facts."""
    q = question.lower()
    has_query = "plane" in f.get("query", {})  # a query report (an estimate has only a size)
    has_size = "query" in f
    unknown = "This question compares with the query, but the query's {} is unknown: it has no report{}."
    if re.search(r"\b(average|mean)\b", q) and re.search(r"size|area|big|large", q):
        return Answer(
            f"The average tumor size of the {f['n_reports']} reports is {_fmt(f['size_mean_mm2'])}.",
            list(f["report_numbers"]),
            f["size_mean_mm2"],
            "mean_size",
        )
    if re.search(r"closest|nearest|most similar|similar size", q):
        if not has_size:
            return Answer(unknown.format("tumor size", " and no tumor was outlined on it"), intent="closest_size")
        n = f["closest_size_report"]
        a, b = _fmt(f["closest_size_mm2"]), _fmt(f["query"]["area_mm2"])
        return Answer(
            f"Report {n} ({a}) has the size closest to the query's estimated tumor size ({b}, "
            "estimated from the predicted tumor outline; the query has no report)."
            if f["query"].get("estimated")
            else f"Report {n} ({a}) has the size closest to the query's ({b}).",
            [n],
            f["closest_size_mm2"],
            "closest_size",
        )
    if re.search(r"largest|biggest|maximum|max\b|greatest", q):
        n = f["size_max_report"]
        return Answer(
            f"Report {n} shows the largest tumor, {_fmt(f['size_max_mm2'])}.", [n], f["size_max_mm2"], "max_size"
        )
    if re.search(r"smallest|minimum|min\b|tiniest", q):
        n = f["size_min_report"]
        return Answer(
            f"Report {n} shows the smallest tumor, {_fmt(f['size_min_mm2'])}.", [n], f["size_min_mm2"], "min_size"
        )
    if "same" in q and re.search(r"plane|view|orientation|section", q):
        if not has_query:
            return Answer(unknown.format("plane", ""), intent="same_plane")
        nums = f["same_plane_reports"]
        return Answer(
            f"{_refs(nums).capitalize()} {'is' if len(nums) == 1 else 'are'} in the query's "
            f"{f['query']['plane']} plane.",
            nums,
            None,
            "same_plane",
        )
    if "same" in q and re.search(r"type|diagnos|tumou?r|class|kind", q):
        if not has_query:
            return Answer(unknown.format("tumor type", ""), intent="same_type")
        nums = f["same_type_reports"]
        return Answer(
            f"{_refs(nums).capitalize()} show{'s' if len(nums) == 1 else ''} the query's tumor type "
            f"({TYPE_PHRASE[f['query']['tumor_type']]}).",
            nums,
            None,
            "same_type",
        )
    for word, plane in PLANE_WORDS.items():
        if word in q:
            nums = f["planes"].get(plane, [])
            return Answer(
                f"{_refs(nums).capitalize()} {'is' if len(nums) == 1 else 'are'} in the {plane} plane.",
                nums,
                None,
                "plane",
            )
    for ttype, stem in TYPE_STEMS.items():
        if re.search(stem, q):
            nums = f["tumor_types"].get(ttype, [])
            return Answer(
                f"{_refs(nums).capitalize()} show{'s' if len(nums) == 1 else ''} a {TYPE_PHRASE[ttype]}.",
                nums,
                None,
                "type",
            )
    if re.search(r"size|area|how big", q):
        return Answer(
            f"Sizes: {', '.join(f'report {n}: {_fmt(v)}' for n, v in f['sizes_mm2'].items())}.",
            list(f["report_numbers"]),
            None,
            "sizes",
        )
    return Answer(
        "I can answer questions about the retrieved reports' tumor sizes (average, largest, smallest, "
        "closest to the query), tumor types and anatomical planes.",
        [],
        None,
        "unknown",
    )


def check_against(text: str, expected: Answer, f: dict) -> list[str]:
    """Disagreements between an LLM's text and the grounded answer (empty list: consistent)."""
    problems = []
    allowed = [*f["sizes_mm2"].values(), f["size_mean_mm2"]] + ([f["query"]["area_mm2"]] if "query" in f else [])
    vals = sizes_mm2(text)
    for v in vals:
        if not any(same_size(v, a) for a in allowed):
            problems.append(f"size {v:g} mm² matches no report")
    if expected.value_mm2 is not None and not any(same_size(v, expected.value_mm2) for v in vals):
        problems.append(f"does not state the correct value {_fmt(expected.value_mm2)}")
    for subject, v in attributed_sizes(text):
        true = (f.get("query") or {}).get("area_mm2") if subject == "query" else f["sizes_mm2"].get(str(subject))
        if true is not None and not same_size(v, true):
            whose = "the query" if subject == "query" else f"report {subject}"
            problems.append(f"gives {v:g} mm² to {whose}, whose size is {_fmt(true)}")
    refs = report_refs(text)
    if refs - set(f["report_numbers"]):
        problems.append(f"names reports that do not exist: {sorted(refs - set(f['report_numbers']))}")
    if expected.intent not in ("mean_size", "unknown") and refs != set(expected.reports):
        named = f"names reports {sorted(refs)}" if refs else "names no report"
        problems.append(f"{named} instead of {expected.reports or 'none'}")
    return problems


def read_answer(text: str, intent: str = "unknown") -> Answer:
    """What a free-text answer claims: the reports it names and its first size (in mm²)."""
    vals = sizes_mm2(text)
    return Answer(text, sorted(report_refs(text)), vals[0] if vals else None, intent)


class Explainer:
    """Summaries and answers for a set of retrieved reports; grounded, optionally LLM-phrased."""

    def __init__(self, llm=None, mode: str = "grounded", verify: bool = True):
        """``verify=False`` returns the LLM's text unchecked (only to measure the LLM itself)."""
        if mode not in ("grounded", "paper"):
            raise InvalidInput("mode must be 'grounded' or 'paper'")
        self.llm, self.mode, self.verify = llm, mode, verify

    def summarize(
        self,
        reports: list[str],
        query_report: str | None = None,
        query_area_mm2: float | None = None,
        numbers: list[int] | None = None,
    ) -> dict:
        """``numbers``: each report's number (its rank among the retrieved cases; 1, 2, ... by default)."""
        attrs = [parse_report(r) for r in reports]
        f = compute_facts(attrs, parse_report(query_report) if query_report else None, query_area_mm2, numbers)
        grounded = render_summary(f)
        if self.llm is None:
            return {"summary": grounded, "facts": f, "source": "grounded"}
        from neurocbir.reports.llm import summary_messages

        text = self.llm.chat(summary_messages(reports, f, self.mode))
        if not self.verify:
            return {"summary": text, "facts": f, "source": f"llm ({self.mode}, unverified)"}
        problems = [p for p in check_against(text, Answer(grounded), f) if "matches no report" in p]
        graded = grade_summary(text, attrs)
        problems += [f"{k} missing or wrong" for k, v in graded["per_attribute"].items() if v < 1]
        if problems:  # a clinician gets the complete, computed summary instead
            return {
                "summary": grounded,
                "facts": f,
                "source": "grounded (LLM text corrected)",
                "llm_problems": problems,
            }
        return {"summary": text, "facts": f, "source": f"llm ({self.mode})"}

    def answer(
        self,
        question: str,
        reports: list[str],
        query_report: str | None = None,
        query_area_mm2: float | None = None,
        numbers: list[int] | None = None,
    ) -> tuple[Answer, dict]:
        """``query_area_mm2``: the query scan's tumor area estimated from its predicted outline,
        used for size comparisons when there is no query report; ``numbers`` as in :meth:`summarize`."""
        if not question or not question.strip():
            raise InvalidInput("empty question")
        attrs = [parse_report(r) for r in reports]
        f = compute_facts(attrs, parse_report(query_report) if query_report else None, query_area_mm2, numbers)
        grounded = answer_question(question, f)
        if self.llm is None:
            return grounded, f
        from neurocbir.reports.llm import answer_messages

        text = self.llm.chat(answer_messages(question, reports, query_report, f, grounded, self.mode))
        if not self.verify:
            return read_answer(text, grounded.intent), {**f, "llm_text": text}
        problems = check_against(text, grounded, f)
        if problems:
            grounded.corrected = True
            return grounded, {**f, "llm_text": text, "llm_problems": problems}
        return Answer(text, grounded.reports, grounded.value_mm2, grounded.intent), f
