"""Searching by a drawn region: is there a tumor in it, and how sure is the answer?

A region search pools the embedding over the region the clinician drew instead of over the
predicted tumor (:meth:`neurocbir.models.lesion.LesionNet.pool`). Two things are its own:

* **presence in the region**: the tumor decoder's highest probability inside the region
  (:func:`neurocbir.data.regions.region_peak`) against a threshold chosen on training patients
  held out of training (true tumor boxes against boxes of the same size on tissue away from
  the tumor, :func:`neurocbir.training.regions.fit_region_search`);
* **calibration**: the NIR temperature and conformal scores of region searches, fitted on the
  same held-out patients' tumor boxes, where they behave differently from whole-slice searches
  (else the whole-slice calibration applies, and ``region_search.json`` says so).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neurocbir.classify.calibration import Calibrator
from neurocbir.errors import ConfigurationError
from neurocbir.files import write_json

FILE = "region_search.json"


@dataclass
class RegionSearch:
    """How a run answers region searches: ``threshold`` on the decoder's peak inside the region,
    ``calibrator`` (None: the whole-slice one) and how both were chosen."""

    threshold: float
    calibrator: Calibrator | None
    how: str
    fitted: bool


def load(run: Path | str, default_threshold: float) -> RegionSearch:
    """The run's ``region_search.json``; without one, the outline level and the whole-slice
    calibration (said in ``how``)."""
    path = Path(run) / FILE
    if not path.is_file():
        how = "not fitted for region searches: the outline level and the whole-slice calibration apply"
        return RegionSearch(default_threshold, None, how, False)
    try:
        doc = json.loads(path.read_text())
        cal = doc.get("calibration")
        calibrator = None if cal is None else Calibrator(float(cal["temperature"]), np.asarray(cal["scores"], float))
        return RegionSearch(float(doc["threshold"]), calibrator, str(doc["how"]), True)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(
            f"{path} is corrupt ({type(exc).__name__}): refit it with `neurocbir calibrate RUN --regions`"
        ) from None


def save(run: Path | str, doc: dict) -> None:
    write_json(Path(run) / FILE, doc)


def presence(peak: float, threshold: float) -> tuple[bool, dict]:
    """(a tumor in the region?, the evidence as the answer shows it)."""
    note = "from the tumor decoder's highest probability inside the drawn region"
    return bool(peak >= threshold), {
        "probability_tumor_in_region": round(float(peak), 4),
        "probability_no_tumor": None,
        "threshold": round(float(threshold), 4),
        "note": note,
    }
