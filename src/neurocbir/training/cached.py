"""Training the encoder's top on cached trunk features, with losses from
pytorch-metric-learning (triplet, NCA, InfoNCE, SupCon) or cross-entropy + an MLP head.

:func:`train_run` writes a run directory (layout in :mod:`neurocbir.models.runs`): per seed the
checkpoint, the embeddings of archive (training) and test cases, the FAISS index and a log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from pytorch_metric_learning import losses, miners, samplers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from tqdm import tqdm

from neurocbir.classify.neighbors import NIRClassifier
from neurocbir.data.cases import CLASS_NAMES, CaseTable, grouped_inner_folds, load_cases
from neurocbir.errors import InvalidInput
from neurocbir.files import atomic_write, sha256_file, write_json
from neurocbir.models.encoders import Encoder, Top, pick_device
from neurocbir.models.inference import embed_features, trunk_descriptors
from neurocbir.models.runs import TrainConfig, trial_dir
from neurocbir.retrieval.index import VectorIndex, numpy_search_takes_params
from neurocbir.training.common import fit_calibration, seed_everything
from neurocbir.training.features import cached_features

numpy_search_takes_params()  # pytorch-metric-learning's import patched FAISS's search (see there)


def _loss_fn(cfg: TrainConfig):
    if cfg.loss == "supcon":
        return losses.SupConLoss(temperature=cfg.temperature), None
    if cfg.loss == "infonce":
        return losses.NTXentLoss(temperature=cfg.temperature), None
    if cfg.loss == "nca":
        return losses.NCALoss(softmax_scale=1.0 / cfg.temperature), None
    if cfg.loss == "triplet":
        return (
            losses.TripletMarginLoss(margin=cfg.margin),
            miners.TripletMarginMiner(margin=cfg.margin, type_of_triplets="semihard"),
        )
    return nn.CrossEntropyLoss(), None


def _batches(cfg: TrainConfig, labels: np.ndarray, n_views: int, rng: np.random.Generator):
    """Yield (case rows, view numbers, labels-for-the-loss) for one epoch over every view."""
    n = len(labels)
    if cfg.loss == "infonce":  # two different views of each case; labels = case identity
        cases = rng.permutation(n)
        half = max(2, cfg.batch_size // 2)
        for b in range(0, n - 1, half):
            rows = cases[b : b + half]
            if len(rows) < 2:
                continue
            v = np.stack([rng.choice(n_views, 2, replace=False) for _ in rows])
            yield (
                np.concatenate([rows, rows]),
                np.concatenate([v[:, 0], v[:, 1]]),
                np.concatenate([np.arange(len(rows))] * 2),
            )
        return
    item_labels = np.repeat(labels, n_views)
    total = n * n_views
    if cfg.loss == "ce":
        order = rng.permutation(total)
    else:  # balanced batches: m per class
        # m per class; a batch never larger than the data (small sets, inner calibration folds)
        m = max(2, min(cfg.batch_size, total) // len(np.unique(labels)))
        sampler = samplers.MPerClassSampler(
            item_labels, m=m, batch_size=m * len(np.unique(labels)), length_before_new_iter=total
        )
        order = np.fromiter(iter(sampler), dtype=np.int64)
        bs = m * len(np.unique(labels))
        order = order[: len(order) // bs * bs]
    bs = cfg.batch_size if cfg.loss == "ce" else m * len(np.unique(labels))
    for b in range(0, len(order), bs):
        items = order[b : b + bs]
        if len(items) < 2:
            continue
        yield items // n_views, items % n_views, item_labels[items]


def _cross_patient(indices: tuple, patients: torch.Tensor) -> tuple:
    """Drop positive pairs of the same patient: slices of one patient are near-duplicates, and
    pulling them together teaches patient identity rather than tumor type."""
    if len(indices) == 4:
        a1, p, a2, n = indices
        keep = patients[a1] != patients[p]
        return a1[keep], p[keep], a2, n
    a, p, n = indices
    keep = patients[a] != patients[p]
    return a[keep], p[keep], n[keep]


@torch.enable_grad()
def train_top(
    cfg: TrainConfig,
    encoder: Encoder,
    feats: np.ndarray,
    labels: np.ndarray,
    seed: int,
    device: torch.device,
    log_path: Path | None = None,
    progress: bool = True,
    groups: np.ndarray | None = None,
) -> Top:
    """Train a fresh top on cached features ``feats`` (N, views, ...) of the training cases
    (``groups``: their patient ids, needed for ``cross_patient_positives``)."""
    seed_everything(seed)
    cut = encoder.cut(cfg.trainable_blocks)
    # a fresh head on copies of the pretrained stages: trials are independent
    top = Top(encoder, cut, len(CLASS_NAMES), with_mlp=cfg.loss == "ce").to(device)
    head_params = list(top.head.parameters()) + (list(top.mlp.parameters()) if top.mlp is not None else [])
    param_groups = [{"params": head_params, "lr": cfg.lr}]
    trunk_params = [p for s in top.stages for p in s.parameters()]
    if trunk_params:
        param_groups.append({"params": trunk_params, "lr": cfg.lr_trunk})
    opt = torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)
    loss_fn, miner = _loss_fn(cfg)
    data = torch.from_numpy(np.asarray(feats))  # stays float16; batches are converted on the fly
    sample = data[torch.randperm(len(data))[:256]].float()
    noise_std = float(sample.std()) * cfg.feature_noise
    rng = np.random.default_rng(seed)
    cross = cfg.cross_patient_positives and cfg.loss in ("supcon", "triplet")
    if cross and groups is None:
        raise InvalidInput("cross_patient_positives needs the training cases' patient ids")
    patient_codes = np.unique(np.asarray(groups), return_inverse=True)[1] if groups is not None else None
    with open(log_path, "w") if log_path else contextlib.nullcontext() as log:
        for epoch in tqdm(range(cfg.epochs), desc=f"{cfg.loss} seed {seed}", unit="epoch", disable=not progress):
            top.train()
            total, count = 0.0, 0
            for rows, views, y in _batches(cfg, labels, data.shape[1], rng):
                x = data[torch.from_numpy(rows), torch.from_numpy(views)].to(device).float()
                if noise_std:
                    x = x + noise_std * torch.randn_like(x)
                y = torch.from_numpy(np.asarray(y)).to(device)
                if cfg.loss == "ce":
                    loss = loss_fn(top.mlp(top.raw(x)), y)
                else:
                    emb = top(x)
                    indices = miner(emb, y) if miner is not None else None
                    if cross:
                        pats = torch.from_numpy(patient_codes[rows]).to(device)
                        indices = _cross_patient(indices if indices is not None else lmu.get_all_pairs_indices(y), pats)
                    loss = loss_fn(emb, y, indices) if indices is not None else loss_fn(emb, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(y)
                count += len(y)
            if log:
                log.write(json.dumps({"epoch": epoch + 1, "loss": total / max(count, 1)}) + "\n")
                log.flush()
    return top.eval()


def prepare(cfg: TrainConfig, table: CaseTable | None = None, device: torch.device | None = None):
    """Load cases, build the encoder and the feature cache shared by every trial."""
    table = table if table is not None else load_cases(cfg.data)
    encoder = cfg.build_encoder()
    cut = encoder.cut(cfg.trainable_blocks)
    t0 = time.time()
    feats = cached_features(
        table,
        encoder,
        [cut],
        n_copies=cfg.n_copies,
        cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
        device=device,
    )[cut]
    return table, encoder, cut, feats, time.time() - t0


def train_run(cfg: TrainConfig, out: Path, table: CaseTable | None = None, progress: bool = True) -> dict:
    """Train ``cfg.trials`` seeds and write everything the evaluation needs under ``out``."""
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device()
    table, encoder, cut, feats, cache_s = prepare(cfg, table, device)
    train_rows = np.flatnonzero(table.fold != cfg.fold)
    test_rows = np.flatnonzero(table.fold == cfg.fold)
    if len(test_rows) == 0:
        raise InvalidInput(f"fold {cfg.fold} has no cases")
    write_json(out / "config.json", dataclasses.asdict(cfg))
    train_feats = np.asarray(feats[train_rows])
    timings = {"feature_cache_s": round(cache_s, 1), "trials_s": []}
    for seed in range(cfg.first_seed, cfg.first_seed + cfg.trials):
        tdir = trial_dir(out, seed)
        tdir.mkdir(exist_ok=True)
        t0 = time.time()
        top = train_top(
            cfg,
            encoder,
            train_feats,
            table.label[train_rows],
            seed,
            device,
            log_path=tdir / "log.jsonl",
            progress=progress,
            groups=table.patient_id[train_rows],
        )
        timings["trials_s"].append(round(time.time() - t0, 1))
        ckpt = tdir / "checkpoint.pt"
        blob = {
            "config": dataclasses.asdict(cfg),
            "cut": cut,
            "weights_sha256": encoder.weights.sha256,
            "state": {k: v.cpu() for k, v in top.state_dict().items()},
        }
        atomic_write(ckpt, lambda tmp, blob=blob: torch.save(blob, tmp))
        archive_emb, _ = embed_features(top, train_feats, device, tta=False)
        test_emb, test_prob = embed_features(top, np.asarray(feats[test_rows]), device, tta=cfg.tta)
        arrays = dict(
            archive=archive_emb,
            archive_rows=train_rows,
            test=test_emb,
            test_rows=test_rows,
            archive_trunk=trunk_descriptors(train_feats),
            test_trunk=trunk_descriptors(feats[test_rows]),
            **({"test_mlp_proba": test_prob} if test_prob is not None else {}),
        )
        atomic_write(tdir / "embeddings.npz", lambda tmp, arrays=arrays: np.savez(tmp, **arrays))
        VectorIndex.build(archive_emb, sha256_file(ckpt)).save(tdir / "index.faiss")
    timings["train_s_total"] = round(sum(timings["trials_s"]), 1)
    if cfg.calibrate:
        timings["calibration_s"] = _calibrate(cfg, out, encoder, train_feats, table.subset(train_rows), device)
    write_json(out / "timings.json", timings)
    return timings


def _calibrate(
    cfg: TrainConfig, out: Path, encoder: Encoder, train_feats: np.ndarray, train: CaseTable, device: torch.device
) -> float:
    t0 = time.time()
    how = (
        f"3-fold patient-grouped CV inside the training folds (test fold {cfg.fold} unseen), "
        f"top retrained per inner fold with seed {cfg.first_seed}"
    )
    fit_calibration(out, *inner_cv_neighbours(cfg, encoder, train_feats, train, device), how, len(CLASS_NAMES))
    return round(time.time() - t0, 1)


def inner_cv_neighbours(
    cfg: TrainConfig, encoder: Encoder, feats: np.ndarray, train: CaseTable, device: torch.device, n_splits: int = 3
) -> tuple[list, list, list]:
    """Held-out training patients classified honestly: for each patient-grouped inner fold, a
    fresh top is trained on the other inner folds, and the held-out cases' neighbour labels
    among those are returned (per fold: labels, true labels, patients). They fit the
    calibration (:mod:`neurocbir.classify.calibration`) and give the inner-CV scores."""
    held_out, y, groups = [], [], []
    for tr, va in grouped_inner_folds(train, n_splits):
        top = train_top(
            cfg,
            encoder,
            feats[tr],
            train.label[tr],
            cfg.first_seed,
            device,
            progress=False,
            groups=train.patient_id[tr],
        )
        archive, _ = embed_features(top, feats[tr], device)
        queries, _ = embed_features(top, feats[va], device, tta=cfg.tta)
        held_out.append(NIRClassifier().fit(archive, train.label[tr]).neighbour_labels(queries))
        y.append(train.label[va])
        groups.append(train.patient_id[va])
    return held_out, y, groups
