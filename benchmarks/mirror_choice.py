"""Each slice alone, or with its mirror: the choice `neurocbir calibrate RUN` makes for a lesion run
(issue 39; `neurocbir.training.mirror_choice`), remade for the runs given, one per test fold.

    .venv/bin/python benchmarks/mirror_choice.py --runs runs/cpu-v3-fold1 ... models/lesion-fold5 [--saved]

For each run, its training patients held out of training are queried with NIR against its other
training patients, once with each slice's own embedding and once with the mean of its own and its
mirror's (both sides, query and archive); the mirror is chosen where its kappa is higher. Nothing
of a test fold is read here; what each choice gave on the test folds (the served recipe) is in the cpu-folds-v3-record
section (one run per fold, each with what it chose). The last row is the mean over the runs: what
a choice for the recipe as a whole, rather than per run, would have rested on; and the mean of each
run's chosen embedding's kappa (what the runs serve).

``--saved``: each run's figures as its training measured them (``mirror.json``'s ``measured``, written by
`neurocbir train` or `neurocbir calibrate` with the same function), not remade (seconds, not minutes).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--saved", action="store_true", help="read each run's mirror.json instead of measuring again")
    ap.add_argument("--variants", action="store_true", help="runs of different recipes on one fold: no mean rows")
    ap.add_argument("--section", default="mirror-choice")
    ap.add_argument(
        "--title", default="Each slice alone, or with its mirror: the embedding chosen on held-out patients"
    )
    args = ap.parse_args()
    from neurocbir.data.cases import default_data_dir, load_cases
    from neurocbir.training.mirror_choice import held_out_kappas

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    table = load_cases(default_data_dir())
    rows, found = [], []
    for run in args.runs:
        m = json.loads((run / "mirror.json").read_text())["measured"] if args.saved else held_out_kappas(run, table)
        found.append(m)
        chosen = "the mirror" if m["kappa_mirror"] > m["kappa_own"] else "the slice alone"
        rows.append(
            f"| `{run}` | {m['n_patients']} ({m['n_slices']}) | {m['kappa_own']:.4f} / {m['accuracy_own']:.4f} | "
            f"{m['kappa_mirror']:.4f} / {m['accuracy_mirror']:.4f} | {m['kappa_mirror'] - m['kappa_own']:+.4f} | {chosen} |"
        )
        print(rows[-1], flush=True)
    gain = [m["kappa_mirror"] - m["kappa_own"] for m in found]
    body = [
        f"## {args.title} (issue 39)",
        "",
        f"Command: `python benchmarks/mirror_choice.py {shlex.join(sys.argv[1:])}` | machine: "
        f"{machine()} | {started} | {time.time() - t0:.0f} s",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        "| run | held-out patients (slices) | own embedding: NIR kappa / accuracy | with the mirror | kappa gain | chosen |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    if not args.variants:
        body += [
            f"| mean over the {len(found)} runs | | {np.mean([m['kappa_own'] for m in found]):.4f} | "
            f"{np.mean([m['kappa_mirror'] for m in found]):.4f} | {np.mean(gain):+.4f} (sd {np.std(gain, ddof=1) if len(gain) > 1 else float('nan'):.4f}) | |",
            f"| mean of the chosen embedding's kappa | | {np.mean([max(m['kappa_own'], m['kappa_mirror']) for m in found]):.4f} | | | |",
        ]
    write_section(args.section, "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
