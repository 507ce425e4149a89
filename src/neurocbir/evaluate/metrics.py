"""The figures every evaluation reports: Cohen's kappa and AUROC of the neighbour classifiers,
their inner-CV scores, and the KNN kappa-versus-K curve of the overfit experiment."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from neurocbir.classify.neighbors import KNNClassifier, knn_votes, nir_proba

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


def scores(y: np.ndarray, proba: np.ndarray) -> tuple[float, float]:
    """(Cohen's kappa of the argmax, one-vs-rest macro AUROC)."""
    pred = np.argmax(proba, axis=1)
    return float(cohen_kappa_score(y, pred)), float(roc_auc_score(y, proba, multi_class="ovr", average="macro"))


def knn_kappa_curve(
    archive: np.ndarray, y_archive: np.ndarray, queries: np.ndarray, y_q: np.ndarray, ks=OVERFIT_KS
) -> np.ndarray:
    clf = KNNClassifier(n_neighbors=max(ks)).fit(archive, y_archive)
    labels = clf.neighbour_labels(queries)
    votes = [knn_votes(labels, len(clf.classes_), k) for k in ks]
    return np.array([cohen_kappa_score(y_q, clf.classes_[np.argmax(v, 1)]) for v in votes])
