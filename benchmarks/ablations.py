"""Ablations of the CPU training recipe on one fold (single configuration per line).

    .venv/bin/python benchmarks/ablations.py [--fold 5] [--seeds 2]

Each line trains the top with a TrainConfig variant on the shared feature cache and reports
NIR / I-NIR / KNN kappa on the test fold (mean over seeds); the table goes to the
"ablations" section of docs/results.md. Variants: head only vs last 2 blocks, epochs,
regularisation (dropout, feature noise, weight decay), cross-patient positives, TTA.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "default": {},
    "head only (trainable_blocks=0), 20 epochs": {"trainable_blocks": 0, "epochs": 20},
    "weak regularisation (dropout 0.3, no noise, wd 1e-4)": {
        "dropout": 0.3,
        "feature_noise": 0.0,
        "weight_decay": 1e-4,
    },
    "5 epochs": {"epochs": 5},
    "cross-patient positives": {"cross_patient_positives": True},
    "test-time augmentation": {"tta": True},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fold", type=int, default=5)
    p.add_argument("--seeds", type=int, default=2)
    args = p.parse_args()
    import torch
    from sklearn.metrics import cohen_kappa_score

    from neurocbir.classify.neighbors import KNNClassifier, NIRClassifier
    from neurocbir.data.cases import load_cases
    from neurocbir.models.inference import embed_features
    from neurocbir.models.runs import TrainConfig
    from neurocbir.training.cached import prepare, train_top

    table = load_cases()
    tr, te = np.flatnonzero(table.fold != args.fold), np.flatnonzero(table.fold == args.fold)
    rows = []
    for name, over in VARIANTS.items():
        cfg = dataclasses.replace(TrainConfig(loss="supcon", fold=args.fold), **over)
        _, encoder, _, feats, _ = prepare(cfg, table)
        f_tr, f_te = np.asarray(feats[tr]), np.asarray(feats[te])
        scores, t0 = [], time.time()
        for seed in range(args.seeds):
            top = train_top(
                cfg,
                encoder,
                f_tr,
                table.label[tr],
                seed,
                torch.device("cpu"),
                progress=False,
                groups=table.patient_id[tr],
            )
            a, _ = embed_features(top, f_tr, torch.device("cpu"))
            q, _ = embed_features(top, f_te, torch.device("cpu"), tta=cfg.tta)
            y = table.label[te]
            scores.append(
                [
                    cohen_kappa_score(y, c.fit(a, table.label[tr]).predict(q))
                    for c in (NIRClassifier(), NIRClassifier(nth_incorrect=10), KNNClassifier(7), KNNClassifier(25))
                ]
            )
        m = np.mean(scores, axis=0)
        rows.append(
            f"| {name} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:.3f} | {(time.time() - t0) / args.seeds:.0f} |"
        )
        print(rows[-1], flush=True)
    body = "\n".join(
        [
            "## Ablations of the CPU recipe (SupCon, issue 2)",
            "",
            f"Command: `python benchmarks/ablations.py {' '.join(sys.argv[1:])}` | machine: {machine()} | "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | fold {args.fold}, mean of {args.seeds} seeds, kappa",
            "",
            "| variant | NIR | I-NIR | KNN-7 | KNN-25 | s per seed |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    write_section("ablations", body)


if __name__ == "__main__":
    main()
