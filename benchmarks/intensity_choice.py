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
    python benchmarks/intensity_choice.py --runs RUN ...     # runs already trained (`neurocbir train --intensity`)

A GPU only makes it quicker (each training takes about 20 minutes on 2 CPU cores with native
bf16); the runs it writes are comparisons, never served.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SCALINGS = ("minmax", "head")
TITLE = "Intensity scaling inside the head, on held-out slices (issue 38, item 5)"


def train_one(fold: int, intensity: str, out: Path, data: str | None, extra: str, smoke: int = 0) -> None:
    """One run of the CPU preset with this scaling (``smoke``: that many slices per fold and class,
    one epoch: a check that it runs)."""
    from neurocbir.models.runs import LESION_CPU_DEFAULTS, TrainConfig
    from neurocbir.training.lesion_run import train_lesion_run

    cfg = TrainConfig(recipe="lesion", fold=fold, data=data, extra_cases=extra)
    for k, v in {**LESION_CPU_DEFAULTS, "intensity": intensity}.items():
        setattr(cfg, k, v)
    cfg.epochs = 1 if smoke else cfg.epochs
    train_lesion_run(cfg, out, cases(data, smoke), progress=False)


def cases(data: str | None, smoke: int = 0):
    """figshare's slices (``smoke``: only the first N of each fold and class)."""
    import numpy as np

    from neurocbir.data.cases import default_data_dir, load_cases

    table = load_cases(data or default_data_dir())
    if not smoke:
        return table
    keep = [np.flatnonzero((table.fold == f) & (table.label == c))[:smoke] for f in range(1, 6) for c in range(3)]
    return table.subset(np.sort(np.concatenate(keep)))


def chosen(runs: list[Path], table) -> dict:
    """The "no tumor" rule chosen on the held-out slices of ``runs`` pooled (as `neurocbir calibrate
    RUN --presence --pool ...`, nothing saved), its per-source rates, and the first run's NIR kappa on
    its held-out training patients."""
    from neurocbir.training.presence_choice import choose_presence

    rule, tried = choose_presence(runs[0], table, save=False, pool=tuple(runs[1:]))
    key = (rule.threshold, rule.decoder_veto, rule.decoder_weight)
    rates = next(r for t, r, _ in tried if (t.threshold, t.decoder_veto, t.decoder_weight) == key)
    inner = json.loads((runs[0] / "calibration.json").read_text())["inner_cv"]
    return {
        "rule": dict(zip(("threshold", "decoder_veto", "decoder_weight"), key)),
        "measured": {
            str(src): {"no_tumor_found": None if f != f else float(f), "tumor_called_none": float(m)}
            for src, (f, m) in rates.items()
        },
        "held_out_nir_kappa": inner["kappa"]["nir"],
        "held_out_n": inner["n"],
    }


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


def compare(runs: list[Path], table) -> list[str]:
    """Each run's own choice, then each scaling's runs pooled: the table's lines."""
    lines = [
        "| run | rule chosen | per source: no-tumor found / tumor called 'no tumor' | mean found "
        "| NIR kappa, held-out patients (slices) |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    by_scaling: dict[str, list[Path]] = {}
    for run in runs:
        cfg = json.loads((run / "config.json").read_text())
        scaling = cfg.get("intensity", "minmax")
        by_scaling.setdefault(scaling, []).append(run)
        precision = json.loads((run / "timings.json").read_text()).get("precision", "?")
        lines.append(row(f"`{run}` ({scaling}, fold {cfg['fold']}, trained in {precision})", chosen([run], table)))
        print(lines[-1], flush=True)
    for scaling, group in by_scaling.items():
        if len(group) > 1:
            lines.append(row(f"{scaling}: {len(group)} runs pooled", chosen(group, table)))
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, nargs="+", default=[5, 1])
    ap.add_argument("--out", type=Path, help="train the runs compared here")
    ap.add_argument("--runs", type=Path, nargs="+", help="or compare these runs, already trained")
    ap.add_argument("--data", default=None)
    ap.add_argument("--extra-cases", default="../shared/data/brain-tumor-external-v2")
    ap.add_argument("--jobs", type=int, default=1, help="trainings at a time (separate processes)")
    ap.add_argument("--save", action="store_true", help="with --runs: write the table into docs/results.md")
    ap.add_argument("--smoke", type=int, default=0, help="a check that it runs: N slices per fold and class, 1 epoch")
    ap.add_argument("--one", nargs=2, metavar=("FOLD", "SCALING"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.runs:
        started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
        lines = compare(args.runs, cases(args.data, args.smoke))
        if args.save:
            from results_doc import machine, write_section

            command = f"python benchmarks/intensity_choice.py --runs {' '.join(str(r) for r in args.runs)} --save"
            head = [
                f"## {TITLE}",
                "",
                f"Command: `{command}` | machine: {machine()} | {started} | {time.time() - t0:.0f} s",
            ]
            write_section(
                "intensity-choice",
                "\n".join([*head, "", __doc__.split("\n\n", 1)[1].split("\n\n    python")[0].strip(), "", *lines]),
            )
        return
    if args.out is None:
        ap.error("give --out (train, then compare) or --runs (compare)")
    extra = str(Path(args.extra_cases).resolve())
    if args.one:  # a worker: one training
        fold, intensity = int(args.one[0]), args.one[1]
        train_one(fold, intensity, args.out / f"{intensity}-fold{fold}", args.data, extra, args.smoke)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    todo = [(f, s) for f in args.folds for s in SCALINGS]
    base = [sys.executable, __file__, "--out", str(args.out), "--extra-cases", extra]
    base += (["--data", args.data] if args.data else []) + ["--smoke", str(args.smoke)]
    running: list[subprocess.Popen] = []
    # the cores shared out: each worker left to its own thread count takes them all (on a 16-core GPU
    # machine six workers then loaded 3 slices a second each)
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    for f, s in todo:
        while len(running) >= args.jobs:
            running = [p for p in running if p.poll() is None]
            time.sleep(5)
        with open(args.out / f"{s}-fold{f}.log", "w") as log:  # the worker keeps its own copy of the file
            running.append(subprocess.Popen([*base, "--one", str(f), s], stdout=log, stderr=subprocess.STDOUT, env=env))
    for p in running:
        p.wait()
    done = [args.out / f"{s}-fold{f}" for f, s in todo if (args.out / f"{s}-fold{f}" / "calibration.json").is_file()]
    compare(done, cases(args.data, args.smoke))


if __name__ == "__main__":
    main()
