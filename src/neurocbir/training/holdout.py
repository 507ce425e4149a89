"""Training patients held out of training (the CPU lesion recipe's calibration patients): which rows
they are, and their embeddings by the run's first trial."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from neurocbir.data.cases import CaseTable
from neurocbir.errors import InvalidInput
from neurocbir.models.runs import TrainConfig, trial_dir

FIGSHARE_FOLDS = 5  # the dataset's patient-wise test folds


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


def extra_holdout_split(cfg: TrainConfig, cases) -> tuple[np.ndarray, np.ndarray]:
    """(rows the encoder trains on, rows held out) of the development part ``cases``
    (:class:`~neurocbir.data.external.ExternalCases`): whole groups, each source's labels in about
    the same share on both sides, ``cfg.holdout_patients`` of them held out when
    ``cfg.holdout_extra`` (else none); a fixed split, like :func:`holdout_split`, whose held-out
    part turns with the test fold (fold ``f`` keeps out part ``f mod 5``; fold 5 part 0): the five
    folds' runs together hold out 5/7 of the groups, each scored by a network that never saw it,
    which is what choosing the recipe's "no tumor" rule needs (a seventh of the groups is too few
    of Br35H's near-duplicate sets to tell)."""
    from neurocbir.data.external import group_folds

    rows = np.arange(len(cases))
    n_splits = max(2, round(1 / cfg.holdout_patients)) if cfg.holdout_patients > 0 else 0
    if not cfg.holdout_extra or not n_splits or len(np.unique(cases.groups)) < n_splits:
        return rows, rows[:0]
    parts = group_folds(cases, n_splits, 0)
    fit, held = parts[cfg.fold % FIGSHARE_FOLDS % n_splits]
    return np.sort(fit), np.sort(held)


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


def development_holdout(cfg: TrainConfig, table: CaseTable):
    """(the development part, its rows the run trained on, its held-out rows less any that twins
    (:mod:`~neurocbir.retrieval.duplicates`) a trained-on slice of it or of ``table``'s training
    patients, how many twins were left out); None for a run without held-out development groups."""
    from neurocbir.data.external import load_external, part
    from neurocbir.files import write_json
    from neurocbir.retrieval.duplicates import DuplicateIndex

    if not cfg.extra_cases:
        return None
    dev = part(load_external(cfg.extra_cases), "development")
    fit_rows, held_rows = extra_holdout_split(cfg, dev)
    if not len(held_rows):
        return None
    stored = holdout_split(cfg, table)[0]
    path = _twins_cache(table, stored, dev, fit_rows, held_rows)
    kept = _read_kept(path)
    if kept is None:
        twins = DuplicateIndex.of_images(
            [*(table.load_image(int(i)) for i in stored), *(dev.load_image(int(i)) for i in fit_rows)]
        )
        kept = np.array([i for i in held_rows if not twins.find(dev.load_image(int(i)))], dtype=int)
        write_json(path, {"kept": kept.tolist(), "held": len(held_rows)})
    return dev, fit_rows, kept, len(held_rows) - len(kept)


def _twins_cache(table: CaseTable, stored: np.ndarray, dev, fit_rows: np.ndarray, held_rows: np.ndarray) -> Path:
    """Where :func:`development_holdout`'s answer is kept (it prints and checks thousands of slices,
    and calibration, the presence choice and ``neurocbir presence-decoder`` each ask for it):
    keyed by the slices on both sides (figshare's by row, the development part's by file, its size
    and time) and the duplicate check's code."""
    from neurocbir.files import default_cache_dir, sha256_file
    from neurocbir.retrieval import duplicates

    spec = {
        "figshare": [table.loader.name, str(getattr(table.loader, "root", "")), table.idx[stored].tolist()],
        "development": [str(dev.root), *([_stat(dev.path(int(i))) for i in rows] for rows in (fit_rows, held_rows))],
        "method": sha256_file(duplicates.__file__),
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    return default_cache_dir() / "twins" / f"{key}.json"


def _stat(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def _read_kept(path: Path) -> np.ndarray | None:
    """The kept rows :func:`_twins_cache` holds; None where it holds none (or a damaged file)."""
    try:
        return np.array(json.loads(path.read_text())["kept"], dtype=int)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def held_out_development(run: Path | str, cfg: TrainConfig, table: CaseTable) -> dict | None:
    """The development slices of a known tumor type of a run trained with ``holdout_extra``,
    embedded by its first trial: those it trained on (``fit``, ``fit_y``) and the held-out ones
    that twin no trained-on slice (``held``, ``held_y``, ``held_groups``; :func:`development_holdout`)."""
    from neurocbir.models.inference import load_model

    found = development_holdout(cfg, table)
    if found is None:
        return None
    dev, fit_rows, held_rows, _ = found
    typed = dev.label_index
    fit_rows, held_rows = fit_rows[typed[fit_rows] >= 0], held_rows[typed[held_rows] >= 0]
    model = load_model(run, cfg.first_seed)

    def embed(rows: np.ndarray) -> np.ndarray:
        chunks = [model.embed([dev.load_image(int(i)) for i in rows[b : b + 32]])[0] for b in range(0, len(rows), 32)]
        return np.concatenate(chunks) if chunks else np.zeros((0, cfg.embedding_dim), np.float32)

    return {
        "fit": embed(fit_rows), "fit_y": typed[fit_rows],
        "held": embed(held_rows), "held_y": typed[held_rows], "held_groups": dev.groups[held_rows].astype(str),
    }  # fmt: skip
