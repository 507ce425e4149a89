"""Training the encoder's top on cached trunk features, with losses from
pytorch-metric-learning (triplet, NCA, InfoNCE, SupCon) or cross-entropy + an MLP head.

A run directory holds ``config.json`` and one ``trial_<seed>/`` per seed with the
checkpoint, the embeddings of archive (training) and test cases, the FAISS index and a log.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners, samplers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from tqdm import tqdm

from .data import CLASS_NAMES, DEFAULT_TEST_FOLD, CaseTable, load_cases
from .encoders import ALL_BLOCKS, DEFAULT_ENCODER, Encoder, create_encoder, pick_device
from .features import cached_features
from .index import VectorIndex, sha256_file

LOSSES = ("ce", "triplet", "nca", "infonce", "supcon")


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json``."""

    loss: str = "supcon"
    encoder: str = DEFAULT_ENCODER
    weights: str | None = None
    random_init: bool = False
    fold: int = DEFAULT_TEST_FOLD
    trials: int = 5
    first_seed: int = 0
    trainable_blocks: int = 2  # last 2 blocks + head on cached block inputs; 0 = head only; -1 = all (GPU)
    n_copies: int = 2  # augmented copies per case (paper: blur + rotation -> 3x the data)
    epochs: int = 3  # the training loss reaches its floor in 2-3 epochs; more does not help
    batch_size: int = 96
    lr: float = 1e-3
    lr_trunk: float = 1e-4
    weight_decay: float = 0.05
    temperature: float = 0.1  # SupCon / InfoNCE
    margin: float = 0.1  # triplet
    embedding_dim: int = 128
    head_hidden: int = 512
    dropout: float = 0.5
    feature_noise: float = 0.3  # Gaussian noise on cached features, x their std
    tta: bool = False  # average embeddings of the cached augmented views at inference
    cross_patient_positives: bool = False  # SupCon/triplet: positives only from other patients
    data: str | None = None
    cache_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.trials < 1 or self.epochs < 1 or self.batch_size < 6:
            raise ValueError("trials and epochs must be >= 1, batch_size >= 6")
        if self.n_copies < 1 and self.loss == "infonce":
            raise ValueError("InfoNCE needs n_copies >= 1 (two views of each case)")
        return self


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Top(nn.Module):
    """The trainable part: unfrozen stages + embedding head (+ MLP classifier for CE)."""

    def __init__(self, encoder: Encoder, cut: int, n_classes: int, with_mlp: bool):
        super().__init__()
        self.cut = cut
        self.stages = nn.ModuleList(encoder.stages[cut:])
        self.head = encoder.head
        self.mlp = (nn.Sequential(nn.Linear(encoder.embedding_dim, 128), nn.ReLU(inplace=True),
                                  nn.Linear(128, n_classes)) if with_mlp else None)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        for s in self.stages:
            x = s(x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.raw(x), dim=1)


def _loss_fn(cfg: TrainConfig):
    if cfg.loss == "supcon":
        return losses.SupConLoss(temperature=cfg.temperature), None
    if cfg.loss == "infonce":
        return losses.NTXentLoss(temperature=cfg.temperature), None
    if cfg.loss == "nca":
        return losses.NCALoss(softmax_scale=1.0 / cfg.temperature), None
    if cfg.loss == "triplet":
        return (losses.TripletMarginLoss(margin=cfg.margin),
                miners.TripletMarginMiner(margin=cfg.margin, type_of_triplets="semihard"))
    return nn.CrossEntropyLoss(), None


def _batches(cfg: TrainConfig, labels: np.ndarray, n_views: int, rng: np.random.Generator):
    """Yield (case rows, view numbers, labels-for-the-loss) for one epoch over every view."""
    n = len(labels)
    if cfg.loss == "infonce":  # two different views of each case; labels = case identity
        cases = rng.permutation(n)
        half = max(2, cfg.batch_size // 2)
        for b in range(0, n - 1, half):
            rows = cases[b:b + half]
            if len(rows) < 2:
                continue
            v = np.stack([rng.choice(n_views, 2, replace=False) for _ in rows])
            yield (np.concatenate([rows, rows]), np.concatenate([v[:, 0], v[:, 1]]),
                   np.concatenate([np.arange(len(rows))] * 2))
        return
    item_labels = np.repeat(labels, n_views)
    total = n * n_views
    if cfg.loss == "ce":
        order = rng.permutation(total)
    else:  # balanced batches: m per class
        m = max(2, cfg.batch_size // len(np.unique(labels)))
        sampler = samplers.MPerClassSampler(item_labels, m=m, batch_size=m * len(np.unique(labels)),
                                            length_before_new_iter=total)
        order = np.fromiter(iter(sampler), dtype=np.int64)
        bs = m * len(np.unique(labels))
        order = order[: len(order) // bs * bs]
    bs = cfg.batch_size if cfg.loss == "ce" else m * len(np.unique(labels))
    for b in range(0, len(order), bs):
        items = order[b:b + bs]
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
def train_top(cfg: TrainConfig, encoder: Encoder, feats: np.ndarray, labels: np.ndarray, seed: int,
              device: torch.device, log_path: Path | None = None, progress: bool = True,
              groups: np.ndarray | None = None) -> Top:
    """Train a fresh top on cached features ``feats`` (N, views, ...) of the training cases
    (``groups``: their patient ids, needed for ``cross_patient_positives``)."""
    seed_everything(seed)
    cut = encoder.cut(cfg.trainable_blocks)
    # Each trial re-initialises the head (and unfrozen stages keep their pretrained start).
    for m in encoder.head.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
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
        raise ValueError("cross_patient_positives needs the training cases' patient ids")
    patient_codes = np.unique(np.asarray(groups), return_inverse=True)[1] if groups is not None else None
    log = open(log_path, "w") if log_path else None
    try:
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
    finally:
        if log:
            log.close()
    return top.eval()


@torch.inference_mode()
def embed_features(top: Top, feats: np.ndarray, device: torch.device, tta: bool = False,
                   batch_size: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
    """L2-normalised embeddings (and CE logits) of cached features, view 0 or mean over views."""
    top.eval()
    embs, logits = [], []
    views = range(feats.shape[1]) if tta else [0]
    for b in range(0, len(feats), batch_size):
        x = torch.from_numpy(np.asarray(feats[b:b + batch_size], dtype=np.float32)).to(device)
        raws = [top.raw(x[:, v]) for v in views]
        e = F.normalize(torch.stack([F.normalize(r, dim=1) for r in raws]).mean(0), dim=1)
        embs.append(e.cpu().numpy())
        if top.mlp is not None:
            logits.append(torch.stack([top.mlp(r).softmax(1) for r in raws]).mean(0).cpu().numpy())
    return np.concatenate(embs), (np.concatenate(logits) if logits else None)


def trunk_descriptors(feats: np.ndarray) -> np.ndarray:
    """L2-normalised, spatially averaged frozen-trunk features of view 0: the space in which
    "is this scan like anything in the archive?" is judged (the trained embedding maps
    everything, even a photo of a cat, near some tumor class)."""
    x = np.asarray(feats[:, 0], dtype=np.float32)
    if x.ndim > 2:
        x = x.mean(axis=tuple(range(2, x.ndim)))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embed_images(encoder: Encoder, top: Top, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and trunk descriptors of raw scans: the query and the indexing path."""
    from .transforms import preprocess

    x = torch.stack([preprocess(im) for im in images])
    with torch.inference_mode():
        feat = encoder.forward_stages(x, 0, top.cut)
        return top(feat).numpy(), trunk_descriptors(feat.numpy()[:, None])


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def checkpoint_sha256(run: Path | str, trial: int) -> str:
    """What ties an index or a case archive to the trial whose encoder embedded it."""
    return sha256_file(Path(run) / f"trial_{trial}" / "checkpoint.pt")


def prepare(cfg: TrainConfig, table: CaseTable | None = None, device: torch.device | None = None):
    """Load cases, build the encoder and the feature cache shared by every trial."""
    table = table if table is not None else load_cases(cfg.data)
    encoder = create_encoder(cfg.encoder, pretrained=not cfg.random_init, weights=cfg.weights,
                             embedding_dim=cfg.embedding_dim, head_hidden=cfg.head_hidden, dropout=cfg.dropout)
    cut = encoder.cut(cfg.trainable_blocks)
    t0 = time.time()
    feats = cached_features(table, encoder, [cut], n_copies=cfg.n_copies,
                            cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None, device=device)[cut]
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
        raise ValueError(f"fold {cfg.fold} has no cases")
    _atomic_json(out / "config.json", dataclasses.asdict(cfg))
    train_feats = np.asarray(feats[train_rows])
    timings = {"feature_cache_s": round(cache_s, 1), "trials_s": []}
    for seed in range(cfg.first_seed, cfg.first_seed + cfg.trials):
        tdir = out / f"trial_{seed}"
        tdir.mkdir(exist_ok=True)
        t0 = time.time()
        top = train_top(cfg, encoder, train_feats, table.label[train_rows], seed, device,
                        log_path=tdir / "log.jsonl", progress=progress, groups=table.patient_id[train_rows])
        timings["trials_s"].append(round(time.time() - t0, 1))
        ckpt = tdir / "checkpoint.pt"
        tmp = tdir / "checkpoint.pt.tmp"
        torch.save({"config": dataclasses.asdict(cfg), "cut": cut, "weights_sha256": encoder.weights.sha256,
                    "state": {k: v.cpu() for k, v in top.state_dict().items()}}, tmp)
        os.replace(tmp, ckpt)
        archive_emb, archive_prob = embed_features(top, train_feats, device, tta=False)
        test_emb, test_prob = embed_features(top, np.asarray(feats[test_rows]), device, tta=cfg.tta)
        emb_tmp = tdir / "embeddings.tmp.npz"
        np.savez(emb_tmp, archive=archive_emb, archive_rows=train_rows, test=test_emb, test_rows=test_rows,
                 archive_trunk=trunk_descriptors(train_feats), test_trunk=trunk_descriptors(feats[test_rows]),
                 **({"test_mlp_proba": test_prob} if test_prob is not None else {}))
        os.replace(emb_tmp, tdir / "embeddings.npz")
        VectorIndex.build(archive_emb, sha256_file(ckpt)).save(tdir / "index.faiss")
    timings["train_s_total"] = round(sum(timings["trials_s"]), 1)
    _atomic_json(out / "timings.json", timings)
    return timings


def load_top(run: Path, seed: int, encoder: Encoder | None = None) -> tuple[Encoder, Top, TrainConfig]:
    """Rebuild the full encoder of a trial (frozen bottom + trained top) for new images."""
    blob = torch.load(Path(run) / f"trial_{seed}" / "checkpoint.pt", map_location="cpu", weights_only=False)
    cfg = TrainConfig(**blob["config"])
    encoder = encoder or create_encoder(cfg.encoder, pretrained=not cfg.random_init, weights=cfg.weights,
                                        embedding_dim=cfg.embedding_dim, head_hidden=cfg.head_hidden,
                                        dropout=cfg.dropout)
    if encoder.weights.sha256 != blob["weights_sha256"]:
        raise ValueError(f"{run}: trained on weights {blob['weights_sha256'][:12]}, "
                         f"but the encoder has {encoder.weights.sha256[:12]}")
    top = Top(encoder, blob["cut"], len(CLASS_NAMES), with_mlp=cfg.loss == "ce")
    top.load_state_dict(blob["state"])
    return encoder.eval(), top.eval(), cfg


__all__ = ["TrainConfig", "LOSSES", "train_run", "train_top", "embed_features", "embed_images", "load_top", "checkpoint_sha256", "prepare", "ALL_BLOCKS"]
