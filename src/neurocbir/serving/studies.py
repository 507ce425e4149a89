"""A study in, one answer out: every slice of a series answered as a single query is (tumor found
or not, type, outline, area), then one answer for the study: the type with a confidence calibrated
at the study level (:mod:`neurocbir.classify.study`), the key slice (the largest outlined tumor
among the slices of the study's type),
the largest area and, where the slice spacing is known, a volume estimate, and the most similar
archive patients (one per patient: their slice nearest to any of the study's tumor slices)."""

from __future__ import annotations

import numpy as np

from neurocbir.classify import study as study_calibration
from neurocbir.data.cases import CLASS_NAMES
from neurocbir.data.studies import Study
from neurocbir.errors import InvalidInput
from neurocbir.models.lesion import tumor_outline
from neurocbir.retrieval.duplicates import ImagePrints
from neurocbir.serving.service import DISCLAIMER, RELOAD_WAIT_S, RetrievalService
from neurocbir.serving.sources import CaseFilter
from neurocbir.serving.threads import one_thread

BATCH = 32  # slices per CNN pass


@one_thread  # as a single query is answered
def answer_study(service: RetrievalService, study: Study, k: int = 5, coverage: float = 0.95) -> dict:
    """The per-slice answers and the study's one answer (see the module's docstring)."""
    if not 1 <= k <= 50:
        raise InvalidInput("k must be between 1 and 50")
    images = [s.pixels for s in study.slices]
    emb, desc, probs, peaks = [], [], [], []
    with service.inference_lock:  # batched over the slices
        for b in range(0, len(images), BATCH):
            e, d, p, pk = service.model.analyse_batch(images[b : b + BATCH], presence=True)
            emb.append(e)
            desc.append(d)
            probs += p if p is not None else [None] * len(e)
            peaks += [(float(m.max()), float(t.max())) for m, t in zip(pk, p)] if pk is not None else [None] * len(e)
    emb, desc = np.concatenate(emb), np.concatenate(desc)
    service.refresh_cases(wait_s=RELOAD_WAIT_S)
    cases = service.cases
    slices, tumor_rows, labels = [], [], []
    for i, s in enumerate(study.slices):
        searched = cases.neighbours(emb[i : i + 1], False, service.nir_read)  # once: the slice's NIR and the study's
        copies = cases.duplicates_of(ImagePrints(s.pixels))  # the slice itself in the archive: no evidence
        ev = service._evidence(
            cases, emb[i : i + 1], desc[i : i + 1], copies, k, False, coverage, False, None, searched, None, peaks[i]
        )
        own = [d.case_id for d in copies]
        outline = None
        if ev["tumor_found"] is not False and probs[i] is not None:
            outline = tumor_outline(probs[i], s.pixels.shape[:2], s.spacing_mm, service.tumor_level)
        slices.append(
            {
                "index": i,
                "name": s.name,
                "tumor_found": ev["tumor_found"],
                "prediction": ev["prediction"],
                "confidence": ev["confidence"] if ev["calibration_applies"] else None,
                "no_similar_case": ev["no_similar_case"],
                "no_close_tumor_case": bool(ev["no_close_tumor_case"]),
                "area_mm2": outline["area_mm2"] if outline else None,
                "query_tumor": outline,
                "probability_no_tumor": ev["tumor_presence"]["probability_no_tumor"],
                "presence_uncertain": bool(ev.get("presence_warning")),
            }
        )
        if ev["tumor_found"] is not False and not ev["no_similar_case"]:
            tumor_rows.append(i)
            labels.append(searched[2][~np.isin(searched[1], own)])
    out = {
        "n_slices": len(slices),
        "kind": study.kind,
        "series_uid_known": study.series_uid is not None,
        "slice_spacing_mm": study.slice_spacing_mm,
        "slices": slices,
        "disclaimer": DISCLAIMER,
        "notes": list(study.notes),
    }
    if not tumor_rows:  # no slice shows a tumor like the archive's: no tumor type for the study
        found = False if all(s["tumor_found"] is False for s in slices) else None
        return {
            **out,
            "tumor_found": found,
            "prediction": None,
            "confidence": None,
            "probabilities": None,
            "calibrated": None,
            "key_slice": None,
            "largest_area_mm2": None,
            "area_note": None,
            "presence_warning": None,
            "no_close_tumor_case": None,
            "volume_ml": None,
            "patients": [],
            "note": "No tumor found on any slice of this study."
            if found is False
            else "No slice of this study is like the archive's cases: no tumor type is given.",
        }
    # a slice counts as much as it is likely to show a tumor (1 - P(no tumor); 1 where not assessed)
    weight = np.array([1.0 - (slices[i]["probability_no_tumor"] or 0.0) for i in tumor_rows])
    cal = service.study_calibrator  # loaded with the run, not read again per study
    if cal is not None:  # each slice's list read as deep as the study calibration read them
        logits = study_calibration.study_logits(labels, len(CLASS_NAMES), weight, cal.depth)[cases.classes]
        proba, calibrated = cal.proba(logits), "study"
    elif service.calibrator is not None:  # a run without a study fit: the slice temperature, said so,
        depth = service.calibrator.depth  # on the lists read as deep as the slice calibration reads them
        logits = study_calibration.study_logits(labels, len(CLASS_NAMES), weight, depth)[cases.classes]
        proba, calibrated = service.calibrator.proba(logits), "slice temperature (inner CV)"
    else:
        logits = study_calibration.study_logits(labels, len(CLASS_NAMES), weight)[cases.classes]
        proba, calibrated = np.exp(logits) / np.exp(logits).sum(), False
    names = [CLASS_NAMES[int(c)] for c in cases.classes]
    answer = names[int(np.argmax(proba))]
    # the key slice: the largest outlined tumor among the slices of the study's type, each area
    # weighted as the slice's logits are (chosen on training patients: benchmarks/study_key_slice.py)
    areas = [(slices[i]["area_mm2"] or 0.0, i) for i in tumor_rows]
    agree = [slices[i]["prediction"] == answer for i in tumor_rows]
    # ties (no outline at all: a model without a decoder) go to the slice surest to show a tumor
    candidates = [(a * w, w, i) for (a, i), w, ok in zip(areas, weight, agree) if ok or not any(agree)]
    key = max(candidates)[2]
    outlined = [a for a, _ in areas if a > 0]
    # an area is in mm only as far as the pixel spacing is known: a JPEG's is assumed, and said so
    outlines = [slices[i]["query_tumor"] for i in tumor_rows if slices[i]["query_tumor"]]
    assumed = next((t["note"] for t in outlines if t["spacing_assumed"]), None)
    volume, volume_note = None, None
    if study.slice_spacing_mm and outlined:
        volume = round(sum(outlined) * study.slice_spacing_mm / 1000.0, 2)
        volume_note = (
            f"an estimate: outlined areas x {study.slice_spacing_mm:.2f} mm slice spacing, over {len(outlined)} slices"
        )
    distant = _distant_study(slices, tumor_rows)
    return {
        **out,
        "tumor_found": True,
        "tumor_slices": tumor_rows,
        "prediction": answer,
        "confidence": round(float(proba.max()), 4),
        "probabilities": {n: round(float(p), 4) for n, p in zip(names, proba)},
        # every counted slice's typed cases lie beyond the run's reach: no calibration holds for them
        "calibrated": False if distant else calibrated,
        "no_close_tumor_case": distant,
        "key_slice": {
            "index": key,
            "name": slices[key]["name"],
            "area_mm2": slices[key]["area_mm2"],
            "prediction": slices[key]["prediction"],
        },
        "largest_area_mm2": max(outlined) if outlined else None,
        "area_note": assumed,
        "presence_warning": _uncertain_study(slices, tumor_rows),
        "volume_ml": volume,
        "volume_note": volume_note,
        "patients": similar_patients(cases, emb[tumor_rows], k),
        "note": None,
    }


def _uncertain_study(slices: list[dict], tumor_rows: list[int]) -> str | None:
    """What the study's answer says where every slice it counts as showing a tumor is a tumor
    only by the decoder's veto (each slice's ``presence_uncertain``); None where one at least is
    a tumor by the archive's evidence too (the strip still marks the others)."""
    unsure = [slices[i]["index"] + 1 for i in tumor_rows if slices[i]["presence_uncertain"]]
    if not unsure or len(unsure) < len(tumor_rows):
        return None
    return (
        "Tumor presence uncertain on every slice that counts as showing a tumor (slice "
        + ", ".join(map(str, unsure))
        + "): on each, the archive's cases point to no tumor and only the tumor decoder's outline keeps it a"
        " tumor. The study's type holds only if those outlines are tumors: check them."
    )


def _distant_study(slices: list[dict], tumor_rows: list[int]) -> str | None:
    """What the study's answer says where every slice it counts has no close tumor case."""
    if not all(slices[i]["no_close_tumor_case"] for i in tumor_rows):
        return None
    return (
        "No close tumor case on any slice that counts as showing a tumor: the study's type is the vote of "
        "archive cases that all lie farther than the calibration's held-out scans did, so its confidence is "
        "not calibrated and no type is ruled out. Read the retrieved cases."
    )


def similar_patients(cases, queries: np.ndarray, k: int) -> list[dict]:
    """The k archive patients nearest to any of the study's tumor slices, each once, with the
    slice of theirs that came nearest (patient keys stay on the server)."""
    best: dict[str, tuple[float, int]] = {}
    for q in queries:  # each slice's k nearest patients (their nearest slices): the k nearest of all are among them
        dist, case_ids = cases.filtered(q[None], CaseFilter(), k, True)
        for d, c, p in zip(dist, case_ids, cases.patients(case_ids)):
            if p not in best or d < best[p][0]:
                best[p] = (float(d), int(c))
    nearest = sorted(best.values())[:k]
    info = cases.describe([c for _, c in nearest])
    return [{**info[c], "distance": round(d, 4), "rank": r + 1} for r, (d, c) in enumerate(nearest)]
