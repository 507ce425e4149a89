"""Distance-sorted neighbour lists: keep the closest slice of each patient, drop the rest,
and pack what is kept to the front. Shared by the classifiers, the stores' deep search and
the case sources, so that every stage filters a retrieval list the same way."""

from __future__ import annotations

import numpy as np


def first_per_group(ids: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Mask keeping, in each row of distance-sorted ``ids`` (``-1`` = none), only the first
    (closest) retrieval of each group (patient)."""
    keep = np.zeros(ids.shape, dtype=bool)
    for q in range(len(ids)):
        valid = np.flatnonzero(ids[q] >= 0)
        _, first = np.unique(groups[q, valid], return_index=True)
        keep[q, valid[first]] = True
    return keep


def compact(dist: np.ndarray, ids: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kept retrievals first (order preserved), padded with ``inf`` / ``-1``."""
    order = np.argsort(~keep, axis=1, kind="stable")
    ids = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(ids, order, 1), -1)
    return np.where(ids >= 0, np.take_along_axis(dist, order, 1), np.inf), ids
