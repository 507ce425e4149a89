"""The lesion recipe: full fine-tuning of :class:`~neurocbir.models.lesion.LesionNet` with fresh random
augmentation every step, SupCon on the embedding plus Dice + cross-entropy on the tumor mask.

GPU-first (``tools/remote-gpu/recipe.sh``): every slice and mask sits in device memory and is
augmented there (a random affine per sample, applied to image and mask together, then gamma,
contrast, brightness and noise), in bfloat16 and channels_last. It runs on a CPU too, slowly.
The run directory has the layout of :mod:`neurocbir.models.runs`, so evaluation and the app read it
as any other run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from neurocbir.data.cases import NO_TUMOR_LABEL, PIXEL_AREA_MM2_512, CaseTable
from neurocbir.data.transforms import preprocess
from neurocbir.files import atomic_write, sha256_file
from neurocbir.models.encoders import Encoder
from neurocbir.models.lesion import LesionNet
from neurocbir.models.runs import TrainConfig
from neurocbir.retrieval.index import VectorIndex
from neurocbir.training.common import seed_everything

log_warning = logging.getLogger(__name__).warning
_compile_failed = False  # once torch.compile has failed here, later trials do not try again


def load_tensors(table: CaseTable, size: int, intensity: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Every slice preprocessed as at query time ((N, 1, size, size) float16 in [-1, 1]) and its
    tumor mask ((N, 1, size, size) uint8)."""
    images = torch.empty(len(table), 1, size, size, dtype=torch.float16)
    masks = torch.empty(len(table), 1, size, size, dtype=torch.uint8)
    for i in tqdm(range(len(table)), desc=f"loading slices at {size} px", unit="slice", mininterval=5):
        images[i, 0] = preprocess(table.load_image(i), size, intensity)[0]
        m = torch.from_numpy(np.asarray(table.load_mask(i), dtype=np.float32))[None, None]
        masks[i] = (F.interpolate(m, size=(size, size), mode="area")[0] >= 0.5).to(torch.uint8)
    return images, masks


def load_extra_tensors(
    folder: Path | str, size: int, rows: np.ndarray | None = None, intensity: str = "minmax"
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor]:
    """The development part of an other-hospitals folder (``metadata.csv`` layout, see
    :mod:`neurocbir.data.external`; its validation part is never read) as training cases: images as
    :func:`load_tensors` gives them, masks, labels (indices into ``CASE_LABELS``: a tumor type 0-2,
    3 for no tumor, a fourth class of the embedding, 4 for a tumor of a type not given) and whether
    each mask is known: a slice without a tumor has a known, empty mask (the decoder learns to outline
    nothing), a slice with a mask file (TCGA) its mask, any other tumor slice none (it teaches the
    decoder only that there is a tumor somewhere, see :func:`train_lesion`). ``rows``: only those
    rows of the development part."""
    from neurocbir.data.external import load_external, part

    dev = part(load_external(folder), "development")
    if rows is not None:
        dev = dev.subset(rows)
    images = torch.empty(len(dev), 1, size, size, dtype=torch.float16)
    masks = torch.zeros(len(dev), 1, size, size, dtype=torch.uint8)
    for i in tqdm(range(len(dev)), desc=f"loading {folder} (development part)", unit="slice", mininterval=5):
        images[i, 0] = preprocess(dev.load_image(i), size, intensity)[0]
        if dev.mask_files[i]:
            m = torch.from_numpy(dev.load_mask(i).astype(np.float32))[None, None]
            masks[i] = (F.interpolate(m, size=(size, size), mode="area")[0] >= 0.5).to(torch.uint8)
    known = torch.from_numpy(np.array([dev.has_mask(i) for i in range(len(dev))]))
    return images, masks, dev.case_label, known


def augment_batch(x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh random view of each slice and its mask: affine (rotation +-20 deg, scale +-15 %,
    shift +-8 %, horizontal flip), then gamma, contrast, brightness and noise. In: (B, 1, S, S)
    in [-1, 1] and 0/1; out: (B, 3, S, S) float32 and (B, 1, S, S) float32."""
    b, dev = x.shape[0], x.device

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(b, *shape, generator=gen, device=dev) * (hi - lo) + lo

    angle, scale = u(-20, 20) * math.pi / 180, u(0.85, 1.15)
    flip = torch.where(u(0, 1) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = u(-0.16, 0.16, 2)  # normalised coordinates span 2: +-8 % of the side
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x01 = F.grid_sample((x.float() + 1) / 2, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mask = (F.grid_sample(m.float(), grid, mode="bilinear", align_corners=False) >= 0.5).float()
    x01 = x01.clamp(0, 1) ** torch.exp(u(-0.35, 0.35))[:, None, None, None]
    x01 = (x01 - 0.5) * u(0.8, 1.2)[:, None, None, None] + 0.5 + u(-0.08, 0.08)[:, None, None, None]
    noisy = (u(0, 1) < 0.3).float()[:, None, None, None]
    x01 = x01 + noisy * 0.03 * torch.randn(x01.shape, generator=gen, device=dev)
    return (x01.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last), mask


def cpu_bf16_supported() -> bool:
    """Does this CPU do bfloat16 natively (AVX-512 BF16 or AMX, as oneDNN reports it)? Where it
    does not (an AVX2-only CPU), bf16 is emulated: about 10x slower than float32, not faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def training_precision(cfg: TrainConfig, device: torch.device) -> str:
    """``bfloat16`` on a GPU, and on a CPU when the preset asks for it and the CPU has it
    natively; ``float32`` otherwise."""
    if device.type == "cuda":
        return "bfloat16"
    return "bfloat16" if cfg.extra.get("cpu_bf16", False) and cpu_bf16_supported() else "float32"


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


#: label of a tumor whose type was not given (``CASE_LABELS``): no embedding class of its own
UNTYPED_LABEL = 4
STATE_FILE = "training_state.pt"  # a trial's last finished epoch (removed once its checkpoint is written)


def _build(cfg: TrainConfig, encoder: Encoder, n: int, device: torch.device):
    """The network, its frozen stages, optimiser and schedule of one trial."""
    net = LesionNet(encoder, cfg.embedding_dim, cfg.head_hidden, cfg.dropout, cfg.decoder_stride).to(device)
    if cfg.extra.get("presence_weight"):  # a linear probe of tumor presence on the descriptor (training only)
        net.presence_probe = nn.Linear(net.num_features, 1).to(device)
    net = net.to(memory_format=torch.channels_last)
    frozen = net.trunk[: net.frozen_stages(cfg.frozen_stride) if cfg.frozen_stride else cfg.frozen_stages]
    frozen.requires_grad_(False)  # no backward pass through them: the cost of a CPU step nearly halves
    trunk = [p for mod in (net.trunk, net.neck) for p in mod.parameters() if p.requires_grad]
    trunk_ids = {id(p) for p in trunk}
    rest = [p for p in net.parameters() if id(p) not in trunk_ids]
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": cfg.lr}, {"params": trunk, "lr": cfg.lr_trunk}], weight_decay=cfg.weight_decay
    )
    steps_per_epoch = max(1, n // min(cfg.batch_size, n))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[cfg.lr, cfg.lr_trunk], total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    return net, frozen, opt, sched, steps_per_epoch


def _save_state(path: Path, epoch: int, net, opt, sched, gen: torch.Generator, fingerprint: dict) -> None:
    """Everything the next epoch depends on, written atomically (a kill leaves the previous one)."""
    blob = {
        "epoch": epoch,
        "fingerprint": fingerprint,
        "net": net.state_dict(),
        "opt": opt.state_dict(),
        "sched": sched.state_dict(),
        "gen": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def _load_state(path: Path | None, fingerprint: dict, net, opt, sched, gen: torch.Generator) -> int:
    """The epochs already done by an interrupted trial (0 when there is no state to resume, or
    the state belongs to other data or settings)."""
    if path is None or not path.is_file():
        return 0
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if blob.get("fingerprint") != fingerprint:
        log_warning("%s was left by another configuration or data: training this trial from the start", path)
        return 0
    net.load_state_dict(blob["net"])
    opt.load_state_dict(blob["opt"])
    sched.load_state_dict(blob["sched"])
    gen.set_state(blob["gen"])
    torch.set_rng_state(blob["torch_rng"])
    return int(blob["epoch"])


@torch.enable_grad()
def _detached(feats: list[torch.Tensor], fine: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    return [f.detach() for f in feats], None if fine is None else fine.detach()


def train_lesion(
    cfg: TrainConfig,
    encoder: Encoder,
    images: torch.Tensor,
    masks: torch.Tensor,
    labels: np.ndarray,
    seed: int,
    device: torch.device,
    log_path: Path | None = None,
    progress: bool = True,
    compile_net: bool = False,
    mask_known: torch.Tensor | None = None,
    state_path: Path | None = None,
) -> LesionNet:
    """Train a LesionNet from the pretrained encoder on (device-resident) slices and masks.

    ``labels``: indices into ``CASE_LABELS``; a tumor of a type not given (4) is no class of the
    embedding (it adds no SupCon term). ``mask_known`` (N,) bool: a slice whose mask is unknown adds
    no mask loss; a tumor slice among them still teaches the decoder that there is a tumor: its
    peak tumor logit is pushed up (multiple-instance learning). Default: every mask is known.
    ``cfg.extra["peak_weight"]`` (a training variant, default 0): every slice whose mask is known
    also teaches the decoder's peak logit whether its augmented view shows a tumor (BCE), aimed at
    the decoder firing on other hospitals' slices without one; with ``cfg.extra["peak_on"] ==
    "no_tumor"`` only the slices without a tumor do (their peak logit down), tumor slices keep the
    mask loss alone; with ``cfg.extra["peak_detach"]`` that loss trains the decoder alone (its
    gradient stopped at the trunk, so the trunk learns from the other losses only).
    ``compile_net``: run the training passes through ``torch.compile`` (on a GPU); should the
    compiler fail in the first step, training goes on uncompiled and says so.
    ``state_path``: after each epoch the whole training state is written there, and a trial
    started again with it resumes after the last finished epoch (the same as an uninterrupted run:
    the random streams are restored too)."""
    from monai.losses import DiceCELoss
    from pytorch_metric_learning import losses

    seed_everything(seed)
    n = len(labels)
    net, frozen, opt, sched, steps_per_epoch = _build(cfg, encoder, n, device)
    batch = min(cfg.batch_size, n)
    metric_loss = losses.SupConLoss(temperature=cfg.temperature)
    seg_loss = DiceCELoss(sigmoid=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    y_all = torch.as_tensor(labels, device=device)
    amp = training_precision(cfg, device) == "bfloat16"
    if cfg.extra.get("cpu_bf16") and device.type == "cpu" and not amp:
        log_warning("this CPU has no native bfloat16 (emulated it is ~10x slower): training in float32")
    global _compile_failed
    step_net = torch.compile(net) if compile_net and not _compile_failed else net
    known_all = None if mask_known is None else torch.as_tensor(mask_known, dtype=torch.bool, device=device)
    fingerprint = {"config": dataclasses.asdict(cfg), "seed": seed, "n": n, "labels": int(np.sum(labels))}
    start = _load_state(state_path, fingerprint, net, opt, sched, gen)
    presence_weight = float(cfg.extra.get("presence_weight", 0.0))
    peak_weight = float(cfg.extra.get("peak_weight", 0.0))
    peak_on = cfg.extra.get("peak_on", "known")  # checked by TrainConfig.validate
    peak_detach = bool(peak_weight and cfg.extra.get("peak_detach", False))

    def backward(model, x: torch.Tensor, m: torch.Tensor, y: torch.Tensor, known) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            if peak_detach:  # the peak loss reaches the decoder alone: a second decoder pass on detached taps
                fmap, feats, fine = net.trunk_features(x)
                logits = net.decode(feats, fine)
                (emb, desc), peak_logits = net.embed(fmap, logits), net.decode(*_detached(feats, fine))
            else:
                emb, desc, logits = model(x)
                peak_logits = logits
            up = F.interpolate(logits.float(), size=m.shape[-2:], mode="bilinear", align_corners=False)
        typed = y != UNTYPED_LABEL
        loss = metric_loss(emb[typed].float(), y[typed]) if bool(typed.any()) else emb.sum() * 0
        if presence_weight:  # the descriptor (what the archive's presence model reads) learns presence
            tumor = (y != NO_TUMOR_LABEL).float()
            logit = net.presence_probe(desc.float()).squeeze(1)
            loss = loss + presence_weight * F.binary_cross_entropy_with_logits(logit, tumor)
        if peak_weight:  # the decoder's peak (what the presence rule reads) says if the view shows a tumor
            shown = torch.ones_like(y, dtype=torch.bool) if known is None else known
            if peak_on == "no_tumor":
                shown = shown & (y == NO_TUMOR_LABEL)
            if bool(shown.any()):
                peak = peak_logits.float()[shown].flatten(1).amax(1)
                loss = loss + peak_weight * F.binary_cross_entropy_with_logits(peak, m[shown].flatten(1).amax(1))
        if known is None:
            return _step(loss + cfg.seg_weight * seg_loss(up, m))
        if bool(known.any()):
            loss = loss + cfg.seg_weight * seg_loss(up[known], m[known])
        unknown_tumor = ~known & (y != NO_TUMOR_LABEL)
        if bool(unknown_tumor.any()):  # a tumor somewhere, where is not known: its peak logit up
            peak = logits.float()[unknown_tumor].flatten(1).amax(1)
            loss = loss + cfg.seg_weight * F.binary_cross_entropy_with_logits(peak, torch.ones_like(peak))
        return _step(loss)

    def _step(loss: torch.Tensor) -> torch.Tensor:
        loss.backward()
        return loss.detach()

    if log_path and start:  # the epochs before the resumed one, as they were logged
        done = log_path.read_text().splitlines()[:start] if log_path.is_file() else []
        log_path.write_text("".join(line + "\n" for line in done))
    log = open(log_path, "a" if start else "w") if log_path else None  # noqa: SIM115 - closed below
    bar = tqdm(
        total=cfg.epochs * steps_per_epoch,
        initial=start * steps_per_epoch,
        desc=f"lesion seed {seed}",
        unit="step",
        disable=not progress,
        mininterval=10,
    )
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.time()
            net.train()
            frozen.eval()  # their batch-norm statistics stay pretrained too
            order = torch.randperm(n, generator=gen, device=device)
            total = torch.zeros((), device=device)  # summed on the device: no host sync per step
            for s in range(steps_per_epoch):
                rows = order[s * batch : (s + 1) * batch]
                x, m = augment_batch(images[rows], masks[rows], gen)
                known = None if known_all is None else known_all[rows]
                try:
                    loss = backward(step_net, x, m, y_all[rows], known)
                except Exception as exc:  # noqa: BLE001 - any compiler failure: train on without it
                    if step_net is net or epoch or s:
                        raise
                    log_warning("torch.compile failed (%s: %s); training uncompiled", type(exc).__name__, exc)
                    _compile_failed, step_net = True, net
                    loss = backward(net, x, m, y_all[rows], known)
                opt.step()
                sched.step()
                total += loss
                bar.update(1)
            epoch_log = {"epoch": epoch + 1, "loss": float(total) / steps_per_epoch, "s": round(time.time() - t0, 2)}
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{epoch_log['loss']:.3f}")
            if log:
                log.write(json.dumps(epoch_log) + "\n")
                log.flush()
            if state_path is not None and epoch + 1 < cfg.epochs:
                _save_state(state_path, epoch + 1, net, opt, sched, gen, fingerprint)
    finally:
        bar.close()
        if log:
            log.close()
    return net.eval()


@torch.inference_mode()
def embed_tensors(
    net: LesionNet, images: torch.Tensor, device: torch.device, batch_size: int = 128, level: float | None = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, descriptors, tumor masks (N, S, S): bool at probability ``level``, or the
    probabilities as float16 when it is None) of preprocessed slices."""
    net.eval()
    amp = device.type == "cuda"
    embs, descs, masks = [], [], []
    for b in range(0, len(images), batch_size):
        x = images[b : b + batch_size].to(device).float().expand(-1, 3, -1, -1)
        x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            emb, desc, logits = net(x)
        prob = torch.sigmoid(F.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False))
        embs.append(emb.float().cpu().numpy())
        descs.append(desc.float().cpu().numpy())
        masks.append((prob[:, 0] >= level if level is not None else prob[:, 0].half()).cpu().numpy())
    return np.concatenate(embs), np.concatenate(descs), np.concatenate(masks)


def mask_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """Per-slice Dice and predicted tumor area in mm^2 (masks on any square grid)."""
    p, t = pred.reshape(len(pred), -1).astype(bool), true.reshape(len(true), -1).astype(bool)
    inter = (p & t).sum(1)
    dice = 2 * inter / np.maximum(p.sum(1) + t.sum(1), 1)
    px_area = PIXEL_AREA_MM2_512 * (512 / pred.shape[-1]) ** 2
    return {"dice": dice, "area_mm2": p.sum(1) * px_area}


def save_checkpoint(path: Path, cfg: TrainConfig, net: LesionNet, weights_sha256: str) -> None:
    """float16 weights (half the size; the embeddings differ by < 1e-3) and the config."""
    blob = {
        "config": dataclasses.asdict(cfg),
        "cut": 0,
        "weights_sha256": weights_sha256,
        "state": {
            k: (v.half() if v.is_floating_point() else v).cpu()
            for k, v in net.state_dict().items()
            if not k.startswith("presence_probe.")  # a training aid: the served network has no such head
        },
    }
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def write_trial(
    tdir: Path,
    net: LesionNet,
    cfg: TrainConfig,
    encoder: Encoder,
    images: torch.Tensor,
    table: CaseTable,
    device: torch.device,
) -> np.ndarray:
    """Checkpoint, embeddings of archive (training folds) and test cases, index; returns the
    test fold's predicted tumor masks."""
    tdir.mkdir(parents=True, exist_ok=True)
    ckpt = tdir / "checkpoint.pt"
    save_checkpoint(ckpt, cfg, net, encoder.weights.sha256)
    emb, desc, pred = embed_tensors(net, images, device)
    train_rows, test_rows = np.flatnonzero(table.fold != cfg.fold), np.flatnonzero(table.fold == cfg.fold)
    arrays = dict(
        archive=emb[train_rows],
        archive_rows=train_rows,
        test=emb[test_rows],
        test_rows=test_rows,
        archive_trunk=desc[train_rows].astype(np.float16),
        test_trunk=desc[test_rows].astype(np.float16),
    )
    atomic_write(tdir / "embeddings.npz", lambda tmp: np.savez(tmp, **arrays))
    VectorIndex.build(emb[train_rows], sha256_file(ckpt)).save(tdir / "index.faiss")
    return pred[test_rows]
