"""One answer per study (a patient's series), not per slice, with a confidence calibrated at the
study level.

The slices of one patient are not independent evidence (neighbouring slices show the same
tumor), so their probabilities are not multiplied. A study's logits are the mean, over its slices
that show a tumor, of each slice's NIR logits ``log(1 + I_c)`` (the same logits the slice
calibration uses), and one temperature, fitted on whole training patients, turns them into
probabilities: ``softmax(mean / T_study)``.

Fitted on training patients the encoder never saw, and saved as ``study_calibration.json`` in
the run: a CPU lesion run's held-out patients, queried against the other training patients
(:func:`fit_study_temperature`), or a GPU run's inner-CV patients, each held out of a retrained
network (:func:`fit_study_temperature_from_neighbours`, by ``neurocbir calibrate`` / the GPU recipe).
A run whose encoder saw every training patient and that has no inner-CV study fit (the committed
model, calibrated before this file existed) uses its slice temperature for the study logits, and
says so: fitted on patients its encoder was trained on, the temperature came out 0.07, certainty
for every study.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import softmax

from neurocbir.classify.calibration import expected_calibration_error, fit_temperature, neighbour_logits
from neurocbir.classify.neighbors import NIRClassifier
from neurocbir.errors import ConfigurationError
from neurocbir.files import write_json

FILE = "study_calibration.json"


def study_logits(
    slice_labels: list[np.ndarray], n_classes: int, weights: np.ndarray | None = None, depth: int | None = None
) -> np.ndarray:
    """(n_classes,) logits of a study from the neighbour-label lists of its tumor slices, each
    weighted by how likely it shows a tumor (``weights``: 1 - P(no tumor); default equal), each list
    read to ``depth`` (as the slice calibration reads NIR's: :func:`~neurocbir.classify.calibration.nir_depth`;
    None: the whole list)."""
    if not slice_labels:
        raise ValueError("a study needs at least one slice with a tumor")
    if depth is not None:
        slice_labels = [np.asarray(lab)[:depth] for lab in slice_labels]
    width = max(len(lab) for lab in slice_labels)
    padded = np.stack([np.pad(lab, (0, width - len(lab)), constant_values=-1) for lab in slice_labels])
    w = np.ones(len(slice_labels)) if weights is None else np.maximum(np.asarray(weights, float), 1e-6)
    return (neighbour_logits("nir", padded, n_classes) * w[:, None]).sum(axis=0) / w.sum()


@dataclass
class StudyCalibrator:
    temperature: float
    how: str = ""
    depth: int | None = None  # how deep each slice's neighbour list is read (None: the whole list)

    def proba(self, logits: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(logits, dtype=float) / self.temperature, axis=-1)


def fit_study_temperature(
    archive: np.ndarray,
    archive_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    query_patients: np.ndarray,
    n_classes: int,
    how: str,
) -> tuple[StudyCalibrator, dict]:
    """The study temperature from held-out patients (all slices of each, queried against the
    archive): (calibrator, what was measured on those patients)."""
    neighbour = NIRClassifier().fit(archive, archive_labels).neighbour_labels(queries)
    return fit_study_temperature_from_neighbours(list(neighbour), query_labels, query_patients, n_classes, how)


def fit_study_temperature_from_neighbours(
    neighbour: list[np.ndarray],
    labels: np.ndarray,
    patients: np.ndarray,
    n_classes: int,
    how: str,
    depth: int | None = None,
) -> tuple[StudyCalibrator, dict]:
    """The same from each held-out slice's neighbour labels (nearest first), as inner CV gives them:
    one study per patient; each list read to ``depth`` (None: the whole list)."""
    labels, patients = np.asarray(labels), np.asarray(patients)
    keys = np.unique(patients)
    logits = np.stack(
        [study_logits([neighbour[i] for i in np.flatnonzero(patients == p)], n_classes, None, depth) for p in keys]
    )
    y = np.array([np.bincount(labels[patients == p]).argmax() for p in keys])
    cal = StudyCalibrator(fit_temperature(logits, y), how, depth)
    proba = cal.proba(logits)
    return cal, {
        "n_patients": int(len(keys)),
        "accuracy": float((proba.argmax(1) == y).mean()),
        "ece": expected_calibration_error(proba, y),
    }


def save(run: Path | str, cal: StudyCalibrator, measured: dict) -> None:
    depth = {} if cal.depth is None else {"depth": cal.depth}
    write_json(
        Path(run) / FILE, {"temperature": cal.temperature, "how": cal.how, **depth, "training_patients": measured}
    )


def load(run: Path | str) -> StudyCalibrator | None:
    path = Path(run) / FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        depth = doc.get("depth")
        return StudyCalibrator(
            float(doc["temperature"]), str(doc.get("how", "")), None if depth is None else int(depth)
        )
    except (ValueError, KeyError, TypeError):
        raise ConfigurationError(f"{path} is corrupt: delete it (studies then use the slice calibration)") from None
