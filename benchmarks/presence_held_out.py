"""Tumor presence chosen on slices the network never trained on (issue 38): what
`neurocbir calibrate RUN --presence` chooses (:mod:`neurocbir.training.presence_choice`), every
rule tried, per source of the held-out slices. The validation part and figshare fold 5 are not read.

    .venv/bin/python benchmarks/presence_held_out.py --run runs/cpu-v3-fold5 [--pool runs/cpu-v3-fold1 ...] [--save]

``--pool``: runs of the same recipe on other test folds, whose held-out development groups (the
held-out part turns with the fold) join the choice; the chosen run's test slices are neither
scored nor fitted on (their images only serve a pooled run's twin check of its held-out slices).
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section


def best_per_weight(tried: list) -> set:
    """:func:`key` of each (weight, tumor decoder's veto)'s rule that finds the most within the bounds."""
    from neurocbir.training.presence_choice import found

    best = {}
    for r, rates, ok in tried:
        if ok and found(rates) > best.get((r.decoder_weight, r.tumor_veto), (-1, None))[0]:
            best[r.decoder_weight, r.tumor_veto] = (found(rates), key(r))
    return {b for _, b in best.values()}


def key(r) -> tuple:
    return r.threshold, r.decoder_veto, r.decoder_weight, r.tumor_veto


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/cpu-v3-fold5"))
    ap.add_argument(
        "--pool", type=Path, nargs="+", action="extend", default=[], help="runs of the same recipe on other folds"
    )
    ap.add_argument("--save", action="store_true", help="write the chosen rule as the run's presence.json")
    ap.add_argument("--section", default="presence-held-out", help="the section of docs/results.md to write")
    ap.add_argument("--title", default="Tumor presence chosen on held-out slices (issue 38)")
    args = ap.parse_args()
    from neurocbir.data.cases import default_data_dir, load_cases
    from neurocbir.training.presence_choice import choose_presence

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    rule, tried = choose_presence(args.run, load_cases(default_data_dir()), save=args.save, pool=tuple(args.pool))
    sources = list(tried[0][1])

    def cell(f: float, m: float) -> str:
        return ("-" if np.isnan(f) else f"{f:.3f}") + " / " + ("-" if np.isnan(m) else f"{m:.3f}")

    chosen, shown = key(rule), best_per_weight(tried) | {key(rule)}
    lines = [  # every rule of P(no tumor) alone, then each weight's rule that finds the most within bounds
        f"| {r.describe()} | "
        + " | ".join(cell(*rates[s]) for s in sources)
        + (" | **chosen** |" if key(r) == chosen else " | |")
        for r, rates, _ in tried
        if (not r.decoder_weight and r.tumor_veto is None) or key(r) in shown
    ]
    body = [
        f"## {args.title}",
        "",
        f"Command: `python benchmarks/presence_held_out.py --run {args.run}"
        + "".join(f" --pool {p}" for p in args.pool)
        + (" --save" if args.save else "")
        + (
            ""
            if args.section == "presence-held-out"
            else f" --section {args.section} --title {shlex.quote(args.title)}"
        )
        + f"` | machine: {machine()} | {started} | "
        f"{time.time() - t0:.0f} s",
        "",
        f"Rule chosen: **{rule.describe()}**; {rule.how}. The validation part and fold 5 are not read.",
        "",
        "Per source: held-out no-tumor slices called 'no tumor' / held-out tumor slices called 'no tumor'.",
        "",
        "Rows: every rule on P(no tumor) alone; for each weight of the decoder's peak (and each veto of the tumor"
        " decoder's, where the rule reads a presence decoder), the rule that finds the most (mean over the"
        " sources) within every source's bound; and the rule chosen.",
        "",
        "| rule | " + " | ".join(sources) + " | |",
        "|---|" + "---|" * (len(sources) + 1),
        *lines,
    ]
    write_section(args.section, "\n".join(body))
    print("\n".join(body[:7]))


if __name__ == "__main__":
    main()
