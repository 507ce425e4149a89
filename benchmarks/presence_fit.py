"""What the archive's presence model is fitted on (issue 38, item 5): the slices the network trained
on, as an archive of the development part fits it today, or slices it never saw.

    .venv/bin/python benchmarks/presence_fit.py --runs runs/cpu-v3-fold1 ... models/lesion-fold5

A network's descriptors of slices it trained on separate tumor from no tumor more cleanly than its
descriptors of new slices; a presence model fitted on the former may draw its line where new
slices do not fall. For each run (one per test fold), its held-out slices (held-out training
patients and development groups, twins of trained-on slices and TCGA tumors under 1 % of the slice
left out, as `neurocbir calibrate --presence` takes them) are scored by an RBF SVM
(`neurocbir.classify.presence.TumorPresence`) fitted on:
- **trained-on**: the slices the network trained on (what the app's archive does today);
- **held-out only**: the other held-out groups (5-fold group-wise cross-fitting within the held-out slices);
- **both**: the trained-on slices and the other held-out groups (the same cross-fitting).
Counts are pooled over the runs. AUROC per source (no tumor against tumor, by P(no tumor)), and at
each threshold on P(no tumor): no-tumor slices found / tumor slices called "no tumor". Nothing is
chosen from a test fold or the validation part: neither is read.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section

FITS = ("trained-on", "held-out only", "both")
SOURCES = ("br35h", "kaggle-training", "sartaj-training", "tcga-lgg")
THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


def scored(s: dict) -> dict:
    """P(no tumor) of each held-out slice of one run under each fit."""
    from sklearn.model_selection import GroupKFold

    from neurocbir.classify.presence import TumorPresence

    desc, tumor, trained = s["desc"], s["tumor"], s["trained"]
    held = np.flatnonzero(~trained)
    out = {FITS[0]: TumorPresence().fit(desc[trained], tumor[trained]).proba_no_tumor(desc[held])}
    out[FITS[1]], out[FITS[2]] = np.zeros(len(held)), np.zeros(len(held))
    for fit, score in GroupKFold(5).split(held, groups=s["group"][held]):
        out[FITS[1]][score] = TumorPresence().fit(desc[held[fit]], tumor[held[fit]]).proba_no_tumor(desc[held[score]])
        both = np.concatenate([np.flatnonzero(trained), held[fit]])
        out[FITS[2]][score] = TumorPresence().fit(desc[both], tumor[both]).proba_no_tumor(desc[held[score]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="runs of one recipe, one per test fold")
    args = ap.parse_args()
    from sklearn.metrics import roc_auc_score

    from neurocbir.data.cases import default_data_dir, load_cases
    from neurocbir.training.presence_choice import held_out_slices

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    table = load_cases(default_data_dir())
    p = {f: [] for f in FITS}
    tumor, source = [], []
    for run in args.runs:
        s, _ = held_out_slices(run, table)
        for f, v in scored(s).items():
            p[f].append(v)
        tumor.append(s["tumor"][~s["trained"]])
        source.append(s["source"][~s["trained"]])
        print(run, "done", flush=True)
    p = {f: np.concatenate(v) for f, v in p.items()}
    tumor, source = np.concatenate(tumor), np.concatenate(source)
    counts = ", ".join(
        f"{src} {int(((source == src) & tumor).sum())} / {int(((source == src) & ~tumor).sum())}" for src in SOURCES
    )
    rows = []
    for f in FITS:
        auc = " | ".join(f"{roc_auc_score(~tumor[source == src], p[f][source == src]):.3f}" for src in SOURCES)
        rows.append(f"| {f} | AUROC | {auc} |")
        for t in THRESHOLDS:
            cells = " | ".join(
                f"{np.mean(p[f][(source == src) & ~tumor] > t):.3f} / {np.mean(p[f][(source == src) & tumor] > t):.3f}"
                for src in SOURCES
            )
            rows.append(f"| {f} | P(no tumor) > {t} | {cells} |")
    body = [
        "## Tumor presence: what the archive's presence model is fitted on (issue 38, item 5)",
        "",
        f"Command: `python benchmarks/presence_fit.py --runs {' '.join(str(r) for r in args.runs)}` | machine: "
        f"{machine()} | {started} | {time.time() - t0:.0f} s",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        f"Held-out slices over the {len(args.runs)} runs, tumor / no tumor: {counts}.",
        "",
        "| fitted on | | " + " | ".join(SOURCES) + " |",
        "|---|---|" + "---|" * len(SOURCES),
        *rows,
    ]
    write_section("presence-fit", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
