"""One fold's trials from several GPU leases, ensembled as one run (issue 9: 5 trials per fold).

A lease lasts minutes, so a fold's five trials may be trained over several leases
(``recipe.py --first-seed S``). What comes back from each is small: every trial's
``evaluation.npz`` (its test-fold probabilities and figures, no embeddings). This puts those trials
in one run folder, scores the ensemble with ``neurocbir.evaluate.run.summarize_trials`` (what
`neurocbir evaluate` does after scoring each trial), and writes a
summary.json in recipe.py's format for ``benchmarks/lesion_results.py``:

    .venv/bin/python tools/remote-gpu/merge_runs.py --fold 3 --out runs/merged-fold3 runs/leaseA/job1 runs/leaseB/job2

Each source is a recipe.py output folder (summary.json, runs/lesion-foldF/trial_*/evaluation.npz).
Every trial keeps its seed; a seed found twice, or a different recipe, is refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from neurocbir.evaluate.run import summarize_trials
from neurocbir.files import write_json
from neurocbir.models.runs import trial_dir, trial_seeds

TRIAL_EVALUATION = "evaluation.npz"  # what recipe.py keeps of each trial
SAME_RECIPE_EXCEPT = {"trials", "first_seed", "data", "weights"}  # what may differ between leases


def merge(fold: int, sources: list[Path], out: Path) -> dict:
    """Copy the fold's trial evaluations of every source into ``out``, score them together and
    return the merged summary (also written as ``out/summary.json``). If anything fails, ``out``
    is removed again, so a rerun never meets a half-written folder."""
    if out.exists():
        raise FileExistsError(f"{out} exists: give a new folder")
    try:
        return _merge(fold, sources, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _merge(fold: int, sources: list[Path], out: Path) -> dict:
    runs, summaries, seen = [], [], {}
    for src in sources:
        run = src / "runs" / f"lesion-fold{fold}"
        if not (src / "summary.json").is_file() or not (run / "config.json").is_file():
            raise FileNotFoundError(f"{src} holds no recipe.py run of fold {fold} (summary.json, {run}/config.json)")
        summary = json.loads((src / "summary.json").read_text())
        if str(fold) not in summary["folds"]:
            raise ValueError(f"{src}/summary.json has no finished fold {fold}")
        runs.append(run)
        summaries.append(summary)
        for seed in trial_seeds(run, needs=TRIAL_EVALUATION):
            if seed in seen:
                raise ValueError(f"seed {seed} of fold {fold} is in both {seen[seed]} and {src}")
            seen[seed] = src
    if not seen:
        raise ValueError(f"no trial of fold {fold} has an {TRIAL_EVALUATION} in {', '.join(map(str, sources))}")
    configs = [json.loads((r / "config.json").read_text()) for r in runs]
    recipe = [{k: v for k, v in c.items() if k not in SAME_RECIPE_EXCEPT} for c in configs]
    for src, r in zip(sources[1:], recipe[1:]):
        if r != recipe[0]:
            diff = sorted(k for k in r.keys() | recipe[0].keys() if r.get(k) != recipe[0].get(k))
            raise ValueError(f"{src} trained another recipe than {sources[0]} (differs in {', '.join(diff)})")
    for run in runs:
        for seed in trial_seeds(run, needs=TRIAL_EVALUATION):
            trial_dir(out, seed).mkdir(parents=True)
            shutil.copy(trial_dir(run, seed) / TRIAL_EVALUATION, trial_dir(out, seed) / TRIAL_EVALUATION)
    seeds = sorted(seen)
    config = {**configs[0], "trials": len(seeds), "first_seed": seeds[0]}
    write_json(out / "config.json", config)
    folds = [s["folds"][str(fold)] for s in summaries]
    timings = {"trials_s": [t for f in folds for t in f["timings"]["trials_s"]]}
    outline = [f["timings"]["tumor_outline"] for f in folds if f["timings"].get("tumor_outline", {}).get("seed") == 0]
    if outline:  # the seed-0 trial's outline scores, as in every other row
        timings["tumor_outline"] = outline[0]
    write_json(out / "timings.json", timings)
    evaluations = []
    for seed in seeds:
        with np.load(trial_dir(out, seed) / TRIAL_EVALUATION) as saved:
            evaluations.append(dict(saved))
    metrics = summarize_trials(out, config, evaluations, calibrators=None)
    write_json(out / "metrics.json", metrics)
    merged = {
        **{k: summaries[0][k] for k in ("device", "torch", "n_cases", "data", "settings")},
        "date": max(s["date"] for s in summaries),
        "seconds": sum(s["seconds"] for s in summaries),
        "merged_from": [
            {
                "source": str(src),
                "date": s["date"],
                "seeds": sorted(k for k, v in seen.items() if v == src),
                "compiled": bool(s.get("compiled")),
            }
            for src, s in zip(sources, summaries)
        ],
        "folds": {str(fold): {"timings": timings, "metrics": metrics}},
    }
    write_json(out / "summary.json", merged)
    return merged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("sources", type=Path, nargs="+", help="recipe.py output folders (one per lease or job)")
    args = p.parse_args()
    try:
        merged = merge(args.fold, args.sources, args.out)
    except (OSError, ValueError) as err:
        sys.exit(f"merge_runs.py: {err}")
    nir = merged["folds"][str(args.fold)]["metrics"]["classifiers"]["nir"]
    print(
        f"fold {args.fold}: {merged['folds'][str(args.fold)]['metrics']['trials']} trials from {len(args.sources)} "
        f"sources; NIR kappa mean {nir['kappa_mean']:.3f} ens {nir['kappa_ensemble']:.3f} -> {args.out}/summary.json"
    )


if __name__ == "__main__":
    main()
