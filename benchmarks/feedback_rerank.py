"""Re-ranking by clinicians' feedback, measured with simulated raters on the test fold (issue 12).

    .venv/bin/python benchmarks/feedback_rerank.py [--run models/lesion-fold5]

The test fold's patients are split in two halves. A simulated rater marks the top-10
retrievals of every query of the first half (relevant = same tumor type as the query; the
"noisy" rater flips 20 % of its marks); the second half's queries are then retrieved with and
without re-ranking, and scored by precision@5 (share of same-type cases among the 5 shown).
The re-ranking weight was fixed before this measurement (``neurocbir.serving.feedback.RERANK_WEIGHT``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=ROOT / "models" / "lesion-fold5")
    args = p.parse_args()
    from neurocbir.models.runs import first_trial
    from neurocbir.serving.feedback import RERANK_WEIGHT, FeedbackStore
    from neurocbir.serving.service import RetrievalService

    svc = RetrievalService.from_run(args.run)
    table = svc.cases.table
    emb = np.load(args.run / f"trial_{first_trial(args.run)}" / "embeddings.npz")
    rows, queries = emb["test_rows"], emb["test"]
    patients = np.unique(table.patient_id[rows])
    rated = set(np.random.default_rng(0).choice(patients, len(patients) // 2, replace=False))
    first = np.array([table.patient_id[r] in rated for r in rows])
    lines = []
    for rater, flip in (("exact", 0.0), ("noisy (20 % of marks flipped)", 0.2)):
        rng = np.random.default_rng(1)
        with tempfile.TemporaryDirectory() as tmp:
            store = FeedbackStore(Path(tmp) / "feedback.db")
            marks = 0
            for q, r in zip(queries[first], rows[first]):
                _, ids, labels = svc.cases.neighbours(q[None], False)
                for c, lab in zip(ids[:10], labels[:10]):
                    relevant = bool(lab == table.label[r]) != (rng.random() < flip)
                    store.add("0" * 32, int(c), relevant)
                    marks += 1
            before, after = [], []
            for q, r in zip(queries[~first], rows[~first]):
                dist, ids, labels = svc.cases.neighbours(q[None], False)
                same = labels[:20] == table.label[r]
                before.append(same[:5].mean())
                after.append(same[store.rerank(ids[:20], dist[:20])[:5]].mean())
            store.close()
        lines.append(f"| {rater} | {marks} | {int((~first).sum())} | {np.mean(before):.3f} | {np.mean(after):.3f} |")
    body = "\n".join(
        [
            "## Clinician feedback: re-ranking with simulated raters (issue 12)",
            "",
            f"Command: `python benchmarks/feedback_rerank.py {' '.join(sys.argv[1:])}` | machine: {machine()} | "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | run `{args.run.name}` | re-ranking weight "
            f"{RERANK_WEIGHT} (fixed beforehand) | the test fold's patients split in half: one half rated, the other scored",
            "",
            "| rater | marks given | queries scored | precision@5 without feedback | precision@5 re-ranked |",
            "|---|---|---|---|---|",
            *lines,
        ]
    )
    write_section("feedback", body)
    print(body)


if __name__ == "__main__":
    main()
