"""How the served CPU recipe scales a slice's intensities, compared on held-out slices (issue 38,
item 5: "no tumor" read from a source's look, not its anatomy).

The recipe scales each slice by its own range (``minmax``): a few bright pixels darken the whole
brain, and other hospitals' JPEG exports (already windowed) come out brighter than figshare's or
TCGA's slices. ``head`` instead maps the head's 99th percentile to white. For each scaling and each
test fold given, the recipe (its CPU preset, whatever the device) trains one run, and the "no tumor"
rule is chosen on that run's held-out slices (held-out training patients and development groups)
exactly as ``neurocbir calibrate RUN --presence`` does; then once more on the pooled held-out slices
of all the folds' runs of that scaling. What is compared is what the choice optimises: every
source's share of no-tumor slices found with its tumor slices kept within their bounds. Neither a
test fold nor the validation part is read.

    python benchmarks/intensity_choice.py --folds 5 1 --out runs/intensity [--data D] [--extra-cases E] [--jobs 4]

A GPU only makes it quicker (each training takes about 20 minutes on 2 CPU cores with native
bf16); the runs it writes are comparisons, never served.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SCALINGS = ("minmax", "head")


def train_one(fold: int, intensity: str, out: Path, data: str | None, extra: str, smoke: int = 0) -> dict:
    """One run of the CPU preset with this scaling, and its own "no tumor" rule (``smoke``: that many
    slices per fold and class, one epoch: a check that it runs)."""
    from neurocbir.models.runs import LESION_CPU_DEFAULTS, TrainConfig
    from neurocbir.training.lesion_run import train_lesion_run
    from neurocbir.training.presence_choice import choose_presence

    cfg = TrainConfig(recipe="lesion", fold=fold, data=data, extra_cases=extra)
    for k, v in {**LESION_CPU_DEFAULTS, "intensity": intensity}.items():
        setattr(cfg, k, v)
    table = cases(data, smoke)
    cfg.epochs = 1 if smoke else cfg.epochs
    t0 = time.time()
    train_lesion_run(cfg, out, table, progress=False)
    rule, _ = choose_presence(out, table)
    return {"fold": fold, "intensity": intensity, "train_s": round(time.time() - t0), **summary(out)}


def cases(data: str | None, smoke: int = 0):
    """figshare's slices (``smoke``: only the first N of each fold and class)."""
    import numpy as np

    from neurocbir.data.cases import default_data_dir, load_cases

    table = load_cases(data or default_data_dir())
    if not smoke:
        return table
    keep = [np.flatnonzero((table.fold == f) & (table.label == c))[:smoke] for f in range(1, 6) for c in range(3)]
    return table.subset(np.sort(np.concatenate(keep)))


def summary(run: Path) -> dict:
    p = json.loads((run / "presence.json").read_text())
    inner = json.loads((run / "calibration.json").read_text())["inner_cv"]  # held-out training patients
    return {
        "rule": {k: p[k] for k in ("threshold", "decoder_veto", "decoder_weight")},
        "measured": p["measured"],
        "held_out_nir_kappa": inner["kappa"]["nir"],
        "held_out_n": inner["n"],
    }


def pooled(runs: list[Path], data: str | None, smoke: int = 0) -> dict:
    from neurocbir.training.presence_choice import choose_presence

    choose_presence(runs[0], cases(data, smoke), pool=tuple(runs[1:]))
    return summary(runs[0])


def row(name: str, s: dict) -> str:
    m = s["measured"]
    cells = []
    for src in sorted(m):
        f, c = m[src]["no_tumor_found"], m[src]["tumor_called_none"]
        cells.append(f"{src} {'-' if f is None else f'{f:.1%}'} / {c:.1%}")
    found = [v["no_tumor_found"] for v in m.values() if v["no_tumor_found"] is not None]
    r = s["rule"]
    rule = f"score(w={r['decoder_weight']}) > {r['threshold']}" + (
        f", veto {r['decoder_veto']}" if r["decoder_veto"] else ""
    )
    kappa = f"{s['held_out_nir_kappa']:.3f} ({s['held_out_n']})"
    return f"| {name} | {rule} | " + "; ".join(cells) + f" | {sum(found) / len(found):.3f} | {kappa} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, nargs="+", default=[5, 1])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--extra-cases", default="../shared/data/brain-tumor-external-v2")
    ap.add_argument("--jobs", type=int, default=1, help="trainings at a time (separate processes)")
    ap.add_argument("--smoke", type=int, default=0, help="a check that it runs: N slices per fold and class, 1 epoch")
    ap.add_argument("--one", nargs=2, metavar=("FOLD", "SCALING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    extra = str(Path(args.extra_cases).resolve())
    if args.one:  # a worker: one training
        fold, intensity = int(args.one[0]), args.one[1]
        res = train_one(fold, intensity, args.out / f"{intensity}-fold{fold}", args.data, extra, args.smoke)
        (args.out / f"{intensity}-fold{fold}.json").write_text(json.dumps(res, indent=1))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    todo = [(f, s) for f in args.folds for s in SCALINGS]
    base = [sys.executable, __file__, "--out", str(args.out), "--extra-cases", extra]
    base += (["--data", args.data] if args.data else []) + ["--smoke", str(args.smoke)]
    running: list[subprocess.Popen] = []
    for f, s in todo:
        while len(running) >= args.jobs:
            running = [p for p in running if p.poll() is None]
            time.sleep(5)
        with open(args.out / f"{s}-fold{f}.log", "w") as log:  # the worker keeps its own copy of the file
            running.append(subprocess.Popen([*base, "--one", str(f), s], stdout=log, stderr=subprocess.STDOUT))
    for p in running:
        p.wait()
    print(
        "| run | rule chosen | per source: no-tumor found / tumor called 'no tumor' | mean found | NIR kappa, held-out patients (slices) |"
    )
    print("|---|---|---|---|---|")
    for f, s in todo:
        res = args.out / f"{s}-fold{f}.json"
        print(
            row(f"{s}, fold {f}", json.loads(res.read_text()))
            if res.is_file()
            else f"| {s}, fold {f} | failed: see its log |"
        )
    if len(args.folds) > 1:
        for s in SCALINGS:
            runs = [args.out / f"{s}-fold{f}" for f in args.folds]
            if all((r / "presence.json").is_file() for r in runs):
                print(row(f"{s}, pooled folds {args.folds}", pooled(runs, args.data, args.smoke)))


if __name__ == "__main__":
    main()
