"""The lesion recipe's figures for docs/results.md (issue 9): the GPU run's own metrics (from its
summary.json), and the committed model on the app's path here (full-resolution bundled data,
float16 weights, CPU): kappa, AUROC, accuracy, calibration, and the query tumor outline against
the dataset's masks on fold 5.

    OUT=runs/gpu bash benchmarks/gpu_recipe.sh                 # on a GPU machine (see its header)
    .venv/bin/python benchmarks/lesion_results.py --summary runs/gpu/summary.json [--model models/lesion-fold5]

Nothing here is tuned: the recipe's settings were fixed before training, the served trial is
seed 0, and the test fold (5) is read once per reported configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section

ROOT = Path(__file__).resolve().parents[1]


def device_table(summary: dict) -> list[str]:
    rows = [
        "| test fold | trials | NIR kappa mean ± sd / ens. | NIR AUROC ens. | I-NIR kappa ens. | KNN-7 kappa ens. "
        "| KNN-K by inner CV: kappa | tumor Dice median / mean (seed 0) | area error median (seed 0) | s per trial |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fold, res in summary["folds"].items():
        m, t = res["metrics"], res["timings"]
        c = m["classifiers"]
        tum = t.get("tumor_outline", {})
        rows.append(
            f"| {fold} | {m['trials']} | {c['nir']['kappa_mean']:.3f} ± {c['nir']['kappa_std']:.3f} / "
            f"{c['nir']['kappa_ensemble']:.3f} | {c['nir']['auroc_ensemble']:.3f} | {c['inir']['kappa_ensemble']:.3f} "
            f"| {c['knn7']['kappa_ensemble']:.3f} | {m['knn_overfit']['kappa_cv_k']:.3f} "
            f"| {tum.get('median_dice', float('nan')):.3f} / {tum.get('mean_dice', float('nan')):.3f} "
            f"| {100 * tum.get('median_area_rel_error', float('nan')):.0f} % | {np.median(t['trials_s']):.0f} |"
        )
    return rows


def app_path(model: Path) -> tuple[list[str], dict]:
    """The committed model as the app serves it: indexed from the full-resolution data here."""
    from skimage.draw import polygon

    from neurocbir.classify import NIRClassifier
    from neurocbir.evaluate import evaluate_run
    from neurocbir.ingest import index_run
    from neurocbir.runs import trial_seeds
    from neurocbir.service import RetrievalService

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
    from neurocbir.evaluate import calibration_markdown

    rows += ["", "Calibration of the served model (fitted by inner CV on folds 1-4; ECE on fold 5, 10 bins):"]
    rows += calibration_markdown([result]) or ["", "(the model has no calibration.json)"]
    return rows, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--summary", type=Path, required=True, help="summary.json written by benchmarks/gpu_recipe.sh")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "lesion-fold5")
    args = p.parse_args()
    summary = json.loads(args.summary.read_text())
    t0 = time.time()
    served_rows, served = app_path(args.model)
    s = summary["settings"]
    body = [
        "## Lesion recipe: whole network + tumor decoder, fine-tuned on a GPU (issue 9)",
        "",
        f"**GPU run.** Command: `OUT=... bash benchmarks/gpu_recipe.sh` on {summary['device']} (torch "
        f"{summary['torch']}), {summary['date']}, data `{summary['data']}` (the 256 px copy; {summary['n_cases']} "
        f"slices), {summary['seconds']:.0f} s in all. Settings, fixed before training and not tuned on any fold: "
        f"{s['epochs']} epochs, batch {s['batch_size']}, {s['image_size']} px, lr {s['lr']} (head, decoder) / "
        f"{s['lr_trunk']} (trunk), dropout {s['dropout']}, SupCon + Dice/CE on the mask, fresh random augmentation "
        "every step. Fold 5 first with 5 trials (and its 3 inner-CV trainings for calibration), then the other "
        "folds while the 9-minute budget lasted. Each test fold is read once, to report; the KNN K column is "
        "the KNN kappa with K picked by patient-grouped CV inside the training folds.",
        "",
        *device_table(summary),
        "",
        f"**The model the app serves** (`{args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model}`"
        ", fold 5's seed-0 trial of the run above, float16): indexed and evaluated here from the full-resolution "
        f"bundled data. Command: `python benchmarks/lesion_results.py {' '.join(sys.argv[1:])}` | machine: "
        f"{machine()} | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {time.time() - t0:.0f} s",
        "",
        *served_rows,
    ]
    write_section("lesion", "\n".join(body))
    print("\n".join(body))
    print(json.dumps(served))


if __name__ == "__main__":
    main()
