"""Searching by a drawn region: is there a tumor in it, and how sure is the answer?

A region search pools the embedding over the region the clinician drew instead of over the
predicted tumor (:meth:`neurocbir.models.lesion.LesionNet.pool`). Two things are its own:

* **presence in the region**: the highest probability inside the region
  (:func:`neurocbir.data.regions.region_peak`) of the tumor decoder's map, or of the presence
  decoder's where the run has one and it found more tumor boxes on the same held-out slices
  (``decoder``), against a threshold chosen on training patients
  held out of training (true tumor boxes against boxes of the same size on tissue away from
  the tumor, :func:`neurocbir.training.regions.fit_region_search`); "no tumor in this region"
  only where the decoder locates a tumor elsewhere on the slice or the slice holds none
  (:func:`presence`);
* **calibration**: the NIR temperature and conformal scores of region searches, fitted on the
  same held-out patients' tumor boxes, where they behave differently from whole-slice searches
  (else the whole-slice calibration applies, and ``region_search.json`` says so).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from neurocbir.classify.calibration import Calibrator
from neurocbir.errors import ConfigurationError
from neurocbir.files import write_json

FILE = "region_search.json"
#: the decoders whose map a region's presence can be read from
DECODERS = ("tumor", "presence")

#: how a region search is answered where the decoder outlines no tumor on the slice
NOT_LOCATED = (
    "the tumor decoder outlines no tumor anywhere on this slice, so it cannot tell whether one lies in the "
    "drawn region: the slice's own tumor-presence answer decides"
)


@dataclass
class RegionSearch:
    """How a run answers region searches: ``threshold`` on the peak inside the region of
    ``decoder``'s map (the tumor decoder's, or the presence decoder's),
    ``calibrator`` (None: the whole-slice one) and how they were chosen."""

    threshold: float
    calibrator: Calibrator | None
    how: str
    fitted: bool
    decoder: str = "tumor"


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
        calibrator = None if cal is None else Calibrator.from_dict(cal)
        chosen = str(doc.get("decoder", "tumor"))
        if chosen not in DECODERS:
            raise ValueError(chosen)
        return RegionSearch(float(doc["threshold"]), calibrator, str(doc["how"]), True, chosen)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(
            f"{path} is corrupt ({type(exc).__name__}): refit it with `neurocbir calibrate RUN --regions`"
        ) from None


def save(run: Path | str, doc: dict) -> None:
    write_json(Path(run) / FILE, doc)


def presence(
    peak: float, threshold: float, slice_peak: float | None = None, decoder: str = "tumor"
) -> tuple[bool | None, dict]:
    """(a tumor in the region: True / False, or None where the decoder outlines no tumor anywhere on
    the slice, and the evidence as the answer shows it).

    "No tumor in this region" is claimed only where the decoder locates a tumor elsewhere on the
    slice (its peak on the slice, ``slice_peak``, reaches the threshold) or the slice holds none:
    where the decoder outlines nothing at all, it cannot say where a tumor the slice's other
    evidence finds lies, and the caller lets the slice's presence answer decide (None)."""
    note = f"from the {decoder} decoder's highest probability inside the drawn region"
    evidence = {
        "probability_tumor_in_region": round(float(peak), 4),
        "probability_no_tumor": None,
        "threshold": round(float(threshold), 4),
        "located": None if slice_peak is None else bool(slice_peak >= threshold),
        "decoder": decoder,
        "note": note,
    }
    if peak >= threshold or slice_peak is None or slice_peak >= threshold:
        return bool(peak >= threshold), evidence
    return None, {**evidence, "note": NOT_LOCATED}
