"""Tumor presence from more of the tumor decoder's evidence (issue 38, item 5: "fix the cause, not
the threshold"), judged run by run on slices no network trained on.

The served rule scores a slice by the archive's P(no tumor) and the decoder's peak, with one weight
(:class:`neurocbir.classify.presence.PresenceRule`). Here a logistic regression also reads the mean of
the map's highest 1 % and the share of the map above 0.5 (:func:`neurocbir.training.presence_choice._evidence`).
Leave one run out: for each run, both kinds of rule are chosen, as `neurocbir calibrate --presence`
chooses (every source's tumor slices called 'no tumor' within its bound, then the most no-tumor
slices found), on the held-out slices of the **other** runs (figshare slices of this run's test
fold left out), and applied to this run's held-out slices. The table sums the runs so judged.
The validation part and every test fold are not read.

    .venv/bin/python benchmarks/presence_features.py --runs runs/cpu-v3-fold1 ... models/lesion-fold5

Each run's held-out slices are scored once and kept in ``--cache`` (a run's checkpoint names its file).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section

KEYS = ("p", "peak", "top", "area", "tumor", "source", "trained", "fold")


def scored(run: Path, table, cache: Path) -> dict:
    """A run's training and development slices: P(no tumor) from its archive's presence model
    (fitted on the slices it trained on) and what its tumor maps show."""
    from neurocbir.classify.presence import TumorPresence
    from neurocbir.models.runs import checkpoint_sha256, first_trial
    from neurocbir.training.presence_choice import held_out_slices

    path = cache / f"{checkpoint_sha256(run, first_trial(run))[:16]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in KEYS}
    s, _ = held_out_slices(run, table)
    s["p"] = TumorPresence().fit(s["desc"][s["trained"]], s["tumor"][s["trained"]]).proba_no_tumor(s["desc"])
    out = {k: s[k] for k in KEYS}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def features(s: dict) -> np.ndarray:
    def logit(p):
        p = np.clip(p, 1e-4, 1 - 1e-4)
        return np.log(p / (1 - p))

    return np.column_stack([logit(s["p"]), logit(s["peak"]), logit(s["top"]), np.log(s["area"] + 1e-3)])


def stacker(s: dict):
    """A logistic regression of 'no tumor' on :func:`features`, each source and kind (tumor or
    not) weighted alike, fitted on held-out slices only."""
    from sklearn.linear_model import LogisticRegression

    held = ~s["trained"]
    kinds = [f"{a}|{b}" for a, b in zip(s["source"][held], s["tumor"][held])]
    _, inverse, counts = np.unique(kinds, return_inverse=True, return_counts=True)
    model = LogisticRegression(C=1.0, max_iter=1000)
    return model.fit(features(s)[held], ~s["tumor"][held], sample_weight=1.0 / counts[inverse])


def choose(s: dict, scores: dict) -> tuple:
    """The rule (a key of ``scores``: name -> bool 'no tumor' per slice) chosen as presence_choice
    chooses: every source within its bound, then the most found; else the least over."""
    from neurocbir.training.presence_choice import excess, found, rates

    held = ~s["trained"]
    n_tumor = {src: int((held & (s["source"] == src) & s["tumor"]).sum()) for src in set(s["source"][held])}
    tried = [(name, rates(no_tumor, s)) for name, no_tumor in scores.items()]
    within = [(n, r) for n, r in tried if excess(r, n_tumor) <= 0]
    if within:
        return max(within, key=lambda x: found(x[1]))[0]
    return min(tried, key=lambda x: (excess(x[1], n_tumor), -found(x[1])))[0]


def rules(fitted=None) -> list[tuple]:
    """Every rule of the served family, or with ``fitted`` every threshold of the stacker's score."""
    from neurocbir.training.presence_choice import THRESHOLDS, VETOES, WEIGHTS

    if fitted is not None:
        return [("stacked", t) for t in np.round(np.arange(0.05, 1.0, 0.05), 2)]
    return [("served", t, veto, w) for w in WEIGHTS for veto in VETOES for t in THRESHOLDS]


def answers(s: dict, rule: tuple, fitted=None) -> np.ndarray:
    """The 'no tumor' answers of one rule on the slices ``s``."""
    from neurocbir.classify.presence import PresenceRule

    if rule[0] == "stacked":
        return fitted.predict_proba(features(s))[:, 1] > rule[1]
    _, t, veto, w = rule
    return PresenceRule(t, veto, decoder_weight=w).no_tumor(s["p"], s["peak"])


def count_answers(totals: dict, s: dict, no_tumor: np.ndarray, prefix: tuple = ()) -> None:
    """Add one run's held-out 'no tumor' answers to ``totals``: (*prefix, source, 'none' | 'tumor')
    -> [slices called 'no tumor', slices], no-tumor and tumor slices of each source apart."""
    held = ~s["trained"]
    for src in sorted(set(s["source"][held])):
        for want, label in ((~s["tumor"], "none"), (s["tumor"], "tumor")):
            at = held & (s["source"] == src) & want
            cell = totals.setdefault((*prefix, src, label), [0, 0])
            cell[0] += int(no_tumor[at].sum())
            cell[1] += int(at.sum())


def describe(rule: tuple) -> str:
    if rule[0] == "stacked":
        return f"regression > {float(rule[1]):.2f}"
    _, t, veto, w = rule
    return f"P and peak, weight {w} > {t}, veto {veto}" if w else f"P(no tumor) > {t}, veto {veto}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="runs of one recipe, one per test fold")
    ap.add_argument("--cache", type=Path, default=Path("runs/presence-features"))
    args = ap.parse_args()
    from neurocbir.data.cases import default_data_dir, load_cases

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    table = load_cases(default_data_dir())
    folds = [int(json.loads((r / "config.json").read_text())["fold"]) for r in args.runs]
    if len(set(folds)) < len(folds):
        raise SystemExit("give one run per test fold")
    runs = [scored(r, table, args.cache) for r in args.runs]
    totals: dict = {}
    chosen = []
    for i, fold in enumerate(folds):
        others = [s for j, s in enumerate(runs) if j != i]  # less their figshare slices of this test fold
        choice = {k: np.concatenate([o[k][o["fold"] != fold] for o in others]) for k in KEYS}
        test = runs[i]
        fitted = stacker(choice)
        for kind, fit in (("served", None), ("stacked", fitted)):
            rule = choose(choice, {r: answers(choice, r, fit) for r in rules(fit)})
            chosen.append((fold, rule))
            count_answers(totals, test, answers(test, rule, fit), (kind,))
    sources = sorted({src for _, src, _ in totals})

    def cell(kind: str, src: str) -> str:
        (fn, nn), (ft, nt) = totals.get((kind, src, "none"), [0, 0]), totals.get((kind, src, "tumor"), [0, 0])
        a = f"{fn / nn:.3f} ({fn}/{nn})" if nn else "-"
        return f"{a} / {ft / nt:.3f} ({ft}/{nt})" if nt else f"{a} / -"

    def mean_found(kind: str) -> float:
        shares = [
            totals[(kind, s, "none")][0] / totals[(kind, s, "none")][1]
            for s in sources
            if totals.get((kind, s, "none"), [0, 0])[1]
        ]
        return float(np.mean(shares))

    rows = [
        f"| {name} | " + " | ".join(cell(kind, s) for s in sources) + f" | {mean_found(kind):.3f} |"
        for kind, name in (
            ("served", "P(no tumor) and the peak (the served family)"),
            ("stacked", "logistic regression on P, peak, top 1 %, area"),
        )
    ]
    body = [
        "## Tumor presence from more of the decoder's evidence, leave one run out (issue 38, item 5)",
        "",
        "Command: `python benchmarks/presence_features.py --runs "
        + " ".join(str(r) for r in args.runs)
        + f"` | machine: {machine()} | {started} | {time.time() - t0:.0f} s",
        "",
        "For each run (one per test fold), each kind of rule is chosen on the other runs' held-out slices "
        "(figshare slices of this run's test fold left out) as `neurocbir calibrate --presence` chooses, and "
        "applied to this run's held-out slices; the counts are summed over the runs. Per source: held-out "
        "no-tumor slices called 'no tumor' / held-out tumor slices called 'no tumor' (TCGA tumors under 1 % "
        "of the slice and held-out twins of trained-on slices left out). The validation part and the test "
        "folds are not read.",
        "",
        "| rule | " + " | ".join(sources) + " | no tumor found, mean over the sources |",
        "|---|" + "---|" * (len(sources) + 1),
        *rows,
        "",
        "Chosen per run: " + "; ".join(f"fold {f}: {describe(r)}" for f, r in chosen) + ".",
    ]
    write_section("presence-features", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
