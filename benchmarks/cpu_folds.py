"""The served CPU recipe on every test fold (issue 39): one run per patient-wise test fold, each
trained by the same command without its test fold, each test fold read once through the app's
path (`RetrievalService.from_run`: OpenVINO, full-resolution slices, the run's own index of its
training folds, its own calibration, presence rule and outline level).

    neurocbir train --fold F --out runs/cpu-v3-foldF          # F = 1..5, each about 40-100 min here
    neurocbir calibrate runs/cpu-v3-foldF --presence --pool runs/cpu-v3-foldG ...   # the other folds' runs
    .venv/bin/python benchmarks/cpu_folds.py --runs runs/cpu-v3-fold1 ... runs/cpu-v3-fold5 [--section S --title T]
    .venv/bin/python benchmarks/cpu_folds.py --runs runs/cpu-v3-fold4 --record docs/folds/cpu-v3.json ...

A session's machine keeps no run for the next one, and a fold takes 20-80 minutes to train: with
``--record FILE`` each fold's figures (with the date, machine, commit and precision it was measured
with) are kept in FILE, a fold measured again replaces its row, and the table shows every fold the
file holds, of one recipe (a run of another recipe is refused).

Nothing is chosen here (each run chose its embedding, the scan alone or with its mirror, on its own
held-out training patients: `neurocbir calibrate RUN`, mirror.json). Accuracy and kappa count every tumor slice of the fold (a slice answered
"no tumor" is wrong); ECE is over the slices answered with a type; Dice is the outline the app
draws against the dataset's mask. The mean and standard deviation are over the folds given (the
table says how many). Training minutes are wall time from the run's timings.json: runs that shared
the 2 cores with other work took longer than they would alone, so they are upper bounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from other_sites import dice, drawn_mask
from results_doc import machine, write_section


def fold_figures(run: Path) -> dict:
    from sklearn.metrics import cohen_kappa_score

    from neurocbir.classify.calibration import expected_calibration_error
    from neurocbir.data.cases import CLASS_NAMES, default_data_dir, load_cases
    from neurocbir.models.mirror import mirrored
    from neurocbir.serving.service import RetrievalService

    cfg = json.loads((run / "config.json").read_text())
    table = load_cases(default_data_dir())
    rows = np.flatnonzero(table.fold == cfg["fold"])
    svc = RetrievalService.from_run(run)
    t0 = time.perf_counter()
    out = [svc.query(table.load_image(int(i)), k=5) for i in rows]
    seconds = (time.perf_counter() - t0) / len(rows)
    y = table.label[rows].astype(int)
    names = [o["prediction"] or "none" for o in out]
    pred = np.array([CLASS_NAMES.index(n) if n in CLASS_NAMES else len(CLASS_NAMES) for n in names])
    typed = pred < len(CLASS_NAMES)
    proba = np.array([[out[i]["probabilities"].get(c, 0.0) for c in CLASS_NAMES] for i in np.flatnonzero(typed)])
    dices = [dice(drawn_mask(o, table.load_mask(int(r)).shape), table.load_mask(int(r))) for o, r in zip(out, rows)]
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").exists() else {}
    return {
        "fold": int(cfg["fold"]),
        "run": str(run),
        "encoder": f"{cfg['encoder']} {cfg.get('image_size', '')} px, {cfg['epochs']} epochs",
        "mirror": mirrored(run),
        "slices": len(rows),
        "accuracy": float((pred == y).mean()),
        "kappa": float(cohen_kappa_score(y, pred)),
        "ece": float(expected_calibration_error(proba, y[typed])),
        "called_none": float((~typed).mean()),
        "dice": float(np.median(dices)),
        "ms_per_query": 1000 * seconds,
        "train_min": timings.get("total_s", float("nan")) / 60,
        "resumed": bool(timings.get("resumed")),
    }


#: config fields that do not make a run another recipe
NOT_RECIPE = ("fold", "first_seed", "data", "extra_cases", "cache_dir", "weights")


def recipe_of(run: Path) -> dict:
    from neurocbir.models.runs import TrainConfig

    cfg = dataclasses.asdict(TrainConfig(**json.loads((run / "config.json").read_text())))
    return {k: v for k, v in cfg.items() if k not in NOT_RECIPE}


def recorded(path: Path, figs: list[dict], recipe: dict) -> list[dict]:
    """``figs`` merged into the record at ``path`` (one row per fold, the newest kept), written back."""
    from neurocbir.files import write_json

    old = json.loads(path.read_text()) if path.is_file() else {"recipe": recipe, "folds": []}
    if old["recipe"] != recipe:
        diff = sorted(k for k in {*recipe, *old["recipe"]} if recipe.get(k) != old["recipe"].get(k))
        raise SystemExit(f"{path} records another recipe (differs in {', '.join(diff)}): record it elsewhere")
    rows = {f["fold"]: f for f in old["folds"]} | {f["fold"]: f for f in figs}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"recipe": recipe, "folds": [rows[k] for k in sorted(rows)]})
    return [rows[k] for k in sorted(rows)]


def _embedding(fig: dict) -> str:
    """How the fold's run embedded each scan (folds recorded before the choice existed: its own)."""
    return "with its mirror" if fig.get("mirror") else "its own"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--section", default="cpu-folds", help="docs/results.md section (one per recipe version)")
    ap.add_argument("--title", default="The CPU recipe on every test fold (issue 39)")
    ap.add_argument("--record", type=Path, help="keep each fold's figures in this JSON file, and show all it holds")
    args = ap.parse_args()
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    recipes = [recipe_of(run) for run in args.runs]
    if any(r != recipes[0] for r in recipes):
        raise SystemExit("the runs given are of different recipes: one table per recipe")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    figs = []
    for run in args.runs:
        precision = json.loads((run / "timings.json").read_text()).get("precision", "?")
        figs.append(
            {**fold_figures(run), "measured": f"{started}, {machine().split(';')[0]}, {commit}", "precision": precision}
        )
        print(figs[-1], flush=True)
    if args.record:
        figs = recorded(args.record, figs, recipes[0])
    keys = ("accuracy", "kappa", "ece", "called_none", "dice")
    rows = [
        f"| {f['fold']} | `{f['run']}` ({f['encoder']}) | {_embedding(f)} | {f['slices']} | {f['accuracy']:.3f} | {f['kappa']:.3f} | "
        f"{f['ece']:.3f} | {100 * f['called_none']:.1f} % | {f['dice']:.3f} | "
        + (f"resumed: {f['train_min']:.0f} after the last start" if f["resumed"] else f"{f['train_min']:.0f}")
        + f" ({f.get('precision', '?')}) | {f.get('measured', '')} |"
        for f in figs
    ]
    mean = {k: np.mean([f[k] for f in figs]) for k in keys}
    sd = {k: np.std([f[k] for f in figs], ddof=1) if len(figs) > 1 else float("nan") for k in keys}
    body = [
        f"## {args.title}",
        "",
        f"Command: `python benchmarks/cpu_folds.py --runs {' '.join(str(r) for r in args.runs)}"
        + (f" --section {args.section} --title '{args.title}'" if args.section != "cpu-folds" else "")
        + (f" --record {args.record}" if args.record else "")
        + f"` | machine: {machine()} "
        f"| {started} | {time.time() - t0:.0f} s",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        "| test fold | run | embedding (mirror.json) | slices | accuracy | kappa | ECE (typed answers) | tumor slices called 'no tumor' "
        "| outline Dice median | `neurocbir train` (min, from timings.json; precision) | measured (date, machine, commit) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        f"| mean ± sd ({len(figs)} folds) | | | | {mean['accuracy']:.3f} ± {sd['accuracy']:.3f} | "
        f"{mean['kappa']:.3f} ± {sd['kappa']:.3f} | {mean['ece']:.3f} ± {sd['ece']:.3f} | "
        f"{100 * mean['called_none']:.1f} % | {mean['dice']:.3f} ± {sd['dice']:.3f} | | |",
    ]
    write_section(args.section, "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
