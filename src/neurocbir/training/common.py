"""What every training recipe shares: seeding, and fitting a run's calibration from held-out
neighbour labels (written as ``calibration.json``, with the inner-CV scores beside it)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from neurocbir.classify import calibration
from neurocbir.evaluate.metrics import inner_cv_scores


def fit_calibration(
    run: Path, parts: list[np.ndarray], y: list, groups: list, how: str, n_classes: int, nir_depth: int | None = None
) -> None:
    """Calibrators and inner-CV scores from the inner folds' held-out neighbour labels, saved
    as the run's ``calibration.json`` (NIR's read to ``nir_depth``: :func:`~neurocbir.classify.calibration.nir_depth`)."""
    labels, y_all = calibration.held_out_labels(parts), np.concatenate(y)
    cals = calibration.fit_calibrators(labels, y_all, np.concatenate(groups), n_classes, nir_depth)
    calibration.save(run, cals, how=how, inner_cv=inner_cv_scores(labels, y_all, n_classes))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
