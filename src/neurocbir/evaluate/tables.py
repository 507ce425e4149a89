"""A run's figures as Markdown tables (the paper's Tables 1 and 3, structure, KNN overfit,
calibration) and plots (latent space, KNN curve, reliability diagram)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neurocbir.classify.calibration import expected_calibration_error, reliability_bins
from neurocbir.data.cases import CLASS_NAMES, CaseTable
from neurocbir.evaluate.metrics import TSD_KS


def markdown_tables(results: list[dict]) -> str:
    """Tables 1/3-style (kappa and AUROC per classifier), structure metrics and KNN overfit."""
    names = ["knn5", "knn7", "knn25", "nir", "inir", "mlp"]
    lines = [
        "| loss | fold | trials | " + " | ".join(f"{n} A-CK / E-CK" for n in names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for r in results:
        c = r["classifiers"]
        cells = [f"{c[n]['kappa_mean']:.3f} / {c[n]['kappa_ensemble']:.3f}" if n in c else "-" for n in names]
        lines.append(f"| {r['loss']} | {r['fold']} | {r['trials']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| loss | fold | " + " | ".join(f"{n} AUROC mean / ens." for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in results:
        c = r["classifiers"]
        cells = [f"{c[n]['auroc_mean']:.3f} / {c[n]['auroc_ensemble']:.3f}" if n in c else "-" for n in names]
        lines.append(f"| {r['loss']} | {r['fold']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| loss | fold | plane consistency top-5 | "
        + " | ".join(f"TSD@{k} (mm²)" for k in TSD_KS)
        + " | KNN best K on test (kappa) | KNN K by inner CV, final embeddings (kappa) "
        "| KNN K by inner CV, tops retrained (kappa) | NIR kappa: inner CV / test |",
        "|---|---|---|" + "---|" * len(TSD_KS) + "---|---|---|---|",
    ]
    for r in results:
        s, o = r["structure"], r["knn_overfit"]
        pc = "-" if s["anatomical_consistency_top5"] is None else f"{s['anatomical_consistency_top5']:.3f}"
        retrained = (
            f"{o['k_inner_cv_retrained']} ({o['kappa_k_inner_cv_retrained']:.3f})"
            if "k_inner_cv_retrained" in o
            else "-"
        )
        inner = r.get("inner_cv") or {}
        nir_inner = f"{inner['kappa']['nir']:.3f}" if inner else "-"
        lines.append(
            f"| {r['loss']} | {r['fold']} | {pc} | "
            + " | ".join(f"{s['tsd_mm2_at_k'][str(k)]:.0f}" for k in TSD_KS)
            + f" | {o['best_k_on_test']} ({o['kappa_best_k_on_test']:.3f}) | "
            f"{'/'.join(map(str, o['cv_k_per_trial']))} ({o['kappa_cv_k']:.3f}) | {retrained} | "
            f"{nir_inner} / {o['nir_kappa_mean']:.3f} |"
        )
    lines += retrieval_markdown(results)
    lines += calibration_markdown(results)
    return "\n".join(lines) + "\n"


def retrieval_markdown(results: list[dict]) -> list[str]:
    """mAP and precision at k (relevant: same tumor type), ensemble and mean of trials, over every
    archive slice and over one slice per patient."""
    rows = [r for r in results if r.get("retrieval")]
    if not rows:
        return []
    lines = [
        "",
        "| loss | fold | ranking | mAP: ens. / mean | P@1: ens. / mean | P@5: ens. / mean | P@10: ens. / mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ens, mean = r["retrieval"]["ensemble"], r["retrieval"]["trials_mean"]
        for kind, shown in (("slices", "every slice"), ("one_per_patient", "one slice per patient")):
            cells = [
                f"{ens[kind][m]:.3f} / {mean[kind][m]:.3f}"
                for m in ("map", "precision_at_1", "precision_at_5", "precision_at_10")
            ]
            lines.append(f"| {r['loss']} | {r['fold']} | {shown} | " + " | ".join(cells) + " |")
    return lines


def calibration_markdown(results: list[dict]) -> list[str]:
    """Test-fold ECE before / after per classifier and NIR prediction-set coverage, as tables."""
    cal = [r for r in results if r.get("calibration")]
    if not cal:
        return []
    lines = [
        "",
        "| loss | fold | classifier | T | ECE before: mean / ens. | ECE after: mean / ens. |",
        "|---|---|---|---|---|---|",
    ]
    for r in cal:
        for n, c in r["calibration"]["classifiers"].items():
            lines.append(
                f"| {r['loss']} | {r['fold']} | {n} | {c['temperature']:.2f} | "
                f"{c['ece_before_mean']:.3f} / {c['ece_before_ensemble']:.3f} | "
                f"{c['ece_after_mean']:.3f} / {c['ece_after_ensemble']:.3f} |"
            )
    lines += [
        "",
        "| loss | fold | NIR prediction set: target coverage | coverage (mean of trials) | mean set size |",
        "|---|---|---|---|---|",
    ]
    for r in cal:
        for target, st in r["calibration"]["nir_prediction_sets"].items():
            lines.append(f"| {r['loss']} | {r['fold']} | {target} | {st['coverage']:.3f} | {st['mean_set_size']:.2f} |")
    return lines


def reliability_diagram(path: Path, y: np.ndarray, curves: dict[str, np.ndarray], bins: int = 10) -> None:
    """Accuracy against confidence per bin, one line per named probability set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    for label, p in curves.items():
        points = reliability_bins(p, y, bins)
        ax.plot(
            [b["confidence"] for b in points],
            [b["accuracy"] for b in points],
            marker="o",
            label=f"{label} (ECE {expected_calibration_error(p, y, bins):.3f})",
        )
    ax.set_xlabel("confidence"), ax.set_ylabel("accuracy"), ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_plots(run: Path, tdir: Path, table: CaseTable, result: dict) -> None:
    """Fig. 3-style latent-space maps (t-SNE of test embeddings by class and plane) and the
    KNN kappa-vs-K curve; ``tdir``: the trial whose test embeddings are mapped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    emb = np.load(tdir / "embeddings.npz")
    rows = emb["test_rows"]
    xy = TSNE(n_components=2, init="pca", random_state=0, perplexity=min(30, max(5, len(rows) // 4))).fit_transform(
        emb["test"]
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, values, names, title in (
        (axes[0], table.label[rows], CLASS_NAMES, "tumor type"),
        (axes[1], table.plane[rows], sorted(set(table.plane[rows].tolist())), "anatomical plane"),
    ):
        for j, n in enumerate(names):
            sel = (values == j) if title == "tumor type" else (values == n)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, label=n or "unknown")
        ax.set_title(f"{result['loss']}: test embeddings by {title}")
        ax.legend(markerscale=2)
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(run / "latent_space.png", dpi=110)
    plt.close(fig)
    o = result["knn_overfit"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(o["ks"], o["kappa_mean_by_k"], marker=".", label="KNN on test fold")
    ax.axhline(o["nir_kappa_mean"], color="k", ls="--", label="NIR (no K to tune)")
    ax.set_xlabel("K"), ax.set_ylabel("Cohen's kappa (mean of trials)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "knn_overfit.png", dpi=110)
    plt.close(fig)
