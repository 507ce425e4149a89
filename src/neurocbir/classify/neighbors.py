"""Classification from retrieved neighbours, as scikit-learn estimators.

* :class:`KNNClassifier`: majority vote of the top-K retrievals.
* :class:`NIRClassifier`: Nearest Incorrect Retrieval. For each class c, ``I_c`` is the
  0-based position of the ``nth_incorrect``-th retrieval whose label is not c in the
  distance-sorted list; probabilities are ``softmax(I_c)``. ``nth_incorrect=1`` is NIR,
  ``nth_incorrect=10`` is I-NIR. Every prediction is backed by the retrieved cases.

Both can drop retrievals from the query's own patient (``exclude_same_patient``) and keep
only the closest slice of each archive patient (``one_per_patient``), the within-patient
bias that the paper's Discussion names.

Search once, score many (as scikit-learn's ``kneighbors``): :func:`nir_positions`,
:func:`nir_proba` and :func:`knn_votes` score one distance-sorted list of neighbour labels,
so the service and the evaluation search once per query and derive NIR, I-NIR and KNN from
the same list.
"""

from __future__ import annotations

import numpy as np
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from neurocbir.retrieval.index import VectorIndex
from neurocbir.retrieval.neighbours import compact, first_per_group


class _RetrievalClassifier(ClassifierMixin, BaseEstimator):
    def __init__(
        self, search_depth: int | None = None, exclude_same_patient: bool = False, one_per_patient: bool = False
    ):
        self.search_depth = search_depth
        self.exclude_same_patient = exclude_same_patient
        self.one_per_patient = one_per_patient

    def fit(self, X, y, groups=None):
        """Index the archive ``X`` (n, dim) with labels ``y`` and optional patient ids ``groups``."""
        X, y = check_X_y(X, y, dtype=np.float32)
        self.classes_, self._y = np.unique(y, return_inverse=True)
        self._groups = None if groups is None else np.asarray(groups)
        if self._groups is not None and len(self._groups) != len(y):
            raise ValueError(f"groups has {len(self._groups)} entries, X has {len(y)} rows")
        if (self.exclude_same_patient or self.one_per_patient) and self._groups is None:
            raise ValueError(
                "exclude_same_patient / one_per_patient need the archive's patient ids: fit(X, y, groups=...)"
            )
        self.index_ = VectorIndex.build(X)
        self.n_features_in_ = X.shape[1]
        return self

    def _depth(self) -> int:
        n = len(self.index_)
        filtering = self.exclude_same_patient or self.one_per_patient
        return n if self.search_depth is None or filtering else min(n, self.search_depth)

    def kneighbors(self, X, n_neighbors: int | None = None, groups=None) -> tuple[np.ndarray, np.ndarray]:
        """Distance-sorted retrievals after patient filtering: (distances, archive rows),
        each (n_queries, depth), padded with ``inf`` / ``-1`` where filtering removed cases.
        ``n_neighbors`` caps the depth (default: as deep as the classifier needs)."""
        check_is_fitted(self, "index_")
        X = check_array(X, dtype=np.float32)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, the archive has {self.n_features_in_}")
        dist, ids = self.index_.search(X, self._depth() if n_neighbors is None else n_neighbors)
        keep = np.ones_like(ids, dtype=bool)
        if self.exclude_same_patient:
            if groups is None:
                raise ValueError("exclude_same_patient needs the queries' patient ids: pass groups=...")
            groups = np.asarray(groups)
            keep &= self._groups[ids] != groups[:, None]
        if self.one_per_patient:
            keep &= first_per_group(np.where(keep, ids, -1), self._groups[ids])
        return compact(dist, ids, keep)

    def neighbour_labels(self, X, groups=None) -> np.ndarray:
        """Class indices (into ``classes_``) of the retrievals, in distance order, ``-1`` padded."""
        _, ids = self.kneighbors(X, groups=groups)
        return np.where(ids >= 0, self._y[np.maximum(ids, 0)], -1)

    def predict_proba(self, X, groups=None) -> np.ndarray:
        return self._proba_from_labels(self.neighbour_labels(X, groups))

    def predict(self, X, groups=None) -> np.ndarray:
        check_is_fitted(self, "index_")
        return self.classes_[np.argmax(self.predict_proba(X, groups), axis=1)]

    def _proba_from_labels(self, labels: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class KNNClassifier(_RetrievalClassifier):
    """Vote of the ``n_neighbors`` nearest retrievals (fractions per class)."""

    def __init__(self, n_neighbors: int = 5, exclude_same_patient: bool = False, one_per_patient: bool = False):
        super().__init__(None, exclude_same_patient, one_per_patient)
        self.n_neighbors = n_neighbors

    def _depth(self) -> int:
        if self.n_neighbors < 1:
            raise ValueError("n_neighbors must be >= 1")
        if self.exclude_same_patient or self.one_per_patient:
            return len(self.index_)
        return min(len(self.index_), self.n_neighbors)

    def _proba_from_labels(self, labels: np.ndarray) -> np.ndarray:
        return knn_votes(labels, len(self.classes_), self.n_neighbors)


class NIRClassifier(_RetrievalClassifier):
    """Nearest Incorrect Retrieval (``nth_incorrect=1``) and I-NIR (``nth_incorrect=10``).

    Searches the whole archive by default (exact). Where fewer than ``nth_incorrect``
    retrievals of other classes exist (e.g. a one-class archive), the list is treated as
    continuing with retrievals of other classes, so ``I_c`` = list length + missing - 1.
    """

    def __init__(
        self,
        nth_incorrect: int = 1,
        search_depth: int | None = None,
        exclude_same_patient: bool = False,
        one_per_patient: bool = False,
    ):
        super().__init__(search_depth, exclude_same_patient, one_per_patient)
        self.nth_incorrect = nth_incorrect

    def incorrect_positions(self, X, groups=None) -> np.ndarray:
        """``I_c`` for each query and class, (n_queries, n_classes), columns in ``classes_`` order."""
        return nir_positions(self.neighbour_labels(X, groups), len(self.classes_), self.nth_incorrect)

    def _proba_from_labels(self, labels: np.ndarray) -> np.ndarray:
        return nir_proba(labels, len(self.classes_), self.nth_incorrect)


def nir_proba(labels: np.ndarray, n_classes: int, nth: int = 1) -> np.ndarray:
    """``softmax(I_c)`` per query row of ``labels`` (see :func:`nir_positions`)."""
    return softmax(nir_positions(labels, n_classes, nth).astype(float), axis=1)


def knn_votes(labels: np.ndarray, n_classes: int, n_neighbors: int) -> np.ndarray:
    """Fraction of the ``n_neighbors`` nearest retrievals of each class, per query row."""
    top = np.asarray(labels)[:, :n_neighbors]
    counts = np.stack([(top == c).sum(1) for c in range(n_classes)], axis=1).astype(float)
    total = counts.sum(1, keepdims=True)
    if (total == 0).any():
        raise ValueError("a query has no retrievals left after patient filtering")
    return counts / total


def nir_positions(labels: np.ndarray, n_classes: int, nth: int = 1) -> np.ndarray:
    """Position of the ``nth`` retrieval not of class c, per query row of ``labels``
    (class indices in distance order, ``-1`` padding at the end)."""
    if nth < 1:
        raise ValueError("nth_incorrect must be >= 1")
    labels = np.asarray(labels)
    valid = labels >= 0
    length = valid.sum(1)
    out = np.empty((len(labels), n_classes), dtype=np.int64)
    for c in range(n_classes):
        incorrect = valid & (labels != c)
        count = np.cumsum(incorrect, axis=1)
        found = count[:, -1] >= nth if labels.shape[1] else np.zeros(len(labels), bool)
        first = np.argmax(count >= nth, axis=1) if labels.shape[1] else np.zeros(len(labels), int)
        missing = nth - (count[:, -1] if labels.shape[1] else 0)
        out[:, c] = np.where(found, first, length + missing - 1)
    return out
