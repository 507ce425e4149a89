"""The lesion recipe on one GPU machine, within a time budget: 5 trials on fold 5 (with the
inner-CV calibration), then the other folds while time remains; metrics of each fold, and
the served checkpoint (fold 5, first seed: chosen before any test score was seen), land in OUT.

Run through ``tools/remote-gpu/recipe.sh`` (it installs the carried wheels and sets PYTHONPATH).
A user with a GPU of their own needs none of this: ``neurocbir train`` picks the GPU preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from neurocbir.classify import calibration
from neurocbir.data.cases import load_cases
from neurocbir.evaluate.run import evaluate_trial, summarize_trials
from neurocbir.files import atomic_write, write_json
from neurocbir.models.runs import LESION_DEFAULTS, TrainConfig, trial_dir, trial_seeds
from neurocbir.training.lesion_run import recalibrate_lesion_run, train_lesion_run

EVALUATION = "evaluation.npz"  # a trial's test-fold figures, kept beside its embeddings


def small_subset(table, per_group: int):
    """``per_group`` slices of each (fold, class), for a smoke run on a CPU."""
    rows = [
        np.flatnonzero((table.fold == f) & (table.label == c))[:per_group] for f in set(table.fold) for c in (0, 1, 2)
    ]
    return table.subset(np.sort(np.concatenate(rows)))


def evaluate_and_keep(run: Path, table) -> dict:
    """The run's metrics (as `neurocbir evaluate` computes them), keeping each trial's evaluation as
    ``evaluation.npz`` beside it: the small file merge_runs.py ensembles trials of several sittings from."""
    calibrators = calibration.load(run)
    evaluations = []
    for seed in trial_seeds(run, needs="embeddings.npz"):
        ev = evaluate_trial(trial_dir(run, seed), table, calibrators=calibrators)
        atomic_write(trial_dir(run, seed) / EVALUATION, lambda tmp, ev=ev: np.savez(tmp, **ev))
        evaluations.append(ev)
    metrics = summarize_trials(run, json.loads((run / "config.json").read_text()), evaluations, calibrators)
    write_json(run / "metrics.json", metrics)
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", default=None, help="timm-named EfficientNet-Lite2 weights (default: the package's)")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--extra-cases",
        default=None,
        help="also train on this other-hospitals folder's development part (neurocbir train --extra-cases)",
    )
    ap.add_argument("--runs", default=None, help="where the run folders go (default OUT/runs)")
    ap.add_argument("--folds", default="5,1,2,3,4")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="train seeds S..S+trials-1: more trials for a fold begun in an earlier lease "
        "(tools/remote-gpu/merge_runs.py ensembles them)",
    )
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting trainings after this")
    ap.add_argument(
        "--no-serve",
        action="store_true",
        help="metrics only (more folds for an earlier run): no inner-CV calibration, no served checkpoint",
    )
    ap.add_argument(
        "--recalibrate",
        default=None,
        help="only refit this lesion run's calibration and outline level by inner CV (3 trainings), into OUT",
    )
    ap.add_argument("--per-group", type=int, default=0, help="smoke test: slices per (fold, class); 0 = all")
    for key in ("epochs", "batch_size", "image_size"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=LESION_DEFAULTS[key])
    ap.add_argument("--decoder-stride", type=int, default=4, help="the tumor map's stride: 4, or 2 (finer outlines)")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="train through torch.compile (fewer, fused kernels; trials fall back to eager if it fails)",
    )
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    start = time.time()
    deadline = start + args.budget_s
    out = Path(args.out)
    table = load_cases(args.data)
    if args.per_group:
        table = small_subset(table, args.per_group)
    if args.recalibrate:  # e.g. the committed model, trained before the outline level was fitted by inner CV
        config = json.loads((Path(args.recalibrate) / "config.json").read_text())
        cfg = TrainConfig(**{**config, "data": args.data, "weights": args.weights})
        write_json(out / "config.json", dataclasses.asdict(cfg))
        recalibrate_lesion_run(out, table, cfg, compile_net=args.compile)
        print(json.dumps({"seconds": round(time.time() - start, 1), "recalibrated": args.recalibrate}))
        return
    folds = [int(f) for f in args.folds.split(",")]
    summary = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "n_cases": len(table),
        "data": Path(args.data).name,
        "extra_cases": Path(args.extra_cases).name if args.extra_cases else None,
        "compiled": args.compile,
        "settings": {
            **LESION_DEFAULTS,
            **{k: getattr(args, k) for k in ("epochs", "batch_size", "image_size", "decoder_stride")},
        },
        "folds": {},
    }
    for n, fold in enumerate(folds):
        if n and time.time() > deadline:
            break
        cfg = TrainConfig(
            **{**LESION_DEFAULTS, "epochs": args.epochs, "batch_size": args.batch_size, "image_size": args.image_size},
            decoder_stride=args.decoder_stride,
            recipe="lesion",
            fold=fold,
            trials=args.trials,
            first_seed=args.first_seed,
            weights=args.weights,
            calibrate=n == 0 and not args.no_serve,
            data=args.data,
            extra_cases=args.extra_cases,
        )
        run = Path(args.runs or out / "runs") / f"lesion-fold{fold}"
        timings = train_lesion_run(
            cfg,
            run,
            table,
            deadline=deadline,
            progress=False,
            on_trial=lambda seed, s, fold=fold: print(f"fold {fold} seed {seed}: {s:.1f} s", flush=True),
            score_test_outline=True,  # each fold's test scores are this run's report
            compile_net=args.compile,
        )
        if not timings["trials_s"]:
            break
        metrics = evaluate_and_keep(run, table)
        summary["folds"][str(fold)] = {"timings": timings, "metrics": metrics}
        cls = metrics["classifiers"]
        print(
            f"fold {fold}: {len(timings['trials_s'])} trials in {sum(timings['trials_s']):.0f} s; "
            f"NIR kappa mean {cls['nir']['kappa_mean']:.3f} ens {cls['nir']['kappa_ensemble']:.3f} "
            f"AUROC ens {cls['nir']['auroc_ensemble']:.3f}; KNN-7 ens {cls['knn7']['kappa_ensemble']:.3f}; "
            f"tumor outline {timings['tumor_outline']}",
            flush=True,
        )
        if n == 0 and not args.no_serve:  # the served model
            tdir = trial_dir(run, cfg.first_seed)
            shutil.copy(tdir / "checkpoint.pt", out / "checkpoint.pt")
            for name in ("config.json", "calibration.json", "study_calibration.json", "tumor_level.json"):
                if (run / name).is_file():
                    shutil.copy(run / name, out / name)
        summary["seconds"] = round(time.time() - start, 1)
        write_json(out / "summary.json", summary)
    print(json.dumps({"seconds": round(time.time() - start, 1), "folds": list(summary["folds"])}))


if __name__ == "__main__":
    main()
