"""``neurocbir calibrate``: refit an existing run's calibration, whatever its recipe."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from neurocbir.data.cases import CaseTable
from neurocbir.errors import InvalidInput
from neurocbir.models.encoders import pick_device
from neurocbir.models.runs import TrainConfig
from neurocbir.training.cached import _calibrate, prepare


def calibrate_existing_run(run: Path | str, table: CaseTable | None = None) -> float:
    """(Re)fit ``calibration.json`` of a run trained before calibration existed, or with
    another calibration method; returns the seconds it took. The trials are left as they are."""
    run = Path(run)
    cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    if cfg.recipe == "lesion":
        from neurocbir.data.cases import load_cases
        from neurocbir.training.lesion_run import recalibrate_lesion_run

        t0 = time.time()
        recalibrate_lesion_run(run, table if table is not None else load_cases(cfg.data))
        return round(time.time() - t0, 1)
    device = pick_device()
    table, encoder, _, feats, _ = prepare(cfg, table, device)
    train_rows = np.flatnonzero(table.fold != cfg.fold)
    return _calibrate(cfg, run, encoder, np.asarray(feats[train_rows]), table.subset(train_rows), device)


def calibrate_studies(run: Path | str, table: CaseTable | None = None) -> dict:
    """``study_calibration.json`` of a run that held training patients out of training (the CPU
    lesion preset): those patients, each a study, queried against the other training patients
    (:mod:`neurocbir.classify.study`); returns what was measured on them."""
    from neurocbir.classify import study
    from neurocbir.data.cases import CLASS_NAMES, load_cases
    from neurocbir.training.holdout import holdout_embeddings

    run = Path(run)
    cfg = json.loads((run / "config.json").read_text())
    if not cfg.get("holdout_patients"):
        raise InvalidInput(
            f"{run}'s encoder was trained on every training patient, so a study temperature fitted on them would be "
            "over-confident: `neurocbir calibrate RUN` (without --study) fits one by inner CV, with the slice "
            "calibration (3 more trainings; a GPU is advised); until then its studies use the slice temperature"
        )
    table = table if table is not None else load_cases(cfg.get("data"))
    _, fit_rows, cal_rows, fit, cal = holdout_embeddings(run, table)
    how = f"{len(set(table.patient_id[cal_rows]))} training patients held out of training, each a study"
    calibrator, measured = study.fit_study_temperature(
        fit, table.label[fit_rows], cal, table.label[cal_rows], table.patient_id[cal_rows], len(CLASS_NAMES), how
    )
    study.save(run, calibrator, measured)
    return measured
