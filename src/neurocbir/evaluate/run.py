"""Evaluation of a run as it is on disk: per-trial and ensemble kappa / AUROC of the neighbour
classifiers, calibration, retrieval mAP and precision at k, latent-structure metrics and the
KNN-overfit experiment (:func:`evaluate_trial` per trial, :func:`summarize_trials` over them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from neurocbir.classify import calibration
from neurocbir.classify.calibration import expected_calibration_error, neighbour_logits, reliability_bins
from neurocbir.classify.neighbors import NIRClassifier
from neurocbir.data.cases import CaseTable, grouped_inner_folds, load_cases
from neurocbir.errors import InvalidInput
from neurocbir.evaluate.metrics import OVERFIT_KS, TSD_KS, classifier_probas, knn_kappa_curve, scores
from neurocbir.evaluate.retrieval import retrieval_report, squared_distances
from neurocbir.evaluate.tables import make_plots, markdown_tables, reliability_diagram
from neurocbir.files import write_json, write_text
from neurocbir.models.runs import trial_dir, trial_seeds


def _trials(run: Path) -> list[Path]:
    """The run's trials that have their embeddings (what `neurocbir train` or `index` writes)."""
    seeds = trial_seeds(run, needs="embeddings.npz")
    if not seeds:
        raise FileNotFoundError(f"{run} has no trained trials (trial_*/embeddings.npz): run `neurocbir train` first")
    return [trial_dir(run, s) for s in seeds]


def evaluate_trial(
    tdir: Path, table: CaseTable, one_per_patient: bool = False, calibrators: dict | None = None
) -> dict[str, np.ndarray]:
    """One trial's test-fold figures from its embeddings: each classifier's probabilities (and the
    calibrated ones), plane consistency, tumor-size differences, retrieval precision, the KNN kappa
    curve and the K that inner CV picks."""
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
        ev["calibrated_" + name] = cal.proba(neighbour_logits(name, neighbour_labels, len(clf.classes_), cal.depth))
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
    # retrieval as the literature reports it; the distances let trials be ranked together
    ev["archive_d2"] = squared_distances(emb["test"], emb["archive"]).astype(np.float16)
    ev["archive_y"] = y_a
    ev["archive_group"] = np.unique(table.patient_id[a_rows], return_inverse=True)[1]  # codes, not ids
    return ev


def evaluate_run(
    run: Path | str, table: CaseTable | None = None, one_per_patient: bool = False, plots: bool = True
) -> dict:
    """Evaluate every trial of a run on its test fold, ensemble them, and write ``metrics.json``,
    ``metrics.md`` (and the plots): what `neurocbir evaluate RUN` does."""
    run = Path(run)
    cfg = json.loads((run / "config.json").read_text())
    table = table if table is not None else load_cases(cfg.get("data"))
    calibrators = calibration.load(run)
    trials = _trials(run)
    evaluations = [evaluate_trial(tdir, table, one_per_patient, calibrators) for tdir in trials]
    result = summarize_trials(run, cfg, evaluations, calibrators, one_per_patient)
    result["test_twins"] = test_twins(table, cfg["fold"], cfg.get("extra_cases"))
    write_json(run / "metrics.json", result)
    twins = result["test_twins"]
    said = (
        "Test slices with a twin (re-encoded, resized, cropped or mirrored) among the archive and training cases: "
        + (
            ", ".join(f"case {t['test_case']} ~ {t['twin']}{' (mirrored)' if t['mirrored'] else ''}" for t in twins)
            or "none"
        )
        + ".\n"
    )
    write_text(run / "metrics.md", markdown_tables([result]) + "\n" + said)
    if plots:
        make_plots(run, trials[0], table, result)
        if calibrators:
            y = evaluations[0]["y_test"]
            curves = {
                f"{n} {kind}": np.mean([ev[f"{prefix}_{n}"] for ev in evaluations], 0)
                for n in ("nir", "knn7")
                for kind, prefix in (("uncalibrated", "proba"), ("calibrated", "calibrated"))
            }
            reliability_diagram(run / "reliability.png", y, curves)
    return result


def test_twins(table: CaseTable, fold: int, extra_cases: str | None = None) -> list[dict]:
    """The test fold's slices that have a twin (the same slice re-encoded, resized, cropped a
    little or mirrored: :mod:`neurocbir.retrieval.duplicates`) among the training folds (the run's
    archive) or the other hospitals' development part it trained on: figures over such a slice
    are not independent, so every evaluation names them."""
    from neurocbir.retrieval.duplicates import DuplicateIndex, ImagePrints

    train, test = np.flatnonzero(table.fold != fold), np.flatnonzero(table.fold == fold)
    names = [f"figshare case {int(table.idx[r])}" for r in train]
    images = [table.load_image(int(r)) for r in train]
    if extra_cases:
        from neurocbir.data.cases import default_data_dir
        from neurocbir.data.external import default_external_dir, load_external, part

        folder = Path(extra_cases)
        if not folder.is_dir():  # a run trained on another machine: the same folder where it lies here
            here = default_external_dir(default_data_dir())
            if here is None or here.name != folder.name:
                raise FileNotFoundError(
                    f"the run trained on {extra_cases}, which is not here: set NEUROCBIR_EXTERNAL to that folder "
                    "so that its test slices can be checked against it"
                )
            folder = here
        # every development slice, the errata's figshare copies included: runs trained before the
        # errata learned from them
        dev = part(load_external(folder), "development", errata=False)
        names += [f"{dev.sources[i] or 'external'} {dev.files[i]}" for i in range(len(dev))]
        images += [dev.load_image(i) for i in range(len(dev))]
    prints = [ImagePrints(im) for im in images]
    index = DuplicateIndex().add(range(len(names)), [p.coarse[0] for p in prints], [p.fine for p in prints])
    out = []
    for r in test:
        found = index.find(table.load_image(int(r)))
        if found:
            twin = found[0]
            out.append({"test_case": int(table.idx[r]), "twin": names[twin.case_id], "mirrored": twin.mirrored})
    return out


def summarize_trials(
    run: Path, cfg: dict, evaluations: list[dict], calibrators: dict | None, one_per_patient: bool = False
) -> dict:
    """The run's figures from its trials' evaluations (:func:`evaluate_trial`): per trial (mean and
    spread) and for the soft ensemble (probabilities averaged; retrieval ranked by the trials'
    summed squared distances, i.e. in their concatenated embeddings)."""
    per_trial: dict[str, list[tuple[float, float]]] = {}
    probas: dict[str, list[np.ndarray]] = {}
    calibrated: dict[str, list[np.ndarray]] = {}
    plane_consistency, tsd = [], {k: [] for k in TSD_KS}
    curves, cv_ks = [], []
    y_test = evaluations[0]["y_test"]
    for ev in evaluations:
        if not np.array_equal(y_test, ev["y_test"]):
            raise InvalidInput(f"{run}: test cases differ between trials")
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
    return {
        "run": str(run),
        "loss": cfg["loss"],
        "encoder": cfg["encoder"],
        "fold": cfg["fold"],
        "trials": len(per_trial["nir"]),
        "n_test": int(len(y_test)),
        "one_per_patient": one_per_patient,
        "classifiers": out_cls,
        "retrieval": retrieval_summary(evaluations),
        "structure": {
            "anatomical_consistency_top5": float(np.mean(plane_consistency)) if plane_consistency else None,
            "tsd_mm2_at_k": {str(k): float(np.mean(v)) for k, v in tsd.items()},
        },
        "knn_overfit": overfit,
        "calibration": calibration_report(y_test, probas, calibrated, calibrators),
        "inner_cv": inner,
        "timings": timings,
    }


def retrieval_summary(evaluations: list[dict]) -> dict:
    """mAP and P@k (whole archive, and one slice per patient): the mean of the trials and the
    ensemble's. ``map``, ``precision_at_k``: the ensemble's whole-archive figures (what the papers
    report); ``trials_mean`` and ``one_per_patient`` hold the rest."""
    first = evaluations[0]
    args = (first["archive_y"], first["y_test"], first["archive_group"])
    per_trial = [retrieval_report(ev["archive_d2"].astype(np.float32), *args) for ev in evaluations]
    ensemble = retrieval_report(np.sum([ev["archive_d2"].astype(np.float32) for ev in evaluations], 0), *args)
    mean = {kind: {m: float(np.mean([t[kind][m] for t in per_trial])) for m in per_trial[0][kind]} for kind in ensemble}
    return {**ensemble["slices"], "ensemble": ensemble, "trials_mean": mean}


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
