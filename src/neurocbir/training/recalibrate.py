"""``neurocbir calibrate``: refit an existing run's calibration, whatever its recipe."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from neurocbir.data.cases import CaseTable
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
