"""Retrieval figures as the content-based retrieval papers on this dataset report them (Cheng et
al. 2016, Swati et al. 2019): mean average precision over the whole archive ranking and precision
at k, a retrieved case being relevant when it has the query's tumor type. The test patients are
never in the archive (the split is patient-wise), so no query finds its own patient.

Also "one slice per patient": the archive ranked by patients (each by its closest slice), so that
ten near-identical slices of one patient count once."""

from __future__ import annotations

import numpy as np

PRECISION_KS = (1, 5, 10)


def squared_distances(queries: np.ndarray, archive: np.ndarray) -> np.ndarray:
    """(n_queries, n_archive) squared Euclidean distances, float32."""
    q, a = np.asarray(queries, np.float32), np.asarray(archive, np.float32)
    d2 = (q * q).sum(1)[:, None] - 2 * q @ a.T + (a * a).sum(1)[None]
    return np.maximum(d2, 0)


def per_patient(d2: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each archive patient's closest slice: (n_queries, n_patients) distances and the patients'
    labels (a patient's slices share one tumor type; the first slice's label is taken)."""
    keys, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(keys)))
    return np.minimum.reduceat(d2[:, order], starts, axis=1), np.asarray(labels)[first]


def retrieval_scores(d2: np.ndarray, archive_labels: np.ndarray, query_labels: np.ndarray) -> dict[str, float]:
    """mAP over the whole ranking of ``d2``'s columns and precision at :data:`PRECISION_KS`."""
    if d2.shape != (len(query_labels), len(archive_labels)):
        raise ValueError(f"distances {d2.shape} do not match {len(query_labels)} queries x {len(archive_labels)}")
    order = np.argsort(d2, axis=1, kind="stable")
    relevant = np.asarray(archive_labels)[order] == np.asarray(query_labels)[:, None]
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    average_precision = (relevant * hits / ranks).sum(1) / np.maximum(relevant.sum(1), 1)
    out = {"map": float(average_precision.mean())}
    for k in PRECISION_KS:
        out[f"precision_at_{k}"] = float(relevant[:, :k].mean())
    return out


def retrieval_report(
    d2: np.ndarray, archive_labels: np.ndarray, query_labels: np.ndarray, archive_groups: np.ndarray
) -> dict[str, dict[str, float]]:
    """:func:`retrieval_scores` over every archive slice, and over one slice per patient."""
    by_patient, patient_labels = per_patient(d2, archive_labels, archive_groups)
    return {
        "slices": retrieval_scores(d2, archive_labels, query_labels),
        "one_per_patient": retrieval_scores(by_patient, patient_labels, query_labels),
    }
