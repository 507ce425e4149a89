"""Fit how a lesion run answers searches by a drawn region (:mod:`neurocbir.classify.region`), on
training patients held out of training: never the test fold.

Each held-out tumor slice is searched by its tumor's bounding box (the region a clinician would
draw) and by a box of the same size on tissue away from the tumor. The presence threshold is
the highest share of tumor boxes found among thresholds that answer "no tumor in this region"
for at least :data:`MIN_AWAY_NONE` of the away boxes, each answered as the app answers it (no
claim about a region where the decoder outlines no tumor on the slice: :func:`choose_threshold`).
The calibration: a temperature and conformal scores fitted on half the held-out patients' tumor-box searches replace the whole-slice
calibration only where they lower the ECE on the other half by :data:`MIN_ECE_GAIN` or more.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neurocbir.classify import calibration
from neurocbir.classify import region as region_search
from neurocbir.classify.neighbors import NIRClassifier
from neurocbir.classify.region import DECODERS
from neurocbir.data.cases import CLASS_NAMES, CaseTable
from neurocbir.data.regions import away_box, box_region, region_on_grid, region_peak, tumor_box
from neurocbir.errors import InvalidInput

#: thresholds tried on the decoder's peak inside a region
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))
#: the least share of away-from-tumor boxes a threshold must answer "no tumor in this region"
MIN_AWAY_NONE = 0.95
#: the fewest held-out tumor slices (and away boxes) to fit on
MIN_SLICES = 10
#: the ECE gain on the other half of the patients for region searches to get their own calibration
MIN_ECE_GAIN = 0.005


def region_searches(model, table: CaseTable, rows: np.ndarray, seed: int = 0) -> dict:
    """Tumor-box and away-box searches of the tumor slices among ``rows``: their rows, the
    tumor-box embeddings and, per decoder (:data:`~neurocbir.classify.region.DECODERS`; the
    presence decoder's map is the tumor decoder's where the run has none), its map's peak inside
    each box and on the whole slice (the map does not depend on the region searched by)."""
    rng = np.random.default_rng(seed)
    size = model.input_size
    out = {"rows": [], "embedding": []}
    peaks = {d: {"box_peak": [], "away_peak": [], "slice_peak": [], "away_slice_peak": []} for d in DECODERS}
    for r in rows:
        mask = table.load_mask(int(r)) > 0
        if table.label[r] >= len(CLASS_NAMES) or not mask.any():
            continue
        image = table.load_image(int(r))
        grid = region_on_grid(box_region(tumor_box(mask), image.shape), size)
        emb, _, probs, shown = model.analyse_batch([image], [grid], presence=True)
        out["rows"].append(int(r))
        out["embedding"].append(emb[0])
        away = away_box(image, mask, rng)
        away = None if away is None else region_on_grid(box_region(away, image.shape), size)
        for decoder, prob in zip(DECODERS, (probs[0], shown[0]), strict=True):
            p = peaks[decoder]
            p["box_peak"].append(region_peak(prob, grid))
            p["slice_peak"].append(float(prob.max()))
            if away is not None:
                p["away_peak"].append(region_peak(prob, away))
                p["away_slice_peak"].append(float(prob.max()))
    arrays = {d: {k: np.asarray(v) for k, v in p.items()} for d, p in peaks.items()}
    return {"rows": out["rows"], "embedding": np.asarray(out["embedding"]), **arrays}


def choose_threshold(
    box_peak: np.ndarray, away_peak: np.ndarray, slice_peak: np.ndarray, away_slice_peak: np.ndarray
) -> tuple[float, dict]:
    """(threshold, the found / none rates of every threshold tried), the region answered as the app
    answers it (:func:`neurocbir.classify.region.presence`) on slices that hold a tumor: where the
    decoder's peak on the whole slice (``slice_peak``) stays below the threshold, the slice's
    presence answer decides, taken here as "tumor" (every slice fitted on holds one)."""
    blind, away_blind = np.asarray(slice_peak), np.asarray(away_slice_peak)
    rates = {
        t: (float(np.mean((box_peak >= t) | (blind < t))), float(np.mean((away_peak < t) & (away_blind >= t))))
        for t in THRESHOLDS
    }
    ok = [t for t, (_, none) in rates.items() if none >= MIN_AWAY_NONE] or [max(THRESHOLDS)]
    best = max(ok, key=lambda t: (rates[t][0], rates[t][1]))
    return best, {str(t): {"tumor_box_found": round(f, 4), "away_box_none": round(n, 4)} for t, (f, n) in rates.items()}


def fit_region_search(run: Path | str, table: CaseTable) -> dict:
    """Choose and save the run's ``region_search.json`` (see the module); returns it."""
    from neurocbir.models.inference import LesionModel, load_model
    from neurocbir.training.holdout import holdout_embeddings

    cfg, fit_rows, cal_rows, fit_emb, _ = holdout_embeddings(run, table)
    model = load_model(run, cfg.first_seed)
    if not isinstance(model, LesionModel):
        raise InvalidInput(f"{run} is not a lesion run: only a tumor decoder's runs search by region")
    found = region_searches(model, table, cal_rows)
    if len(found["rows"]) < MIN_SLICES or len(found["tumor"]["away_peak"]) < MIN_SLICES:
        raise InvalidInput(f"{run}: too few held-out tumor slices with masks to fit region searches")
    decoders = DECODERS if model.net.has_presence_decoder else DECODERS[:1]
    chosen = {d: choose_threshold(**found[d]) for d in decoders}
    # the decoder whose map finds the most tumor boxes at its threshold (the tumor decoder's on a tie)
    decoder = max(decoders, key=lambda d: (chosen[d][1][str(chosen[d][0])]["tumor_box_found"], d == "tumor"))
    threshold, rates = chosen[decoder]
    rows = found["rows"]
    y, groups = table.label[rows], table.patient_id[rows]
    labels = NIRClassifier().fit(fit_emb, table.label[fit_rows]).neighbour_labels(found["embedding"])
    whole = (calibration.load(run) or {}).get("nir")
    depth = None if whole is None else whole.depth  # read as the whole-slice calibration reads them
    logits = calibration.neighbour_logits("nir", labels, len(CLASS_NAMES), depth)
    own = calibration.Calibrator.fit(logits, y, groups, depth=depth)
    half = np.random.default_rng(0).permutation(np.unique(groups))[: len(np.unique(groups)) // 2]
    other = ~np.isin(groups, half)  # the patients Calibrator.fit took no temperature from
    ece_own = calibration.expected_calibration_error(own.proba(logits[other]), y[other])
    ece_whole = (
        calibration.expected_calibration_error(whole.proba(logits[other]), y[other]) if whole is not None else None
    )
    use_own = ece_whole is None or ece_whole - ece_own >= MIN_ECE_GAIN
    n_patients = len(np.unique(groups))
    doc = {
        "threshold": threshold,
        "decoder": decoder,
        "calibration": own.as_dict() if use_own else None,
        "how": (
            f"{len(rows)} tumor slices of {n_patients} training patients held out of training, each searched by "
            f"its tumor's bounding box and by a box of that size on tissue away from the tumor "
            f"({len(found['tumor']['away_peak'])}); threshold: the most tumor boxes found with >= {MIN_AWAY_NONE:.0%} "
            f"of away boxes answered 'no tumor' (where the decoder outlines no tumor on the slice, the slice's answer "
            f"decides: taken as 'tumor' here), on the {decoder} decoder's map{_versus(chosen)}; "
            + (
                "own calibration (it lowered the ECE on the other half of the patients)"
                if use_own
                else f"the whole-slice calibration applies (own calibration lowered the ECE by less than {MIN_ECE_GAIN})"
            )
        ),
        "measured": {
            "n_slices": len(rows),
            "n_patients": n_patients,
            "tumor_box_accuracy": round(float(np.mean(np.argmax(logits, 1) == y)), 4),
            "ece_other_half_own": round(ece_own, 4),
            "ece_other_half_whole_slice": None if ece_whole is None else round(ece_whole, 4),
            "thresholds": rates,
            "decoders": {d: {"threshold": t, **r[str(t)]} for d, (t, r) in chosen.items()},
        },
    }
    region_search.save(run, doc)
    return doc


def _versus(chosen: dict) -> str:
    """How the decoders compared on the held-out boxes (empty where the run has one decoder)."""
    if len(chosen) < 2:
        return ""
    found = {d: r[str(t)]["tumor_box_found"] for d, (t, r) in chosen.items()}
    tie = len(set(found.values())) == 1
    shares = " vs ".join(f"the {d} decoder's {f:.1%}" for d, f in found.items())
    return f" (tumor boxes found at each decoder's threshold: {shares}{'; the tumor decoder kept on a tie' if tie else ''})"
