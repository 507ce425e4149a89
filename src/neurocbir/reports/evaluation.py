"""The paper's Fig. 4 evaluation: summaries and Q&A over the reports of a query's top-5
retrievals, graded automatically against the attributes (never against an LLM); the
reading of the text is :mod:`neurocbir.reports.grounding`'s, the same that verifies answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neurocbir.data.cases import CaseTable
from neurocbir.reports.explain import PAPER_QUESTIONS, Answer, Explainer, answer_question, read_answer
from neurocbir.reports.grounding import compute_facts, grade_summary, same_size
from neurocbir.reports.text import STYLES, case_attributes, make_report


def query_sets(
    table: CaseTable, n: int = 50, k: int = 5, run: Path | None = None, seed: int = 0
) -> list[tuple[int, list[int]]]:
    """``n`` (query row, [k retrieved rows]) sets. From a trained run's index when given; else
    nearest cases by tumor size among other patients (any patient-wise neighbour sets will do)."""
    rng = np.random.default_rng(seed)
    if run is not None:
        from neurocbir.models.runs import first_trial, trial_dir
        from neurocbir.retrieval.index import VectorIndex

        emb = np.load(trial_dir(run, first_trial(run)) / "embeddings.npz")
        index = VectorIndex.build(emb["archive"])
        picks = rng.choice(len(emb["test_rows"]), n, replace=False)
        _, ids = index.search(emb["test"][picks], k)
        return [(int(emb["test_rows"][p]), [int(emb["archive_rows"][i]) for i in row]) for p, row in zip(picks, ids)]
    sets = []
    for q in rng.choice(len(table), n, replace=False):
        others = np.flatnonzero(table.patient_id != table.patient_id[q])
        sets.append((int(q), [int(i) for i in rng.choice(others, k, replace=False)]))
    return sets


def grade_answer(given: Answer, truth: Answer) -> float:
    """1 if the answer names the right reports and states the right value (mean: value only)."""
    if truth.intent != "mean_size" and sorted(given.reports) != sorted(truth.reports):
        return 0.0
    if truth.value_mm2 is not None and (given.value_mm2 is None or not same_size(given.value_mm2, truth.value_mm2)):
        return 0.0
    return 1.0


def evaluate_reports(table: CaseTable, sets: list[tuple[int, list[int]]], explainer: Explainer, styles=STYLES) -> dict:
    out = {}
    for style in styles:
        summ_acc, summ_comp, qa, summ_fixed, qa_fixed = [], [], [], [], []
        for q, rows in sets:
            truth = [case_attributes(table, r) for r in rows]
            qa_truth = case_attributes(table, q)
            texts = [make_report(a, style, int(table.idx[r])) for a, r in zip(truth, rows)]
            qtext = make_report(qa_truth, style, int(table.idx[q]))
            s = explainer.summarize(texts, qtext)
            summ_fixed.append(s["source"].startswith("grounded (LLM"))
            g = grade_summary(s["summary"], truth)
            summ_acc.append(g["accuracy"])
            summ_comp.append(g["completeness"])
            f_true = compute_facts(truth, qa_truth)
            for question in PAPER_QUESTIONS:
                given, _ = explainer.answer(question, texts, qtext)
                qa_fixed.append(given.corrected)
                # grade the text a clinician reads, not the structured fields behind it
                qa.append(grade_answer(read_answer(given.answer, given.intent), answer_question(question, f_true)))
        out[style] = {
            "summary_accuracy": float(np.mean(summ_acc)),
            "summary_completeness": float(np.mean(summ_comp)),
            "qa_accuracy": float(np.mean(qa)),
            "summary_corrected_rate": float(np.mean(summ_fixed)),
            "qa_corrected_rate": float(np.mean(qa_fixed)),
            "n_sets": len(sets),
        }
    return out
