"""Training patients held out of training (the CPU lesion recipe's calibration patients): which rows
they are, and their embeddings by the run's first trial."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from neurocbir.data.cases import CaseTable
from neurocbir.errors import InvalidInput
from neurocbir.models.runs import TrainConfig, trial_dir


def holdout_split(cfg: TrainConfig, table: CaseTable) -> tuple[np.ndarray, np.ndarray]:
    """(rows the encoder trains on, training patients' rows held out of training to calibrate
    on): patient-grouped, ``cfg.holdout_patients`` of the training folds; none when it is 0."""
    from neurocbir.data.cases import grouped_inner_folds

    train_rows = np.flatnonzero(table.fold != cfg.fold)
    if cfg.holdout_patients <= 0:
        return train_rows, train_rows[:0]
    n_splits = max(2, round(1 / cfg.holdout_patients))
    # a fixed split (not the seed's): a seed's trial is the same trained alone or after others
    fit, cal = grouped_inner_folds(table.subset(train_rows), n_splits, seed=0)[0]
    return train_rows[fit], train_rows[cal]


def holdout_embeddings(
    run: Path | str, table: CaseTable
) -> tuple[TrainConfig, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(config, fit rows, held-out rows, their first-trial embeddings) of a run trained with
    ``holdout_patients``."""
    cfg = TrainConfig(**json.loads((Path(run) / "config.json").read_text()))
    fit_rows, cal_rows = holdout_split(cfg, table)
    if not len(cal_rows):
        raise InvalidInput(f"{run} holds no training patients out of training (holdout_patients = 0)")
    arrays = np.load(trial_dir(run, cfg.first_seed) / "embeddings.npz")
    where = {int(r): i for i, r in enumerate(arrays["archive_rows"])}
    emb = arrays["archive"]
    return cfg, fit_rows, cal_rows, emb[[where[r] for r in fit_rows]], emb[[where[r] for r in cal_rows]]
