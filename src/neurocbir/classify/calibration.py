"""Calibrated probabilities and prediction sets for the neighbour classifiers.

``softmax(I_c)`` ranks the classes well (that is all AUROC needs) but is no probability: on
held-out patients most answers showed > 99% while one in seven was wrong. Two steps fix
the numbers a clinician reads, both fitted on training patients only:

* **Temperature scaling**: ``softmax(logits / T)``, one parameter ``T`` fitted by negative
  log-likelihood (Guo et al. 2017), so the ranking (and AUROC, kappa) is unchanged.
* **Prediction sets**: the split-conformal set (LAC score ``1 - p_true``: the classes whose
  calibrated probability clears a threshold read from held-out scores, so that it holds the
  true class with the stated coverage: "meningioma or glioma" when the evidence does not
  separate them), widened where needed to the most probable classes whose calibrated
  probabilities together reach the coverage. The conformal set alone, forced non-empty, could
  name one type beside a confidence under 50 % (where its threshold lets a second type in only
  above 50 %): a "95 % set" of one type must mean a confidence of at least 95 %. The wider set
  covers at least as often as the conformal one promises (docs/results.md, trust).

NIR's positions are read to a depth every tumor type of the calibration archive fills
(:func:`nir_depth`, kept in ``calibration.json``), so that the same evidence shows the same
confidence in an archive many times larger than the one the calibration was fitted against.

The held-out logits come from patient-grouped inner CV on the training folds, with the
encoder top trained afresh on each inner training part (:func:`neurocbir.training.cached.inner_cv_neighbours`):
the run's own embeddings of its training cases are fitted to them and would flatter NIR.
Half of the inner-validation patients fit ``T``, the other half give the conformal scores.
The scores are kept (not a fitted MAPIE object) so any coverage can be asked per request and
the run folder holds no pickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from neurocbir.classify.neighbors import knn_votes, nir_positions, nir_proba
from neurocbir.errors import InvalidInput
from neurocbir.files import write_json

#: classifier name -> how its logits are made from one neighbour-label list
CALIBRATED = ("nir", "inir", "knn7")
DEFAULT_COVERAGE = 0.95
FILE = "calibration.json"


def neighbour_logits(name: str, labels: np.ndarray, n_classes: int, depth: int | None = None) -> np.ndarray:
    """Pre-softmax scores of a classifier: ``log(1 + I_c)`` for NIR / I-NIR, log votes for KNN-7.

    ``I_c`` is a count with a heavy tail (hundreds when the nearest cases are all of one class),
    so no single temperature fits ``softmax(I_c / T)`` both at 3 and at 300; on the inner CV of
    the SupCon fold-5 run, ``log(1 + I_c)`` gave cross-fitted ECE 0.044 / 0.052 against 0.073 /
    0.080 for raw ``I_c`` (docs/results.md, trust section). ``depth``: the neighbour lists read to
    that depth only (:func:`nir_depth`)."""
    if depth is not None:
        labels = np.asarray(labels)[:, :depth]
    if name in ("nir", "inir"):
        return np.log1p(nir_positions(labels, n_classes, 1 if name == "nir" else 10).astype(float))
    if name == "knn7":
        return np.log(knn_votes(labels, n_classes, 7) + 1.0 / 14)  # half a vote keeps zero votes finite
    raise InvalidInput(f"no calibration for classifier {name!r}; choose one of {CALIBRATED}")


def read_depth(*calibrators) -> int | None:
    """How deep a query's NIR list is read: as deep as the deepest of the calibrations in use (the
    slice calibration first; any with a ``depth``) reads it (an absent one reads nothing), None
    (the store's cap) where one reads the whole list or there is no slice calibration (the
    uncalibrated positions read all of it)."""
    if calibrators[0] is None:
        return None
    depths = [c.depth for c in calibrators if c is not None]
    return None if any(d is None for d in depths) else max(depths)


def nir_depth(archive_labels: np.ndarray, n_classes: int) -> int:
    """How deep NIR's calibrated confidence reads: the largest power of two not above the count of
    the archive's smallest tumor type, in the archive the calibration is fitted against.

    Where a query's nearest cases are all of its type, its NIR position is about the whole count
    of that type in the archive (docs/results.md, scale-confidence): a calibration fitted on a
    few-thousand-case archive then maps archive size, not evidence, to a probability, and an
    archive ten times larger shows higher confidence for the same evidence. Read to a depth that
    every type of the calibration archive fills, "the first ``depth`` cases are all of one type"
    is evidence of the same strength in any archive at least that large."""
    counts = np.bincount(np.asarray(archive_labels)[np.asarray(archive_labels) >= 0], minlength=n_classes)[:n_classes]
    if counts.min() < 1:
        raise InvalidInput("the calibration archive lacks a tumor type: NIR's depth cannot be set")
    return int(2 ** np.floor(np.log2(counts.min())))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The ``T`` that minimises the mean negative log-likelihood of ``softmax(logits / T)``."""

    def nll(log_t: float) -> float:
        return -float(np.mean(log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(y)), y]))

    return float(np.exp(minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded").x))


def reliability_bins(proba: np.ndarray, y: np.ndarray, bins: int = 10) -> list[dict]:
    """The reliability diagram as data: per non-empty equal-width bin of top-label confidence,
    its mean confidence, accuracy and count."""
    conf, correct = proba.max(1), (proba.argmax(1) == y)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return [
        {
            "bin": f"{b / bins:.1f}-{(b + 1) / bins:.1f}",
            "confidence": float(conf[which == b].mean()),
            "accuracy": float(correct[which == b].mean()),
            "n": int((which == b).sum()),
        }
        for b in range(bins)
        if (which == b).any()
    ]


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE: |accuracy - confidence| averaged over equal-width confidence bins."""
    return float(sum(abs(b["accuracy"] - b["confidence"]) * b["n"] for b in reliability_bins(proba, y, bins)) / len(y))


@dataclass
class Calibrator:
    """Temperature and conformal scores of one classifier (``classes``: column order)."""

    temperature: float
    scores: np.ndarray  # sorted nonconformity scores 1 - p_true of held-out patients
    depth: int | None = None  # its neighbour lists read to this depth only (neighbour_logits); None: all

    @classmethod
    def from_dict(cls, doc: dict) -> Calibrator:
        """One classifier's entry of ``calibration.json`` (or of ``region_search.json``)."""
        return cls(float(doc["temperature"]), np.asarray(doc["scores"], dtype=float), doc.get("depth"))

    def proba(self, logits: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(logits, dtype=float) / self.temperature, axis=-1)

    def threshold(self, coverage: float = DEFAULT_COVERAGE) -> float:
        """Largest nonconformity score a class may have to enter the set (finite-sample corrected)."""
        if not 0 < coverage < 1:
            raise InvalidInput("coverage must be between 0 and 1 (e.g. 0.95)")
        n = len(self.scores)
        rank = int(np.ceil((n + 1) * coverage))
        return float("inf") if rank > n else float(self.scores[rank - 1])

    def prediction_set(self, proba: np.ndarray, coverage: float = DEFAULT_COVERAGE) -> np.ndarray:
        """Boolean mask (n, classes): the classes in each prediction set (never empty: the
        most probable class is always in), the conformal set and the classes that bring the set's
        calibrated probability up to ``coverage``."""
        proba = np.atleast_2d(proba)
        # the most probable classes until their summed probability reaches the coverage
        above = np.where(proba[:, None, :] > proba[:, :, None], proba[:, None, :], 0.0).sum(2)
        return self.conformal_set(proba, coverage) | (above < coverage)

    def conformal_set(self, proba: np.ndarray, coverage: float = DEFAULT_COVERAGE) -> np.ndarray:
        """The split-conformal set alone (the classes whose ``1 - p`` clears the threshold), the most
        probable class always in: what :meth:`prediction_set` widens."""
        proba = np.atleast_2d(proba)
        keep = 1.0 - proba <= self.threshold(coverage)
        keep[np.arange(len(proba)), proba.argmax(1)] = True
        return keep

    @classmethod
    def fit(
        cls, logits: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0, depth: int | None = None
    ) -> Calibrator:
        """Fit on held-out logits (made at ``depth``): half the patients give ``T``, the other half the scores."""
        patients = np.unique(groups)
        half = np.random.default_rng(seed).permutation(patients)[: len(patients) // 2]
        a = np.isin(groups, half)
        temperature = fit_temperature(logits[a], y[a])
        p = softmax(logits[~a] / temperature, axis=1)
        return cls(temperature, np.sort(1.0 - p[np.arange(len(p)), y[~a]]), depth)

    def as_dict(self) -> dict:
        depth = {} if self.depth is None else {"depth": self.depth}
        return {"temperature": self.temperature, "scores": [round(float(s), 6) for s in self.scores], **depth}


def fit_calibrators(
    labels: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, nir_depth: int | None = None
) -> dict:
    """Calibrators for every classifier in :data:`CALIBRATED` from held-out neighbour labels,
    with the held-out ECE before and after (what the results document quotes); NIR's read to
    ``nir_depth`` (:func:`nir_depth`; None: the whole list)."""
    shown_before = {
        "nir": nir_proba(labels, n_classes, 1),
        "inir": nir_proba(labels, n_classes, 10),
        "knn7": knn_votes(labels, n_classes, 7),
    }  # what the classifiers showed uncalibrated
    out = {}
    for name in CALIBRATED:
        depth = nir_depth if name == "nir" else None
        logits = neighbour_logits(name, labels, n_classes, depth)
        cal = Calibrator.fit(logits, y, groups, depth=depth)
        out[name] = {
            **cal.as_dict(),
            "inner_cv_ece_before": expected_calibration_error(shown_before[name], y),
            "inner_cv_ece_after": expected_calibration_error(cal.proba(logits), y),
        }
    return out


def held_out_labels(parts: list[np.ndarray]) -> np.ndarray:
    """One (n, depth) array of the inner folds' neighbour labels (inner archives differ in
    size: shorter lists are padded with -1)."""
    width = max(h.shape[1] for h in parts)
    return np.concatenate([np.pad(h, ((0, 0), (0, width - h.shape[1])), constant_values=-1) for h in parts])


def save(run: Path | str, calibrators: dict, how: str, inner_cv: dict | None = None) -> None:
    """``calibration.json``: the calibrators and, with them, the inner-CV scores of the same
    held-out training patients (what every choice is judged on; never the test fold)."""
    doc = {"how": how, "classifiers": calibrators, **({"inner_cv": inner_cv} if inner_cv else {})}
    write_json(Path(run) / FILE, doc)


def load_inner_cv(run: Path | str) -> dict | None:
    """The inner-CV scores saved with the calibration, or None (older runs)."""
    path = Path(run) / FILE
    try:
        return json.loads(path.read_text()).get("inner_cv") if path.is_file() else None
    except ValueError:
        return None


def load(run: Path | str) -> dict[str, Calibrator] | None:
    """The run's calibrators, or None for a run trained before calibration existed."""
    path = Path(run) / FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())["classifiers"]
        return {k: Calibrator.from_dict(v) for k, v in doc.items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(
            f"{path} is corrupt ({type(exc).__name__}): retrain the run, or delete the file "
            "to serve uncalibrated softmax(I_c)"
        ) from None
