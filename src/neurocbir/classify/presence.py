"""Is there a tumor on the slice at all? Answered from the archive's own cases, before any tumor
type is: a class-balanced logistic regression on the scan's descriptor (the L2-normalised mean of
the network's last feature map, what "unlike the archive" is judged on too), fitted on the
archive's tumor cases against its no-tumor cases when the archive is loaded. So an archive that
is given a site's slices without a tumor (``neurocbir add``, label ``notumor``) learns to say "no
tumor found" for that site, with no network retrained; one that holds none does not assess it.

Why not the tumor decoder's own evidence: trained on tumor slices only, it finds a "tumor" on
most normal slices (median peak probability 0.95 on other hospitals' normal slices). Why a linear
model on descriptors rather than nearest neighbours: by 5-fold group-wise CV on the development
part of the external slices (with the figshare training folds as tumor cases), at most 2 % of
tumor slices called "no tumor", it found 0.90 of the normal slices against 0.84-0.86 for 1-15
nearest neighbours, 0.37 for the decoder's evidence alone, and no more with an RBF SVM, the
decoder's evidence or mirrored slices added; ``C`` and the threshold were chosen there
(benchmarks/tumor_presence_cv.py, docs/results.md "Tumor presence: how the rule was chosen")."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_array, check_is_fitted

#: P(no tumor) above which a slice is answered "no tumor found" (chosen on the development part)
NO_TUMOR_PROBABILITY = 0.5
REGULARISATION_C = 1.0
MIN_CASES = 10  # of each kind, to fit at all
MAX_FIT_CASES = 20_000  # of each kind: a sample of a larger archive is enough for a linear model


class TumorPresence(ClassifierMixin, BaseEstimator):
    """``fit(X, tumor)`` on descriptors and whether each case shows a tumor; ``predict(X)``:
    tumor found (bool); ``proba_no_tumor(X)``: the class-balanced P(no tumor)."""

    def __init__(self, C: float = REGULARISATION_C, threshold: float = NO_TUMOR_PROBABILITY):
        self.C = C
        self.threshold = threshold

    def fit(self, X, tumor) -> TumorPresence:
        X = check_array(X, dtype=np.float64)
        tumor = np.asarray(tumor, dtype=bool)
        if len(tumor) != len(X):
            raise ValueError(f"{len(X)} descriptors but {len(tumor)} labels")
        if min(tumor.sum(), (~tumor).sum()) < MIN_CASES:
            raise ValueError(f"tumor presence needs at least {MIN_CASES} cases with and {MIN_CASES} without a tumor")
        self.model_ = make_pipeline(
            StandardScaler(), LogisticRegression(C=self.C, class_weight="balanced", max_iter=3000)
        ).fit(X, tumor.astype(int))
        self.n_features_in_ = X.shape[1]
        return self

    def proba_no_tumor(self, X) -> np.ndarray:
        check_is_fitted(self, "model_")
        return self.model_.predict_proba(check_array(X, dtype=np.float64))[:, 0]

    def predict(self, X) -> np.ndarray:
        return self.proba_no_tumor(X) <= self.threshold


def fit_presence(descriptors: np.ndarray | None, tumor: np.ndarray, seed: int = 0) -> TumorPresence | None:
    """A presence model from an archive's cases, or None when it holds too few of either kind (or
    no descriptors). A large archive is sampled (:data:`MAX_FIT_CASES` of each kind)."""
    tumor = np.asarray(tumor, dtype=bool)
    if descriptors is None or len(descriptors) != len(tumor) or min(tumor.sum(), (~tumor).sum()) < MIN_CASES:
        return None
    rng = np.random.default_rng(seed)
    rows = np.concatenate(
        [
            (lambda r: rng.choice(r, min(len(r), MAX_FIT_CASES), replace=False))(np.flatnonzero(tumor == kind))
            for kind in (True, False)
        ]
    )
    return TumorPresence().fit(np.asarray(descriptors, dtype=np.float32)[rows], tumor[rows])
