"""Hyper-parameter search: 3-fold patient-grouped CV inside the training folds only, so the
test fold never influences a choice. Scored by NIR kappa on the inner validation patients."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
from sklearn.metrics import cohen_kappa_score
from tqdm import tqdm

from neurocbir.classify.neighbors import NIRClassifier
from neurocbir.data.cases import grouped_inner_folds
from neurocbir.errors import InvalidInput
from neurocbir.files import write_json
from neurocbir.models.encoders import pick_device
from neurocbir.models.inference import embed_features
from neurocbir.models.runs import TrainConfig
from neurocbir.training.cached import prepare, train_top


def default_grid(loss: str) -> dict[str, list]:
    grid: dict[str, list] = {"lr": [3e-4, 1e-3], "epochs": [10, 30]}
    if loss in ("supcon", "infonce", "nca"):
        grid["temperature"] = [0.05, 0.1, 0.2]
    elif loss == "triplet":
        grid["margin"] = [0.05, 0.1, 0.2]
    return grid


def grid_search(cfg: TrainConfig, grid: dict[str, list], out: Path, n_splits: int = 3) -> dict:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(grid) - fields
    if unknown:
        raise InvalidInput(f"unknown hyper-parameters in grid: {sorted(unknown)}")
    device = pick_device()
    table, encoder, _, feats, _ = prepare(cfg, device=device)
    train_rows = np.flatnonzero(table.fold != cfg.fold)
    train = table.subset(train_rows)
    f_train = np.asarray(feats[train_rows])
    folds = grouped_inner_folds(train, n_splits)
    results = []
    combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())]
    for combo in tqdm(combos, desc="grid", unit="config"):
        c = dataclasses.replace(cfg, **combo)
        kappas = []
        for tr, va in folds:
            top = train_top(
                c,
                encoder,
                f_train[tr],
                train.label[tr],
                seed=0,
                device=device,
                progress=False,
                groups=train.patient_id[tr],
            )
            a, _ = embed_features(top, f_train[tr], device)
            q, _ = embed_features(top, f_train[va], device, tta=c.tta)
            pred = NIRClassifier().fit(a, train.label[tr]).predict(q)
            kappas.append(float(cohen_kappa_score(train.label[va], pred)))
        results.append({"params": combo, "nir_kappa_mean": float(np.mean(kappas)), "nir_kappa_folds": kappas})
    best = max(results, key=lambda r: r["nir_kappa_mean"])
    doc = {
        "loss": cfg.loss,
        "fold": cfg.fold,
        "grid": grid,
        "results": results,
        "best": best["params"],
        "best_inner_cv_nir_kappa": best["nir_kappa_mean"],
    }
    write_json(Path(out) / "search.json", doc)
    return doc
