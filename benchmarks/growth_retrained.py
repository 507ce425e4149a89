"""Archive growth with and without retraining (issue 29): the same recipe trained on figshare's
training folds alone and on those folds plus the external development part (`neurocbir train
--extra-cases`), each served over archives of figshare folds 1-4 plus 0, 25, 50 and 100 % of the
development part; scored on the validation part and the run's test fold (figshare fold 5), through
the app's path (benchmarks/other_sites.py: `measure_run`).

    .venv/bin/python benchmarks/growth_retrained.py --runs RUN_FIGSHARE RUN_WITH_DEVELOPMENT [RUN ...]

where the runs come from (2 cores, the CPU preset; the same epochs for both):

    neurocbir train --out runs/cpu-fig-fold5 --epochs 19
    neurocbir train --out runs/cpu-dev-fold5 --extra-cases ../shared/data/brain-tumor-external-v2

Nothing is chosen here: the recipe is the CPU preset as it is, the validation part and fold 5 are
read once per run, to report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from other_sites import TABLE_HEAD, measure_run, row
from results_doc import machine, write_section


def describe(run: Path) -> str:
    cfg = json.loads((run / "config.json").read_text())
    trained = "figshare folds 1-4" + (" + the development part" if cfg.get("extra_cases") else "")
    return f"`{run}` ({cfg['encoder']}, {cfg['image_size']} px, {cfg['epochs']} epochs; trained on {trained})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    args = ap.parse_args()
    from neurocbir.data.cases import default_data_dir, load_cases
    from neurocbir.data.external import default_external_dir, development_split, load_external

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    data = default_data_dir()
    ext = load_external(default_external_dir(data))
    dev_rows, val_rows = development_split(ext)
    dev, val = ext.subset(dev_rows), ext.subset(val_rows)
    table = load_cases(data)
    val_lines, fold_lines, runs, dice = [], [], [], []
    for run in args.runs:
        m = measure_run(run, table, dev, val)
        runs.append(f"- {describe(run)}")
        for g in m["growth"]:
            name = f"{run.name}: figshare folds 1-4 + {round(100 * g['share'])} % of the development part"
            val_lines.append(row(name, g["val"], str(g["added"])))
        full = m["growth"][-1]
        fold_lines.append(row(f"{run.name}: + the whole development part", full["fold5"], str(full["added"])))
        dice.append(f"{run.name} {full['fold5']['dice']:.3f}")
        print(val_lines[-1], fold_lines[-1], sep="\n", flush=True)
    n = len(TABLE_HEAD[1].split("|")) - 2
    body = [
        "## Archive growth, with and without retraining (issue 29)",
        "",
        f"Command: `python benchmarks/growth_retrained.py --runs {' '.join(map(str, args.runs))}` | machine: "
        f"{machine()} | {started} | {time.time() - t0:.0f} s",
        "",
        "The same CPU recipe (`neurocbir train`'s CPU preset) trained without and with the external development "
        "part, each over archives that grow by whole development groups (a fixed sample, as in 'Other hospitals'). "
        "Columns as there. Runs:",
        "",
        *runs,
        "",
        *TABLE_HEAD,
        "| **validation part of other hospitals' slices** |" + " |" * (n - 1),
        *val_lines,
        "| **figshare fold 5** |" + " |" * (n - 1),
        *fold_lines,
        "",
        f"Outline Dice median on fold 5 over the archive with the whole development part: {', '.join(dice)}.",
    ]
    write_section("growth-retrained", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
