"""The paper's Fig. 4 evaluation: summaries and Q&A over the reports of a query's top-5
retrievals, graded automatically against the attributes (never against an LLM)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .data import CaseTable
from .explain import PAPER_QUESTIONS, Answer, Explainer, answer_question, compute_facts
from .reports import STYLES, ReportAttributes, case_attributes, make_report

_TYPE_SYNONYMS = {"meningioma": r"mening", "glioma": r"glioma|glial", "pituitary": r"pituitar"}
_PLANE_SYNONYMS = {"axial": r"axial|transverse|horizontal", "coronal": r"coronal|frontal",
                   "sagittal": r"sagittal|longitudinal"}
_UNIT = r"(mm²|mm\^?2|square millimet|cm²|cm\^?2|square centimet)"
_NUM_UNIT = re.compile(r"(\d+(?:\.\d+)?)\s*" + _UNIT, re.I)
_RANGE_UNIT = re.compile(r"(\d+(?:\.\d+)?)\s*(?:to|-|–|and)\s*\d+(?:\.\d+)?\s*" + _UNIT, re.I)


def query_sets(table: CaseTable, n: int = 50, k: int = 5, run: Path | None = None, seed: int = 0) -> list[tuple[int, list[int]]]:
    """``n`` (query row, [k retrieved rows]) sets. From a trained run's index when given; else
    nearest cases by tumor size among other patients (any patient-wise neighbour sets will do)."""
    rng = np.random.default_rng(seed)
    if run is not None:
        from .index import VectorIndex

        trial = sorted(Path(run).glob("trial_*"))[0]
        emb = np.load(trial / "embeddings.npz")
        index = VectorIndex.build(emb["archive"])
        picks = rng.choice(len(emb["test_rows"]), n, replace=False)
        _, ids = index.search(emb["test"][picks], k)
        return [(int(emb["test_rows"][p]), [int(emb["archive_rows"][i]) for i in row]) for p, row in zip(picks, ids)]
    sets = []
    for q in rng.choice(len(table), n, replace=False):
        others = np.flatnonzero(table.patient_id != table.patient_id[q])
        sets.append((int(q), [int(i) for i in rng.choice(others, k, replace=False)]))
    return sets


def _mentions(pattern: str, text: str) -> bool:
    return re.search(pattern, text, re.I) is not None


def grade_summary(text: str, truth: list[ReportAttributes]) -> dict:
    """Accuracy and completeness on the 5 attributes (size: min 0.25, max 0.25, mean 0.5)."""
    f = compute_facts(truth)
    scale = lambda u: 100.0 if u.lower().startswith(("cm", "square c")) else 1.0  # noqa: E731
    stated = {float(v) * scale(u) for v, u in _NUM_UNIT.findall(text)}
    stated |= {float(v) * scale(u) for v, u in _RANGE_UNIT.findall(text)}  # "150 to 2400 mm²"

    def said(v: float) -> bool:
        return any(abs(s - v) <= max(0.6, 0.005 * v) for s in stated)

    types, planes = set(f["tumor_types"]), set(f["planes"])
    said_types = {t for t, p in _TYPE_SYNONYMS.items() if _mentions(p, text)}
    said_planes = {p for p, pat in _PLANE_SYNONYMS.items() if _mentions(pat, text)}
    size_score = 0.25 * said(f["size_min_mm2"]) + 0.25 * said(f["size_max_mm2"]) + 0.5 * said(f["size_mean_mm2"])
    correct = {
        "modality": float(_mentions(r"\bMRI\b|magnetic resonance", text)),
        "technique": float(_mentions(r"\bT1", text) and _mentions(r"contrast", text)),
        "tumor_type": float(said_types == types),
        "size": size_score,
        "plane": float(said_planes == planes),
    }
    covered = {
        "modality": correct["modality"], "technique": float(_mentions(r"\bT1|contrast", text)),
        "tumor_type": float(bool(said_types)), "size": float(bool(stated)), "plane": float(bool(said_planes)),
    }
    return {"accuracy": float(np.mean(list(correct.values()))), "completeness": float(np.mean(list(covered.values()))),
            "per_attribute": correct}


def grade_answer(given: Answer, truth: Answer) -> float:
    """1 if the answer names the right reports and states the right value (mean: value only)."""
    if truth.intent != "mean_size" and sorted(given.reports) != sorted(truth.reports):
        return 0.0
    if truth.value_mm2 is not None:
        if given.value_mm2 is None or abs(given.value_mm2 - truth.value_mm2) > max(0.6, 0.005 * truth.value_mm2):
            return 0.0
    return 1.0


def evaluate_reports(table: CaseTable, sets: list[tuple[int, list[int]]], explainer: Explainer,
                     styles=STYLES) -> dict:
    out = {}
    for style in styles:
        summ_acc, summ_comp, qa = [], [], []
        for q, rows in sets:
            truth = [case_attributes(table, r) for r in rows]
            qa_truth = case_attributes(table, q)
            texts = [make_report(a, style, int(table.idx[r])) for a, r in zip(truth, rows)]
            qtext = make_report(qa_truth, style, int(table.idx[q]))
            s = explainer.summarize(texts, qtext)
            g = grade_summary(s["summary"], truth)
            summ_acc.append(g["accuracy"])
            summ_comp.append(g["completeness"])
            f_true = compute_facts(truth, qa_truth)
            for question in PAPER_QUESTIONS:
                given, _ = explainer.answer(question, texts, qtext)
                qa.append(grade_answer(given, answer_question(question, f_true)))
        out[style] = {"summary_accuracy": float(np.mean(summ_acc)), "summary_completeness": float(np.mean(summ_comp)),
                      "qa_accuracy": float(np.mean(qa)), "n_sets": len(sets)}
    return out
