"""Evaluation of a run: per-trial and ensemble kappa / AUROC for the neighbour classifiers,
latent-structure metrics, the KNN-overfit experiment, Markdown tables and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from . import calibration
from .calibration import expected_calibration_error, neighbour_logits, reliability_bins
from .classify import KNNClassifier, NIRClassifier, knn_votes, nir_proba
from .data import CLASS_NAMES, CaseTable, grouped_inner_folds, load_cases
from .files import atomic_write, write_json, write_text
from .runs import trial_dir, trial_seeds

KNN_KS = (5, 7, 25)
TSD_KS = (1, 5, 10, 25)
OVERFIT_KS = tuple(range(1, 52, 2))


def classifier_probas(labels: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """KNN-5/7/25, NIR and I-NIR probabilities from one list of neighbour labels."""
    out = {f"knn{k}": knn_votes(labels, n_classes, k) for k in KNN_KS}
    out["nir"] = nir_proba(labels, n_classes, 1)
    out["inir"] = nir_proba(labels, n_classes, 10)
    return out


def inner_cv_scores(labels: np.ndarray, y: np.ndarray, n_classes: int) -> dict:
    """Kappa of every classifier on held-out training patients (the inner folds' own neighbour
    lists, tops retrained per inner fold), and the KNN K those pick: the inner-CV score shown
    beside each test score, and the K of the KNN-overfit experiment chosen without the test fold."""
    probas = classifier_probas(labels, n_classes)
    by_k = {k: float(cohen_kappa_score(y, np.argmax(knn_votes(labels, n_classes, k), 1))) for k in OVERFIT_KS}
    return {
        "n": int(len(y)),
        "kappa": {name: float(cohen_kappa_score(y, np.argmax(p, 1))) for name, p in probas.items()},
        "knn_kappa_by_k": {str(k): v for k, v in by_k.items()},
        "knn_best_k": max(by_k, key=by_k.get),
    }


def fit_calibration(run: Path, parts: list[np.ndarray], y: list, groups: list, how: str, n_classes: int) -> None:
    """Calibrators and inner-CV scores from the inner folds' held-out neighbour labels, saved
    as the run's ``calibration.json``."""
    labels, y_all = calibration.held_out_labels(parts), np.concatenate(y)
    cals = calibration.fit_calibrators(labels, y_all, np.concatenate(groups), n_classes)
    calibration.save(run, cals, how=how, inner_cv=inner_cv_scores(labels, y_all, n_classes))


def scores(y: np.ndarray, proba: np.ndarray) -> tuple[float, float]:
    """(Cohen's kappa of the argmax, one-vs-rest macro AUROC)."""
    pred = np.argmax(proba, axis=1)
    return float(cohen_kappa_score(y, pred)), float(roc_auc_score(y, proba, multi_class="ovr", average="macro"))


TRIAL_EVALUATION = "evaluation.npz"  # a trial's test-fold figures, kept beside its embeddings


def _trials(run: Path) -> list[Path]:
    """Trials with embeddings, or with only their evaluation (runs merged from several GPU leases)."""
    seeds = sorted(set(trial_seeds(run, needs="embeddings.npz")) | set(trial_seeds(run, needs=TRIAL_EVALUATION)))
    if not seeds:
        raise FileNotFoundError(f"{run} has no trained trials (trial_*/embeddings.npz): run `neurocbir train` first")
    return [trial_dir(run, s) for s in seeds]


def knn_kappa_curve(
    archive: np.ndarray, y_archive: np.ndarray, queries: np.ndarray, y_q: np.ndarray, ks=OVERFIT_KS
) -> np.ndarray:
    clf = KNNClassifier(n_neighbors=max(ks)).fit(archive, y_archive)
    labels = clf.neighbour_labels(queries)
    votes = [knn_votes(labels, len(clf.classes_), k) for k in ks]
    return np.array([cohen_kappa_score(y_q, clf.classes_[np.argmax(v, 1)]) for v in votes])


def evaluate_trial(
    tdir: Path, table: CaseTable, one_per_patient: bool = False, calibrators: dict | None = None, keep: bool = False
) -> dict[str, np.ndarray]:
    """One trial's test-fold figures from its embeddings: each classifier's probabilities (and the
    calibrated ones), plane consistency, tumor-size differences, the KNN kappa curve and the K that
    inner CV picks. With ``keep`` they are saved as ``evaluation.npz`` beside the embeddings, so
    trials trained on different machines can be ensembled without their embeddings; they are read
    back from there only when the embeddings are absent."""
    path = tdir / TRIAL_EVALUATION
    if not (tdir / "embeddings.npz").is_file():
        with np.load(path) as saved:
            ev = dict(saved)
        if bool(ev["one_per_patient"]) != one_per_patient:
            raise ValueError(f"{path} was computed with one_per_patient={bool(ev['one_per_patient'])}")
        return ev
    emb = np.load(tdir / "embeddings.npz")
    a_rows, q_rows = emb["archive_rows"], emb["test_rows"]
    y_a, y_q = table.label[a_rows], table.label[q_rows]
    # one exact search per query; every classifier is scored from the same neighbour list
    clf = NIRClassifier(one_per_patient=one_per_patient).fit(emb["archive"], y_a, groups=table.patient_id[a_rows])
    neighbour_labels = clf.neighbour_labels(emb["test"])
    ev: dict[str, np.ndarray] = {"y_test": y_q, "test_rows": q_rows, "one_per_patient": np.array(one_per_patient)}
    results = classifier_probas(neighbour_labels, len(clf.classes_))
    if "test_mlp_proba" in emb:
        results["mlp"] = emb["test_mlp_proba"]
    ev.update({"proba_" + name: p for name, p in results.items()})
    for name, cal in (calibrators or {}).items():  # calibration changes no ranking: ECE only
        ev["calibrated_" + name] = cal.proba(neighbour_logits(name, neighbour_labels, len(clf.classes_)))
    # latent structure of the retrievals
    _, ids = NIRClassifier().fit(emb["archive"], y_a).kneighbors(emb["test"], max(TSD_KS))
    planes_q, planes_a = table.plane[q_rows], table.plane[a_rows]
    ev["plane_consistency"] = np.array(
        float((planes_a[ids[:, :5]] == planes_q[:, None]).mean()) if (planes_q != "").all() else np.nan
    )
    area_q, area_a = table.area_mm2[q_rows], table.area_mm2[a_rows]
    ev["tsd"] = np.array([np.abs(area_a[ids[:, :k]] - area_q[:, None]).mean() for k in TSD_KS])
    # KNN overfit: K picked on the test fold vs by patient-grouped CV on the archive
    ev["knn_curve"] = knn_kappa_curve(emb["archive"], y_a, emb["test"], y_q)
    inner = table.subset(a_rows)
    cv = np.mean(
        [
            knn_kappa_curve(emb["archive"][tr], y_a[tr], emb["archive"][va], y_a[va])
            for tr, va in grouped_inner_folds(inner, 3, seed=0)
        ],
        axis=0,
    )
    ev["knn_cv_k"] = np.array(int(np.argmax(cv)))
    if keep:
        atomic_write(path, lambda tmp: np.savez(tmp, **ev))
    return ev


def evaluate_run(
    run: Path | str,
    table: CaseTable | None = None,
    one_per_patient: bool = False,
    plots: bool = True,
    keep_trial_evaluations: bool = False,
) -> dict:
    run = Path(run)
    cfg = json.loads((run / "config.json").read_text())
    table = table if table is not None else load_cases(cfg.get("data"))
    per_trial: dict[str, list[tuple[float, float]]] = {}
    probas: dict[str, list[np.ndarray]] = {}
    plane_consistency, tsd = [], {k: [] for k in TSD_KS}
    curves, cv_ks = [], []
    y_test = None
    calibrators = calibration.load(run)
    calibrated: dict[str, list[np.ndarray]] = {}
    for tdir in _trials(run):
        ev = evaluate_trial(tdir, table, one_per_patient, calibrators, keep=keep_trial_evaluations)
        if y_test is not None and not np.array_equal(y_test, ev["y_test"]):
            raise ValueError(f"{tdir}: test cases differ between trials")
        y_test = ev["y_test"]
        for name in (n.removeprefix("proba_") for n in ev if n.startswith("proba_")):
            per_trial.setdefault(name, []).append(scores(y_test, ev["proba_" + name]))
            probas.setdefault(name, []).append(ev["proba_" + name])
        for name in (n.removeprefix("calibrated_") for n in ev if n.startswith("calibrated_")):
            calibrated.setdefault(name, []).append(ev["calibrated_" + name])
        if not np.isnan(ev["plane_consistency"]):
            plane_consistency.append(float(ev["plane_consistency"]))
        for k, v in zip(TSD_KS, ev["tsd"]):
            tsd[k].append(float(v))
        curves.append(ev["knn_curve"])
        cv_ks.append(int(ev["knn_cv_k"]))
    out_cls = {}
    for name, vals in per_trial.items():
        k_ens, a_ens = scores(y_test, np.mean(probas[name], axis=0))
        out_cls[name] = {
            "kappa_mean": float(np.mean([v[0] for v in vals])),
            "kappa_std": float(np.std([v[0] for v in vals])),
            "kappa_ensemble": k_ens,
            "auroc_mean": float(np.mean([v[1] for v in vals])),
            "auroc_std": float(np.std([v[1] for v in vals])),
            "auroc_ensemble": a_ens,
        }
    curve = np.mean(curves, axis=0)
    best = int(np.argmax(curve))
    inner = calibration.load_inner_cv(run)
    overfit = {
        "ks": list(OVERFIT_KS),
        "kappa_mean_by_k": [float(v) for v in curve],
        "best_k_on_test": OVERFIT_KS[best],
        "kappa_best_k_on_test": float(curve[best]),
        "cv_k_per_trial": [OVERFIT_KS[i] for i in cv_ks],
        "kappa_cv_k": float(np.mean([c[i] for c, i in zip(curves, cv_ks)])),
        "nir_kappa_mean": out_cls["nir"]["kappa_mean"],
    }
    if inner:  # K picked on inner folds whose tops never saw their validation patients
        k = int(inner["knn_best_k"])
        overfit["k_inner_cv_retrained"] = k
        overfit["kappa_k_inner_cv_retrained"] = float(curve[OVERFIT_KS.index(k)])
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").is_file() else {}
    result = {
        "run": str(run),
        "loss": cfg["loss"],
        "encoder": cfg["encoder"],
        "fold": cfg["fold"],
        "trials": len(per_trial["nir"]),
        "n_test": int(len(y_test)),
        "one_per_patient": one_per_patient,
        "classifiers": out_cls,
        "structure": {
            "anatomical_consistency_top5": float(np.mean(plane_consistency)) if plane_consistency else None,
            "tsd_mm2_at_k": {str(k): float(np.mean(v)) for k, v in tsd.items()},
        },
        "knn_overfit": overfit,
        "calibration": calibration_report(y_test, probas, calibrated, calibrators),
        "inner_cv": inner,
        "timings": timings,
    }
    write_json(run / "metrics.json", result)
    write_text(run / "metrics.md", markdown_tables([result]))
    if plots:
        make_plots(run, table, result)
        if calibrators:
            curves = {
                f"{n} {kind}": np.mean(src[n], 0)
                for n in ("nir", "knn7")
                for kind, src in (("uncalibrated", probas), ("calibrated", calibrated))
            }
            reliability_diagram(run / "reliability.png", y_test, curves)
    return result


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
    lines += calibration_markdown(results)
    return "\n".join(lines) + "\n"


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


def calibration_report(
    y: np.ndarray,
    probas: dict[str, list[np.ndarray]],
    calibrated: dict[str, list[np.ndarray]],
    calibrators: dict | None,
) -> dict | None:
    """Test-fold ECE per classifier before / after calibration (mean of trials and soft
    ensemble) and the coverage and mean size of NIR's prediction sets at each coverage."""
    if not calibrators:
        return None
    out = {}
    for name, cal in calibrators.items():
        before, after = probas[name], calibrated[name]
        out[name] = {
            "temperature": cal.temperature,
            "ece_before_mean": float(np.mean([expected_calibration_error(p, y) for p in before])),
            "ece_after_mean": float(np.mean([expected_calibration_error(p, y) for p in after])),
            "ece_before_ensemble": expected_calibration_error(np.mean(before, 0), y),
            "ece_after_ensemble": expected_calibration_error(np.mean(after, 0), y),
            "reliability_before_ensemble": reliability_bins(np.mean(before, 0), y),
            "reliability_after_ensemble": reliability_bins(np.mean(after, 0), y),
        }
    sets = {}
    for coverage in (0.9, 0.95, 0.99):
        masks = [calibrators["nir"].prediction_set(p, coverage) for p in calibrated["nir"]]
        sets[str(coverage)] = {
            "coverage": float(np.mean([m[np.arange(len(y)), y].mean() for m in masks])),
            "mean_set_size": float(np.mean([m.sum(1).mean() for m in masks])),
        }
    return {"classifiers": out, "nir_prediction_sets": sets}


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


def make_plots(run: Path, table: CaseTable, result: dict) -> None:
    """Fig. 3-style latent-space maps (t-SNE of test embeddings by class and plane) and the
    KNN kappa-vs-K curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    tdir = _trials(run)[0]
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
