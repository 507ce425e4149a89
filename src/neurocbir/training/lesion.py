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
import torch.nn.functional as F
from tqdm import tqdm

from neurocbir.data.cases import PIXEL_AREA_MM2_512, CaseTable
from neurocbir.data.transforms import preprocess
from neurocbir.files import atomic_write, sha256_file
from neurocbir.models.encoders import Encoder
from neurocbir.models.lesion import LesionNet
from neurocbir.models.runs import TrainConfig
from neurocbir.retrieval.index import VectorIndex
from neurocbir.training.common import seed_everything

log_warning = logging.getLogger(__name__).warning
_compile_failed = False  # once torch.compile has failed here, later trials do not try again


def load_tensors(table: CaseTable, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slice preprocessed as at query time ((N, 1, size, size) float16 in [-1, 1]) and its
    tumor mask ((N, 1, size, size) uint8)."""
    images = torch.empty(len(table), 1, size, size, dtype=torch.float16)
    masks = torch.empty(len(table), 1, size, size, dtype=torch.uint8)
    for i in tqdm(range(len(table)), desc=f"loading slices at {size} px", unit="slice", mininterval=5):
        images[i, 0] = preprocess(table.load_image(i), size)[0]
        m = torch.from_numpy(np.asarray(table.load_mask(i), dtype=np.float32))[None, None]
        masks[i] = (F.interpolate(m, size=(size, size), mode="area")[0] >= 0.5).to(torch.uint8)
    return images, masks


def load_extra_tensors(folder: Path | str, size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor]:
    """The development part of an other-hospitals folder (``metadata.csv`` layout, see
    :mod:`neurocbir.data.external`; its validation part is never read) as training cases: images as
    :func:`load_tensors` gives them, masks, labels (a tumor type 0-2, or 3 for no tumor: a fourth class
    of the embedding) and whether each mask is known. A slice without a tumor has a known, empty
    mask (the decoder learns to outline nothing); a tumor slice has none (it trains the embedding only)."""
    from neurocbir.data.cases import CASE_LABELS
    from neurocbir.data.external import development_split, load_external

    ext = load_external(folder)
    dev = ext.subset(development_split(ext)[0])
    images = torch.empty(len(dev), 1, size, size, dtype=torch.float16)
    for i in tqdm(range(len(dev)), desc=f"loading {folder} (development part)", unit="slice", mininterval=5):
        images[i, 0] = preprocess(dev.load_image(i), size)[0]
    labels = np.array([CASE_LABELS.index(v) for v in dev.labels])
    known = torch.from_numpy(~dev.tumor)
    return images, torch.zeros(len(dev), 1, size, size, dtype=torch.uint8), labels, known


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


@torch.enable_grad()
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
) -> LesionNet:
    """Train a LesionNet from the pretrained encoder on (device-resident) slices and masks.

    ``compile_net``: run the network's training passes through ``torch.compile`` (on a GPU, where
    one step of this small network is mostly kernel launches); should the compiler fail in the
    first step, training goes on uncompiled from the same batch (this trial and later ones) and
    says so. ``mask_known`` (N,) bool: slices whose mask is unknown (other hospitals' tumor slices)
    add no mask loss; default: every mask is known."""
    from monai.losses import DiceCELoss
    from pytorch_metric_learning import losses

    seed_everything(seed)
    net = LesionNet(encoder, cfg.embedding_dim, cfg.head_hidden, cfg.dropout, cfg.decoder_stride).to(device)
    net = net.to(memory_format=torch.channels_last)
    frozen = net.trunk[: net.frozen_stages(cfg.frozen_stride) if cfg.frozen_stride else cfg.frozen_stages]
    frozen.requires_grad_(False)  # no backward pass through them: the cost of a CPU step nearly halves
    trunk = [p for mod in (net.trunk, net.neck) for p in mod.parameters() if p.requires_grad]
    trunk_ids = {id(p) for p in trunk}
    rest = [p for p in net.parameters() if id(p) not in trunk_ids]
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": cfg.lr}, {"params": trunk, "lr": cfg.lr_trunk}], weight_decay=cfg.weight_decay
    )
    n = len(labels)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[cfg.lr, cfg.lr_trunk], total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
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

    def backward(model, x: torch.Tensor, m: torch.Tensor, y: torch.Tensor, known) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            emb, _, logits = model(x)
            up = F.interpolate(logits.float(), size=m.shape[-2:], mode="bilinear", align_corners=False)
        loss = metric_loss(emb, y)
        if known is None:
            loss = loss + cfg.seg_weight * seg_loss(up, m)
        elif bool(known.any()):
            loss = loss + cfg.seg_weight * seg_loss(up[known], m[known])
        loss.backward()
        return loss.detach()

    log = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed below
    try:
        for epoch in tqdm(range(cfg.epochs), desc=f"lesion seed {seed}", unit="epoch", disable=not progress):
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
            if log:
                epoch_log = {
                    "epoch": epoch + 1,
                    "loss": float(total) / steps_per_epoch,
                    "s": round(time.time() - t0, 2),
                }
                log.write(json.dumps(epoch_log) + "\n")
                log.flush()
    finally:
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
        "state": {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in net.state_dict().items()},
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
