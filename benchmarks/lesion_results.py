"""The lesion recipe's figures for docs/results.md (issue 9): the GPU run's own metrics (from its
summary.json), and the committed model on the app's path here (full-resolution bundled data,
float16 weights, CPU): kappa, AUROC, accuracy, calibration, and the query tumor outline against
the dataset's masks on fold 5.

    OUT=runs/gpu bash tools/remote-gpu/recipe.sh                 # on a GPU machine (see its header)
    OUT=runs/gpu2 bash tools/remote-gpu/recipe.sh --folds 2,3,4 --no-serve   # more folds, later (optional)
    OUT=runs/gpu3 bash tools/remote-gpu/parallel.sh "--no-serve --folds 1" "--no-serve --folds 2"   # jobs at once
    .venv/bin/python benchmarks/lesion_results.py --summary runs/gpu/summary.json [runs/gpu2/summary.json ...] \
        [--model models/lesion-fold5]
    # on a checkout without the earlier runs' summaries: keep their rows, add later runs (one argument
    # per run; the jobs of one parallel.sh call joined by commas)
    .venv/bin/python benchmarks/lesion_results.py --keep-recorded --summary runs/gpu3/job1/summary.json,runs/gpu3/job2/summary.json

Nothing here is tuned: the recipe's settings were fixed before training, the served trial is
seed 0, and the test fold (5) is read once per reported configuration.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from results_doc import machine, read_section, write_section

ROOT = Path(__file__).resolve().parents[1]


HEADER = [
    "| run | test fold | trials | NIR kappa mean ± sd / ens. | NIR AUROC ens. | I-NIR kappa ens. | KNN-7 kappa ens. "
    "| KNN-K by inner CV: kappa | tumor Dice median / mean (seed 0) | area error median (seed 0) | s per trial |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]
NUMBERS = ("nir_mean", "nir_ens", "auroc", "inir", "knn7", "knnk", "dice_med", "dice_mean", "area")


def fold_record(run: str, fold: str, res: dict) -> dict:
    """One (run, test fold) of a summary.json as a table row's values."""
    m, t = res["metrics"], res["timings"]
    c, tum = m["classifiers"], t.get("tumor_outline", {})
    return {
        "run": run,
        "fold": fold,
        "trials": m["trials"],
        "nir_mean": c["nir"]["kappa_mean"],
        "nir_sd": c["nir"]["kappa_std"],
        "nir_ens": c["nir"]["kappa_ensemble"],
        "auroc": c["nir"]["auroc_ensemble"],
        "inir": c["inir"]["kappa_ensemble"],
        "knn7": c["knn7"]["kappa_ensemble"],
        "knnk": m["knn_overfit"]["kappa_cv_k"],
        "ks": ",".join(map(str, m["knn_overfit"]["cv_k_per_trial"])),
        "dice_med": tum.get("median_dice", float("nan")),
        "dice_mean": tum.get("mean_dice", float("nan")),
        "area": tum.get("median_area_rel_error", float("nan")),
        "s_trial": float(np.median(t["trials_s"])),
    }


def recorded_records(body: str) -> list[dict]:
    """The (run, fold) rows as the lesion section of docs/results.md last recorded them: a new
    checkout has no earlier run's summary.json (they stay on the machine that ran them)."""
    out = []
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 11 or not re.fullmatch(r"[a-z]", cells[0]):
            continue
        nir = re.fullmatch(r"([\d.]+) ± ([\d.]+) / ([\d.]+)", cells[3])
        knnk = re.fullmatch(r"([\d.]+) \(K ([\d,]+)\)", cells[7])
        dice = cells[8].split(" / ")
        out.append(
            {
                "run": cells[0],
                "fold": cells[1],
                "trials": int(cells[2]),
                "nir_mean": float(nir[1]),
                "nir_sd": float(nir[2]),
                "nir_ens": float(nir[3]),
                "auroc": float(cells[4]),
                "inir": float(cells[5]),
                "knn7": float(cells[6]),
                "knnk": float(knnk[1]),
                "ks": knnk[2],
                "dice_med": float(dice[0]),
                "dice_mean": float(dice[1]),
                "area": float(cells[9].removesuffix(" %")) / 100,
                "s_trial": float(cells[10]),
            }
        )
    return out


def device_table(records: list[dict]) -> list[str]:
    """One row per (GPU run, test fold), and the mean over folds of each fold's first run with the
    most trials (a rule fixed before any score was seen, never the best score)."""
    rows = list(HEADER)
    chosen: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: (int(r["fold"]) % 5, r["run"])):  # fold 5 first, as the runs were planned
        if r["fold"] not in chosen or r["trials"] > chosen[r["fold"]]["trials"]:
            chosen[r["fold"]] = r
        rows.append(
            f"| {r['run']} | {r['fold']} | {r['trials']} | {r['nir_mean']:.3f} ± {r['nir_sd']:.3f} / {r['nir_ens']:.3f} "
            f"| {r['auroc']:.3f} | {r['inir']:.3f} | {r['knn7']:.3f} | {r['knnk']:.3f} (K {r['ks']}) "
            f"| {r['dice_med']:.3f} / {r['dice_mean']:.3f} | {100 * r['area']:.0f} % | {r['s_trial']:.0f} |"
        )
    if len(chosen) > 1:
        mean = {k: float(np.mean([r[k] for r in chosen.values()])) for k in NUMBERS}
        runs = ", ".join(f"{f}: {chosen[f]['run']}" for f in sorted(chosen))
        rows.append(
            f"| mean of {len(chosen)} folds ({runs}) | {','.join(sorted(chosen))} | | {mean['nir_mean']:.3f} / "
            f"{mean['nir_ens']:.3f} | {mean['auroc']:.3f} | {mean['inir']:.3f} | {mean['knn7']:.3f} | {mean['knnk']:.3f} "
            f"| {mean['dice_med']:.3f} / {mean['dice_mean']:.3f} | {100 * mean['area']:.0f} % | |"
        )
    return rows


def app_path(model: Path, calibration_note: str = "fitted by inner CV on folds 1-4") -> tuple[list[str], dict]:
    """The committed model as the app serves it: indexed from the full-resolution data here."""
    from skimage.draw import polygon

    from neurocbir.classify.neighbors import NIRClassifier
    from neurocbir.evaluate.run import evaluate_run
    from neurocbir.models.runs import trial_seeds
    from neurocbir.retrieval.ingest import index_run
    from neurocbir.serving.service import RetrievalService

    if not trial_seeds(model):
        index_run(model)
    result = evaluate_run(model, plots=False)
    svc = RetrievalService.from_run(model)
    table = svc.cases.table
    emb = np.load(model / f"trial_{svc.trial}" / "embeddings.npz")
    y_a, y_q = table.label[emb["archive_rows"]], table.label[emb["test_rows"]]
    pred = NIRClassifier().fit(emb["archive"], y_a).predict(emb["test"])
    accuracy = float(np.mean(pred == y_q))
    dice, rel, none = [], [], 0
    for r in emb["test_rows"]:
        image, mask = table.load_image(r), table.load_mask(r)
        t = svc.query(image)["query_tumor"]
        if t is None:
            none += 1
            dice.append(0.0)
            continue
        xy = np.array(t["outline"])
        drawn = np.zeros(image.shape, bool)
        drawn[polygon(xy[:, 1], xy[:, 0], image.shape)] = True
        dice.append(2 * float((drawn & mask).sum()) / max(int(drawn.sum() + mask.sum()), 1))
        rel.append(abs(t["area_mm2"] - table.area_mm2[r]) / table.area_mm2[r])
    c = result["classifiers"]
    out = {
        "accuracy": accuracy,
        "nir_kappa": c["nir"]["kappa_mean"],
        "nir_auroc": c["nir"]["auroc_mean"],
        "knn7_kappa": c["knn7"]["kappa_mean"],
        "tumor_median_dice": float(np.median(dice)),
        "tumor_mean_dice": float(np.mean(dice)),
        "tumor_median_area_error": float(np.median(rel)),
        "no_outline": none,
        "n": len(dice),
    }
    rows = [
        "| served model (seed 0), app path on this CPU | value |",
        "|---|---|",
        f"| NIR accuracy | {accuracy:.3f} |",
        f"| NIR kappa / AUROC | {c['nir']['kappa_mean']:.3f} / {c['nir']['auroc_mean']:.3f} |",
        f"| I-NIR kappa / KNN-7 kappa | {c['inir']['kappa_mean']:.3f} / {c['knn7']['kappa_mean']:.3f} |",
        f"| query tumor outline: Dice median / mean (vs the 512 px masks, polygon as served) | "
        f"{out['tumor_median_dice']:.3f} / {out['tumor_mean_dice']:.3f} |",
        f"| query tumor area: median relative error (assumed 0.49 mm spacing, as for a PNG) | "
        f"{100 * out['tumor_median_area_error']:.0f} % |",
        f"| slices with no tumor outlined | {none} of {len(dice)} |",
    ]
    from neurocbir.evaluate.tables import calibration_markdown

    rows += ["", f"Calibration of the served model ({calibration_note}; ECE on fold 5, 10 bins):"]
    rows += calibration_markdown([result]) or ["", "(the model has no calibration.json)"]
    return rows, out


def run_sentence(letter: str, jobs: list[dict], paths: list[Path]) -> str:
    """How a later run (one summary.json, or the jobs of one tools/remote-gpu/parallel.sh call) was made."""
    first = jobs[0]
    folds = [f for job in jobs for f in job["folds"]]
    # the call's every job left its options beside its folder, those without a summary.json too
    options = sorted({o for p in paths for o in p.parent.parent.glob("job*/options.txt")})
    how = ""
    if len(options) > 1:
        others = [
            o.read_text().split(": ", 1)[-1].strip() for o in options if not (o.parent / "summary.json").is_file()
        ]
        how = (
            f"{len(options)} jobs at once on the one GPU (`tools/remote-gpu/parallel.sh`, so its s per trial is a "
            "shared GPU's" + "".join(f"; beside them `{o}`" for o in others) + "), "
        )
    if any(job.get("compiled") for job in jobs):
        how += "trained through `torch.compile` (`--compile`; the same recipe, fused kernels), "
    if "merged_from" in first:  # one fold's trials from several leases (tools/remote-gpu/merge_runs.py)
        parts = "; ".join(
            f"seeds {','.join(map(str, m['seeds']))} on {m['date']}{' (compiled)' if m.get('compiled') else ''}"
            for m in first["merged_from"]
        )
        how += f"trials of several leases ensembled by `tools/remote-gpu/merge_runs.py` ({parts}), "
    return (
        f"Run {letter}, {first['date']} on {first['device']}: the same recipe with `--no-serve` (no calibration, "
        f"no served checkpoint), {how}folds {', '.join(folds)}, {max(j['seconds'] for j in jobs):.0f} s. "
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--summary",
        nargs="*",
        default=[],
        help="summary.json of tools/remote-gpu/recipe.sh runs: the first trained the served model, later ones "
        "(--no-serve) more folds. Join with commas the summaries of the jobs of one parallel.sh call.",
    )
    p.add_argument(
        "--keep-recorded",
        action="store_true",
        help="keep the runs this section of docs/results.md recorded (their summary.json files are not on this "
        "checkout); the given summaries are later runs",
    )
    p.add_argument("--model", type=Path, default=ROOT / "models" / "lesion-fold5")
    args = p.parse_args()
    paths = [[Path(path) for path in arg.split(",")] for arg in args.summary]
    groups = [[json.loads(path.read_text()) for path in group] for group in paths]
    records: list[dict] = []
    if args.keep_recorded:
        body = read_section("lesion") or ""
        records = recorded_records(body)
        first_paragraph = re.search(r"\*\*GPU run\.\*\* .*?(?= Each run reads)", body)
        if not records or not first_paragraph:
            sys.exit("docs/results.md has no lesion section to keep: give the first run's summary.json instead")
        intro = first_paragraph.group(0) + " "
    else:
        if not groups:
            sys.exit("give the GPU runs' summary.json files (--summary), or --keep-recorded")
        paths.pop(0)
        summary = groups.pop(0)[0]
        s = summary["settings"]
        intro = (
            f"**GPU run.** Command: `OUT=... bash tools/remote-gpu/recipe.sh` on {summary['device']} (torch "
            f"{summary['torch']}), {summary['date']}, data `{summary['data']}` (the 256 px copy; {summary['n_cases']} "
            f"slices), {summary['seconds']:.0f} s in all. Settings, fixed before training and not tuned on any fold: "
            f"{s['epochs']} epochs, batch {s['batch_size']}, {s['image_size']} px, lr {s['lr']} (head, decoder) / "
            f"{s['lr_trunk']} (trunk), dropout {s['dropout']}, SupCon + Dice/CE on the mask, fresh random augmentation "
            "every step. Fold 5 first with 5 trials (and its 3 inner-CV trainings for calibration), then the other "
            "folds while the 9-minute budget lasted (run a). "
        )
        records = [fold_record("a", fold, res) for fold, res in summary["folds"].items()]
    letter = chr(max((ord(r["run"]) for r in records), default=ord("a") - 1) + 1)
    for jobs, job_paths in zip(groups, paths):
        intro += run_sentence(letter, jobs, job_paths)
        records += [fold_record(letter, fold, res) for job in jobs for fold, res in job["folds"].items()]
        letter = chr(ord(letter) + 1)
    t0 = time.time()
    served_rows, served = app_path(args.model)
    level = (
        json.loads((args.model / "tumor_level.json").read_text())
        if (args.model / "tumor_level.json").is_file()
        else None
    )
    body = [
        "## Lesion recipe: whole network + tumor decoder, fine-tuned on a GPU (issue 9)",
        "",
        intro + "Each run reads its test folds once, to report. A fold in several runs is the same configuration "
        "trained again, so its rows show the run-to-run spread of GPU training; the mean row takes, for each "
        "fold, the first run with the most trials (a fixed rule, never the better score). The KNN K column "
        "is the KNN kappa with K picked by patient-grouped CV inside the training folds, per trial (K 1 decides "
        "as NIR does: the nearest case's class)."
        + (
            " Rows of runs whose summary.json is not on this checkout are carried from this section's previous "
            "version, so the mean row averages figures rounded to 3 decimals."
            if args.keep_recorded
            else ""
        ),
        "",
        *device_table(records),
        "",
        f"**The model the app serves** (`{args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model}`"
        ", fold 5's seed-0 trial of run a, float16): indexed and evaluated here from the full-resolution "
        "bundled data. "
        + (
            f"Its tumor outline is drawn at probability {level['level']} ({level['how']}). "
            if level
            else "Its tumor outline is drawn at probability 0.5 (no outline level fitted). "
        )
        + f"Command: `python benchmarks/lesion_results.py {' '.join(sys.argv[1:])}` | machine: "
        f"{machine()} | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {time.time() - t0:.0f} s",
        "",
        *served_rows,
    ]
    write_section("lesion", "\n".join(body))
    print("\n".join(body))
    print(json.dumps(served))


if __name__ == "__main__":
    main()
