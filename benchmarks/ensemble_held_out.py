"""Two networks or one: the NIR kappa of pairs of runs of one test fold on its held-out training
patients (issue 39: "one network or a small ensemble: your measurement decides").

    .venv/bin/python benchmarks/ensemble_held_out.py --runs runs/plain-fold5 runs/ep24s1-fold5 ...

Every run of one fold holds out the same training patients (the split is not the seed's,
`neurocbir.training.holdout`). Each run's archive embeddings (as its index holds them: the mirror
averaged in where its `mirror.json` chose it) of the fitted patients are the archive, its held-out
patients the queries. A pair is served as one index over both runs' embeddings side by side (each
L2-normalised, the pair divided by sqrt 2): its squared distance is the mean of the two runs'.
Only the runs' saved embeddings are read: no network runs, no test slice is read.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="runs of one test fold")
    ap.add_argument("--section", default="ensemble-held-out")
    args = ap.parse_args()
    from sklearn.metrics import cohen_kappa_score

    from neurocbir.classify.neighbors import NIRClassifier
    from neurocbir.data.cases import default_data_dir, load_cases
    from neurocbir.training.holdout import holdout_embeddings

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    table = load_cases(default_data_dir())
    emb, splits = {}, set()
    for run in args.runs:
        cfg, fit, held, fit_emb, held_emb = holdout_embeddings(run, table)
        emb[run] = (fit_emb, held_emb)
        splits.add((cfg.fold, tuple(fit), tuple(held)))
    if len(splits) != 1:
        sys.exit("the runs do not share a test fold and its held-out patients")
    ((fold, fit, held),) = splits
    y_fit, y_held = table.label[list(fit)], table.label[list(held)]

    def scores(fit_emb: np.ndarray, held_emb: np.ndarray) -> str:
        pred = NIRClassifier().fit(fit_emb, y_fit).predict(held_emb)
        return f"{cohen_kappa_score(y_held, pred):.4f} / {np.mean(pred == y_held):.4f}"

    rows = [f"| `{run}` | {scores(*emb[run])} |" for run in args.runs]
    for a, b in itertools.combinations(args.runs, 2):
        pair = [np.hstack([emb[a][i], emb[b][i]]) / np.sqrt(2) for i in (0, 1)]
        rows.append(f"| `{a}` + `{b}` | {scores(*pair)} |")
    n_patients = len(np.unique(table.patient_id[list(held)]))
    body = [
        "## Two networks or one: pairs of runs of one test fold on its held-out patients (issue 39)",
        "",
        f"Command: `python benchmarks/ensemble_held_out.py {shlex.join(sys.argv[1:])}` | machine: "
        f"{machine()} | {started} | {time.time() - t0:.0f} s",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        f"Fold {fold}: {n_patients} held-out training patients ({len(held)} slices), {len(fit)} archive slices.",
        "",
        "| runs | NIR kappa / accuracy |",
        "|---|---|",
        *rows,
    ]
    write_section(args.section, "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
