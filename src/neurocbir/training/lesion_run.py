"""A lesion run: its trials, their calibration (on held-out training patients, or by inner CV)
and the outline level at which the app draws the query's tumor."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from neurocbir.classify import reach, study
from neurocbir.classify.calibration import nir_depth
from neurocbir.classify.neighbors import NIRClassifier
from neurocbir.data.cases import CLASS_NAMES, CaseTable
from neurocbir.errors import InvalidInput
from neurocbir.files import write_json
from neurocbir.models.encoders import Encoder, pick_device
from neurocbir.models.lesion import TUMOR_LEVEL_FILE
from neurocbir.models.runs import IN_PROGRESS, TrainConfig, trial_dir
from neurocbir.training.common import fit_calibration
from neurocbir.training.holdout import extra_holdout_split, held_out_development, holdout_embeddings, holdout_split  # noqa: F401 (holdout_split: re-exported)
from neurocbir.training.lesion import (
    STATE_FILE,
    embed_tensors,
    load_extra_tensors,
    load_tensors,
    mask_scores,
    train_lesion,
    training_precision,
    write_trial,
)

log = logging.getLogger(__name__)
TUMOR_LEVELS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


def held_out_queries(run: Path | str, table: CaseTable) -> tuple:
    """What the run's calibration is fitted on: (config, held-out figshare rows, the archive's
    embeddings and types (every case the run trained on), the query groups' embeddings (held-out
    training patients; held-out typed development slices, where the run held some out), their
    types, their patient groups, how it was made), with the run's first trial's embeddings."""
    cfg, fit_rows, cal_rows, fit, cal = holdout_embeddings(run, table)
    how = (
        f"{len(np.unique(table.patient_id[cal_rows]))} training patients ({len(cal_rows)} slices, "
        f"1/{round(1 / cfg.holdout_patients)} of folds != {cfg.fold}, patient-grouped) held out of training, "
        f"queried against the other training patients with seed {cfg.first_seed}'s encoder (test fold unseen)"
    )
    archive, archive_y = [fit], [table.label[fit_rows]]
    queries, y, groups = [cal], [table.label[cal_rows]], [table.patient_id[cal_rows].astype(str)]
    dev = held_out_development(run, cfg, table)
    if dev is not None and len(dev["held"]):
        archive.append(dev["fit"]), archive_y.append(dev["fit_y"])
        queries.append(dev["held"]), y.append(dev["held_y"]), groups.append(dev["held_groups"])
        how += (
            f"; and {len(dev['held'])} typed slices of the other hospitals' development groups held out of training "
            f"(no twin of a trained-on slice), against the figshare and development cases trained on"
        )
    return cfg, cal_rows, np.vstack(archive), np.concatenate(archive_y), queries, y, groups, how


def held_out_neighbours(run: Path | str, table: CaseTable) -> tuple:
    """(config, held-out figshare rows, the neighbour-label lists of each query group of
    :func:`held_out_queries`, their types, their patient groups, the archive's types, how it was made)."""
    cfg, cal_rows, archive, archive_y, queries, y, groups, how = held_out_queries(run, table)
    nir = NIRClassifier().fit(archive, archive_y)
    return cfg, cal_rows, [nir.neighbour_labels(q) for q in queries], y, groups, archive_y, how


def save_reach(run: Path | str, archive: np.ndarray, queries: list[np.ndarray], how: str) -> dict:
    """Fit and save how far the run's tumor-type evidence may lie (:mod:`neurocbir.classify.reach`)."""
    doc = reach.fit(reach.rank_distances(np.vstack(queries), archive), how)
    reach.save(run, doc)
    return doc


def fit_reach(run: Path | str, table: CaseTable) -> dict:
    """Only the reach of a calibrated run (``neurocbir calibrate RUN --reach``)."""
    _, _, archive, _, queries, _, _, how = held_out_queries(run, table)
    return save_reach(run, archive, queries, how)


def calibrate_on_holdout(run: Path, table: CaseTable) -> None:
    """Calibrated probabilities, prediction sets, the study temperature and the outline level of a run whose encoder
    never saw some training patients (``holdout_patients``): those patients are queried against
    the other training patients with the first trial's embeddings. One training instead of the
    three of inner CV: what makes calibration affordable on a CPU. A run that held out some of
    the other hospitals' development groups too (``holdout_extra``) calibrates on their slices of a
    known tumor type as well, queried against every trained-on case (as the app's archive holds them).
    First the run's embedding is chosen (the scan alone, or with its mirror: :mod:`~neurocbir.training.mirror_choice`),
    and all of this is fitted on what it chose."""
    from neurocbir.training.mirror_choice import choose_mirror

    choose_mirror(run, table)
    cfg, cal_rows, archive, archive_y, queries, y, groups, how = held_out_queries(run, table)
    nir = NIRClassifier().fit(archive, archive_y)
    held_out = [nir.neighbour_labels(q) for q in queries]
    depth = nir_depth(archive_y, len(CLASS_NAMES))
    read = f"; NIR read to depth {depth} (the largest power of two not above the archive's smallest tumor type)"
    fit_calibration(Path(run), held_out, y, groups, how + read, len(CLASS_NAMES), depth)
    save_reach(run, archive, queries, how)
    fit_tumor_level(Path(run), table, cal_rows, cfg.first_seed)
    cal, measured = study.fit_study_temperature_from_neighbours(
        list(held_out[0]),
        y[0],
        groups[0],
        len(CLASS_NAMES),
        f"held-out training patients as studies: {how}{read}",
        depth,
    )
    study.save(Path(run), cal, measured)
    from neurocbir.training.regions import fit_region_search

    try:
        fit_region_search(Path(run), table)
    except InvalidInput as exc:  # too few held-out tumor slices: region searches use the whole-slice answers
        log.warning("region searches not fitted: %s", exc)


def fit_tumor_level(run: Path, table: CaseTable, cal_rows: np.ndarray, seed: int) -> dict:
    """The probability level at which the app outlines the query's tumor, chosen on training
    patients held out of training (``cal_rows``), through the app's own path (full-resolution
    slices); written as the run's ``tumor_level.json``."""
    from neurocbir.models.inference import load_model

    model = load_model(run, seed)
    probs = ((model.analyse(image)[2], image.shape[:2]) for image in map(table.load_image, cal_rows))
    how = f"median relative area error on {len(cal_rows)} slices of training patients held out of training"
    return write_tumor_level(run, outline_area_errors(probs, table.area_mm2[cal_rows]), how)


def outline_area_errors(probs: Iterable[tuple[np.ndarray, tuple[int, int]]], true_area: np.ndarray) -> np.ndarray:
    """(slices, TUMOR_LEVELS) relative error of the outlined area at each level: ``probs`` gives
    each slice's tumor probability map and the shape of the scan it covers."""
    from neurocbir.models.lesion import tumor_outline

    areas = [
        [(t["area_mm2"] if (t := tumor_outline(prob, shape, None, level)) else 0.0) for level in TUMOR_LEVELS]
        for prob, shape in probs
    ]
    return np.abs(np.asarray(areas) - true_area[:, None]) / true_area[:, None]


def write_tumor_level(run: Path, errors: np.ndarray, how: str) -> dict:
    """``tumor_level.json``: the level of :data:`TUMOR_LEVELS` with the smallest median error."""
    median = np.median(errors, axis=0)
    doc = {
        "level": TUMOR_LEVELS[int(np.argmin(median))],
        "how": how,
        "held_out_median_area_error": {str(k): round(float(v), 4) for k, v in zip(TUMOR_LEVELS, median)},
    }
    write_json(Path(run) / TUMOR_LEVEL_FILE, doc)
    return doc


def with_extra_cases(
    images: torch.Tensor, masks: torch.Tensor, labels: np.ndarray, extra: tuple | None
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor | None]:
    """Training slices, masks and labels with ``extra`` (:func:`load_extra_tensors`) appended, and
    which masks are known (None: all of them, when there is nothing to append)."""
    if extra is None:
        return images, masks, labels, None
    x, m, y, k = extra
    device = images.device
    known = torch.cat([torch.ones(len(labels), dtype=torch.bool), k]).to(device)
    return torch.cat([images, x.to(device)]), torch.cat([masks, m.to(device)]), np.concatenate([labels, y]), known


def extra_training_cases(cfg: TrainConfig) -> tuple[tuple | None, np.ndarray]:
    """The other hospitals' development slices a run trains on (:func:`load_extra_tensors`; None
    without ``extra_cases``) and the rows of the development part it holds out
    (:func:`~neurocbir.training.holdout.extra_holdout_split`)."""
    if not cfg.extra_cases:
        return None, np.zeros(0, int)
    from neurocbir.data.external import load_external, part

    fit, held = extra_holdout_split(cfg, part(load_external(cfg.extra_cases), "development"))
    return load_extra_tensors(cfg.extra_cases, cfg.image_size, fit, cfg.intensity), held


def lesion_inner_cv_neighbours(
    cfg: TrainConfig,
    encoder: Encoder,
    images: torch.Tensor,
    masks: torch.Tensor,
    train: CaseTable,
    train_rows: np.ndarray,
    device: torch.device,
    n_splits: int = 3,
    compile_net: bool = False,
) -> tuple[list, list, list, np.ndarray]:
    """Held-out neighbour labels of 3 patient-grouped inner folds of the training patients, a
    LesionNet retrained on each (see :func:`neurocbir.training.cached.inner_cv_neighbours`), and the
    held-out slices' outline area errors at each level (:func:`outline_area_errors`). A run trained
    with ``extra_cases`` has them in every inner training too (never among the held-out)."""
    from neurocbir.data.cases import grouped_inner_folds

    held_out, y, groups, area_errors = [], [], [], []
    grid = (cfg.image_size, cfg.image_size)
    extra, _ = extra_training_cases(cfg)
    for tr, va in grouped_inner_folds(train, n_splits):
        x, m, lab, known = with_extra_cases(images[train_rows[tr]], masks[train_rows[tr]], train.label[tr], extra)
        net = train_lesion(
            cfg, encoder, x, m, lab, cfg.first_seed, device, progress=False, compile_net=compile_net, mask_known=known
        )
        emb, _, prob = embed_tensors(net, images[train_rows], device, level=None)
        held_out.append(NIRClassifier().fit(emb[tr], train.label[tr]).neighbour_labels(emb[va]))
        y.append(train.label[va])
        groups.append(train.patient_id[va])
        area_errors.append(outline_area_errors(((prob[i].astype(np.float32), grid) for i in va), train.area_mm2[va]))
    return held_out, y, groups, np.concatenate(area_errors)


def calibrate_by_inner_cv(
    cfg: TrainConfig,
    run: Path,
    table: CaseTable,
    encoder: Encoder,
    images: torch.Tensor,
    masks: torch.Tensor,
    device: torch.device,
    compile_net: bool = False,
) -> None:
    """``calibration.json``, ``study_calibration.json`` and ``tumor_level.json`` of a run that holds
    no training patients out (the GPU preset), from 3 patient-grouped inner folds of its training patients, a LesionNet
    retrained on each: 3 more trainings."""
    train_rows = np.flatnonzero(table.fold != cfg.fold)
    *parts, area_errors = lesion_inner_cv_neighbours(
        cfg, encoder, images, masks, table.subset(train_rows), train_rows, device, compile_net=compile_net
    )
    how = (
        f"3-fold patient-grouped CV inside the training folds (test fold {cfg.fold} unseen), "
        f"LesionNet retrained per inner fold with seed {cfg.first_seed}"
    )
    fit_calibration(run, *parts, how, len(CLASS_NAMES))
    write_tumor_level(run, area_errors, f"median relative area error on {len(area_errors)} slices: {how}")
    held_out, y, groups = parts  # each inner fold's held-out patients, each a study
    neighbour = [row for fold in held_out for row in fold]
    cal, measured = study.fit_study_temperature_from_neighbours(
        neighbour, np.concatenate(y), np.concatenate(groups), len(CLASS_NAMES), f"training patients as studies: {how}"
    )
    study.save(run, cal, measured)


def recalibrate_lesion_run(
    run: Path, table: CaseTable, cfg: TrainConfig | None = None, compile_net: bool = False
) -> None:
    """Refit a lesion run's calibration and outline level from its files: on its held-out training
    patients (the CPU preset; no training), or by inner CV (3 trainings; a GPU is advised).
    ``cfg``: the run's config with other data or weights paths (default: its config.json)."""
    cfg = cfg or TrainConfig(**json.loads((Path(run) / "config.json").read_text()))
    if cfg.holdout_patients > 0:
        calibrate_on_holdout(run, table)
        return
    device = pick_device()
    images, masks = load_tensors(table, cfg.image_size, cfg.intensity)
    encoder = cfg.build_encoder()
    calibrate_by_inner_cv(cfg, run, table, encoder, images.to(device), masks.to(device), device, compile_net)


def cpu_name() -> str:
    """The CPU's model name (what a timing was measured on)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _trial_done(out: Path, seed: int, first: bool, cfg: TrainConfig, cal_rows: np.ndarray) -> bool:
    """Is a trial of an interrupted run finished (indexed; the first one calibrated too)?"""
    if not (trial_dir(out, seed) / "index.faiss").is_file():
        return False
    return not (first and cfg.calibrate and len(cal_rows)) or (out / TUMOR_LEVEL_FILE).is_file()


def train_lesion_run(
    cfg: TrainConfig,
    out: Path,
    table: CaseTable,
    deadline: float | None = None,
    progress: bool = True,
    on_trial: Callable[[int, float], None] | None = None,
    score_test_outline: bool = False,
    compile_net: bool = False,
    resume: bool = False,
) -> dict:
    """Train ``cfg.trials`` seeds (fewer if ``deadline``, a ``time.time()``, would be passed) and
    write the run; returns timings, and with ``score_test_outline`` the first trial's tumor-outline
    scores on the test fold: a report, for where the test fold is read anyway (the GPU recipe), never
    for a run among candidates still to be chosen from.

    The run is marked unfinished (:data:`~neurocbir.models.runs.IN_PROGRESS`) until its last step,
    so that nothing serves or evaluates half of it; every epoch leaves a training state, and
    ``resume`` continues an interrupted run with its own config: finished trials are kept, the
    interrupted one goes on after its last finished epoch."""
    t_start = time.time()
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        saved = TrainConfig(**json.loads((out / "config.json").read_text()))
        if dataclasses.asdict(saved) != dataclasses.asdict(cfg):
            raise InvalidInput(f"{out} was started with another configuration: resume it with its own config.json")
    elif (out / IN_PROGRESS).is_file():
        raise InvalidInput(f"{out} holds an unfinished run: continue it with --resume, or train into another folder")
    write_json(out / IN_PROGRESS, {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    write_json(out / "config.json", dataclasses.asdict(cfg))
    device = pick_device()
    encoder = cfg.build_encoder()
    t0 = time.time()
    images, masks = load_tensors(table, cfg.image_size, cfg.intensity)
    images, masks = images.to(device), masks.to(device)
    old = json.loads((out / "timings.json").read_text()) if resume and (out / "timings.json").is_file() else {}
    timings: dict = {
        "load_s": round(time.time() - t0, 1),
        "trials_s": old.get("trials_s", []),
        "precision": training_precision(cfg, device),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "resumed": old.get("resumed", 0) + int(resume),
    }
    test_rows = np.flatnonzero(table.fold == cfg.fold)
    if len(test_rows) == 0:
        raise InvalidInput(f"fold {cfg.fold} has no cases")
    fit_rows, cal_rows = holdout_split(cfg, table)
    # other hospitals' development part: training cases only (the run's index stays the dataset's)
    extra, extra_held = extra_training_cases(cfg)
    fit_images, fit_masks, fit_labels, known = with_extra_cases(
        images[fit_rows], masks[fit_rows], table.label[fit_rows], extra
    )
    if extra is not None:
        timings["extra_cases"] = {
            "folder": cfg.extra_cases,
            "part": "development",
            "n": len(extra[2]),
            "held_out": len(extra_held),
        }
    tumor: dict = {}
    for seed in range(cfg.first_seed, cfg.first_seed + cfg.trials):
        first = seed == cfg.first_seed
        if resume and _trial_done(out, seed, first, cfg, cal_rows):
            continue
        last = timings["trials_s"][-1] if timings["trials_s"] else 0.0
        if deadline is not None and time.time() + 1.2 * last > deadline:
            break
        t1 = time.time()
        tdir = trial_dir(out, seed)
        tdir.mkdir(parents=True, exist_ok=True)
        net = train_lesion(
            cfg,
            encoder,
            fit_images,
            fit_masks,
            fit_labels,
            seed,
            device,
            log_path=tdir / "log.jsonl",
            progress=progress,
            compile_net=compile_net,
            mask_known=known,
            state_path=tdir / STATE_FILE,
        )
        pred = write_trial(tdir, net, cfg, encoder, images, table, device)
        if first and cfg.calibrate and len(cal_rows):
            calibrate_on_holdout(out, table)
        (tdir / STATE_FILE).unlink(missing_ok=True)
        timings["trials_s"].append(round(time.time() - t1, 1))
        write_json(out / "timings.json", timings)
        if on_trial:
            on_trial(seed, timings["trials_s"][-1])
        if first and score_test_outline:  # the served trial's outline quality on the test fold
            s = mask_scores(pred, masks[test_rows, 0].cpu().numpy())
            true_area = table.area_mm2[test_rows]
            rel = np.abs(s["area_mm2"] - true_area) / np.maximum(true_area, 1e-6)
            tumor = {
                "median_dice": float(np.median(s["dice"])),
                "mean_dice": float(np.mean(s["dice"])),
                "median_area_rel_error": float(np.median(rel)),
                "seed": seed,
            }
    if (
        cfg.calibrate
        and not len(cal_rows)
        and (deadline is None or time.time() + 3.6 * max(timings["trials_s"]) < deadline)
    ):
        t2 = time.time()
        calibrate_by_inner_cv(cfg, out, table, encoder, images, masks, device, compile_net)
        timings["calibration_s"] = round(time.time() - t2, 1)
    if score_test_outline:
        timings["tumor_outline"] = tumor
    # weights, data, training, index, calibration (this session's part, where resumed)
    timings["total_s"] = round(time.time() - t_start, 1) + old.get("total_s", 0.0)
    write_json(out / "timings.json", timings)
    (out / IN_PROGRESS).unlink(missing_ok=True)
    return timings
