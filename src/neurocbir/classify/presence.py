"""Is there a tumor on the slice at all? Answered from the archive's own cases, before any tumor
type is: a class-balanced RBF support-vector machine on the scan's descriptor (the L2-normalised mean of
the network's last feature map, what "unlike the archive" is judged on too), fitted on the
archive's tumor cases against its no-tumor cases when the archive is loaded. So an archive that
is given a site's slices without a tumor (``neurocbir add``, label ``notumor``) learns to say "no
tumor found" for that site, with no network retrained; one that holds none does not assess it.

How the rule was chosen (``benchmarks/tumor_presence_cv.py``, docs/results.md "Tumor presence:
how the rule was chosen"): 5-fold group-wise CV over the demo archive's cases (figshare training
folds, the other hospitals' development part; never the validation part or fold 5), the served
model's descriptors. The rule: at P(no tumor) > 0.5, the most no-tumor slices found among those
that call at most 2 % of the development tumor slices "no tumor". Measured 2026-12-02 for the CPU
model: an RBF SVM (C = 1, class-balanced, Platt probabilities) called 1.1 % of the development tumor
slices "no tumor" (Br35H 0.0 %) and found 98.0 % of the no-tumor slices; the logistic regression
used before called 3.9 % (Br35H 4.6 %) for 99.2 %; adding the decoder's evidence, the embedding or
mirrored slices to it, or nearest neighbours, did no better than 2.6 %. An SVM's fit grows
quadratically with the cases, so at most :data:`MAX_FIT_CASES` of each kind are sampled.

Those figures were optimistic: the network had trained on every development slice it was judged
on, and the validation part then saw 12-18 % of other hospitals' tumor slices called "no tumor".
A run trained with held-out development groups (the CPU preset since 2026-12-03) has its own
:class:`PresenceRule` (``presence.json``: the threshold, and a veto by the tumor decoder's peak),
chosen on slices it never trained on (:mod:`neurocbir.training.presence_choice`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.validation import check_array, check_is_fitted

from neurocbir.errors import ConfigurationError
from neurocbir.files import write_json

#: P(no tumor) above which a slice is answered "no tumor found" (chosen on the development part)
NO_TUMOR_PROBABILITY = 0.5
REGULARISATION_C = 1.0
MIN_CASES = 10  # of each kind, to fit at all
MAX_FIT_CASES = 4_000  # of each kind: a sample of a larger archive (an SVM fit grows quadratically)


def svm_presence(C: float = REGULARISATION_C):
    """The RBF SVM with Platt probabilities (sigmoid, fitted on 5-fold cross-validated decisions)."""
    return CalibratedClassifierCV(SVC(C=C, class_weight="balanced"), method="sigmoid", cv=5, ensemble=False)


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
        self.model_ = make_pipeline(StandardScaler(), svm_presence(self.C)).fit(X, tumor.astype(int))
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


RULE_FILE = "presence.json"


@dataclass(frozen=True)
class PresenceRule:
    """How a run answers "no tumor found": a score above ``threshold``, the score being the
    archive's P(no tumor), or with ``decoder_weight`` w > 0 that and the tumor decoder's highest
    probability on the slice (its peak) combined, ``sigmoid((1 - w) logit(P) - w logit(peak))``: a
    slice where the decoder sees nothing leans to "no tumor", one where it plainly sees a tumor
    leans away; and with ``decoder_veto``, never where the peak reaches the veto. Chosen on slices
    the network never trained on (:mod:`neurocbir.training.presence_choice`); ``how`` says how.
    ``decoder``: whose peak it reads, the tumor decoder's or the run's presence decoder's (the
    answer names it); ``tumor_veto``: where it reads the presence decoder's, never "no tumor" where
    the tumor decoder's peak (the map the outline is drawn from) reaches this either."""

    threshold: float = NO_TUMOR_PROBABILITY
    decoder_veto: float | None = None
    how: str = "not chosen for this run: P(no tumor) > 0.5, no decoder veto"
    decoder_weight: float = 0.0
    decoder: str = "tumor"
    tumor_veto: float | None = None

    def score(self, p_none, peak):
        """The score the threshold is on (arrays or floats; ``peak`` None: P(no tumor) itself)."""
        if not self.decoder_weight or peak is None:
            return p_none
        w = self.decoder_weight
        z = (1 - w) * _logit(p_none) - w * _logit(peak)
        return 1.0 / (1.0 + np.exp(-z))

    def no_tumor(self, p_none, peak, tumor_peak=None):
        """'No tumor' for a slice (floats: a bool) or for many (arrays: a bool array); ``tumor_peak``:
        the tumor decoder's peak, for :attr:`tumor_veto` (None: ``peak`` is the tumor decoder's)."""
        called = np.asarray(self.score(p_none, peak)) > self.threshold
        if self.decoder_veto is not None and peak is not None:
            called &= np.asarray(peak) < self.decoder_veto
        tumor_peak = peak if tumor_peak is None else tumor_peak
        if self.tumor_veto is not None and tumor_peak is not None:
            called &= np.asarray(tumor_peak) < self.tumor_veto
        return bool(called) if called.ndim == 0 else called

    def describe(self) -> str:
        """The rule in one line, as the CLI and the benchmarks print it."""
        score = f"P(no tumor) and peak, weight {self.decoder_weight}" if self.decoder_weight else "P(no tumor)"
        veto = f"{score} > {self.threshold}, veto {'none' if self.decoder_veto is None else self.decoder_veto}"
        return veto + ("" if self.tumor_veto is None else f", tumor decoder's veto {self.tumor_veto}")

    def decide(
        self, p_none: float | None, peak: float | None, tumor_peak: float | None = None
    ) -> tuple[bool | None, dict]:
        """:meth:`answer`, or None where the case source cannot tell (``p_none`` None: an archive
        with no slices without a tumor), and the evidence says so."""
        if p_none is None:
            note = "not assessed: the archive holds no slices without a tumor (add some with `neurocbir add`)"
            return None, {"probability_no_tumor": None, "threshold": None, "note": note}
        return self.answer(p_none, peak, tumor_peak)

    def answer(self, p_none: float, peak: float | None, tumor_peak: float | None = None) -> tuple[bool, dict]:
        """(tumor found, the evidence as the answer shows it) for one slice."""
        note = "from the archive's cases with and without a tumor (descriptor of the whole slice)"
        evidence = {"probability_no_tumor": round(p_none, 4), "threshold": self.threshold, "note": note}
        w, veto = self.decoder_weight, self.decoder_veto
        if peak is not None and (w or veto is not None):
            evidence |= {"decoder_peak": round(float(peak), 4), "decoder": self.decoder}
        if peak is not None and w:
            evidence |= {"decoder_weight": w, "score": round(float(self.score(p_none, peak)), 4)}
            evidence["note"] += (
                f"; the threshold is on P(no tumor) and the {self.decoder} decoder's peak combined (weight {w})"
            )
        if peak is not None and veto is not None:
            evidence["decoder_veto"] = veto
            evidence["note"] += f"; never 'no tumor' where the {self.decoder} decoder's peak reaches the veto"
        if self.tumor_veto is not None and (tumor_peak is not None or peak is not None):
            tumor_peak = float(peak if tumor_peak is None else tumor_peak)
            evidence |= {"tumor_decoder_peak": round(tumor_peak, 4), "tumor_veto": self.tumor_veto}
            evidence["note"] += f"; never 'no tumor' where the tumor decoder's peak reaches {self.tumor_veto}"
        found = not self.no_tumor(p_none, peak, tumor_peak)
        # the score says "no tumor" and only the decoder's peak keeps the tumor: the evidence conflicts
        evidence["uncertain"] = bool(found and peak is not None and self.score(p_none, peak) > self.threshold)
        return found, evidence


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def load_rule(run: Path | str | None) -> PresenceRule:
    """The run's ``presence.json``, or the default rule where it has none."""
    path = None if run is None else Path(run) / RULE_FILE
    if path is None or not path.is_file():
        return PresenceRule()
    try:
        doc = json.loads(path.read_text())
        veto = doc["decoder_veto"]
        weight = float(doc.get("decoder_weight", 0.0))  # rules chosen before 2026-12-03 had none
        # the run's presence decoder, trained by `neurocbir presence-decoder`, gives the peak where it has one
        decoder = "presence" if (Path(run) / "presence_decoder.json").is_file() else "tumor"
        tumor_veto = doc.get("tumor_veto")  # rules chosen before 2026-12-07 had none
        return PresenceRule(
            float(doc["threshold"]),
            None if veto is None else float(veto),
            str(doc["how"]),
            weight,
            decoder,
            None if tumor_veto is None else float(tumor_veto),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(
            f"{path} is corrupt ({type(exc).__name__}): choose it again with `neurocbir calibrate RUN --presence`"
        ) from None


def save_rule(run: Path | str, rule: PresenceRule, measured: dict) -> None:
    write_json(Path(run) / RULE_FILE, {**asdict(rule), "measured": measured})
