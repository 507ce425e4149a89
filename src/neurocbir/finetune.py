"""The lesion recipe: full fine-tuning of :class:`~neurocbir.lesion.LesionNet` with fresh random
augmentation every step, SupCon on the embedding plus Dice + cross-entropy on the tumor mask.

GPU-first (``benchmarks/gpu_recipe.sh``): every slice and mask sits in device memory and is
augmented there (a random affine per sample, applied to image and mask together, then gamma,
contrast, brightness and noise), in bfloat16 and channels_last. It runs on a CPU too, slowly.
The run directory has the layout of :mod:`neurocbir.runs`, so evaluation and the app read it
as any other run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .classify import NIRClassifier
from .data import CLASS_NAMES, PIXEL_AREA_MM2_512, CaseTable
from .encoders import Encoder, pick_device
from .evaluate import fit_calibration
from .files import atomic_write, sha256_file, write_json
from .index import VectorIndex
from .lesion import TUMOR_LEVEL_FILE, LesionNet
from .runs import TrainConfig, trial_dir
from .training import seed_everything
from .transforms import preprocess

log_warning = logging.getLogger(__name__).warning
_compile_failed = False  # once torch.compile has failed here, later trials do not try again
TUMOR_LEVELS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


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
) -> LesionNet:
    """Train a LesionNet from the pretrained encoder on (device-resident) slices and masks.

    ``compile_net``: run the network's training passes through ``torch.compile`` (on a GPU, where
    one step of this small network is mostly kernel launches); should the compiler fail in the
    first step, training goes on uncompiled from the same batch (this trial and later ones) and
    says so."""
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
    amp = device.type == "cuda" or cfg.extra.get("cpu_bf16", False)
    global _compile_failed
    step_net = torch.compile(net) if compile_net and not _compile_failed else net

    def backward(model, x: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            emb, _, logits = model(x)
            up = F.interpolate(logits.float(), size=m.shape[-2:], mode="bilinear", align_corners=False)
        loss = metric_loss(emb, y) + cfg.seg_weight * seg_loss(up, m)
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
                try:
                    loss = backward(step_net, x, m, y_all[rows])
                except Exception as exc:  # noqa: BLE001 - any compiler failure: train on without it
                    if step_net is net or epoch or s:
                        raise
                    log_warning("torch.compile failed (%s: %s); training uncompiled", type(exc).__name__, exc)
                    _compile_failed, step_net = True, net
                    loss = backward(net, x, m, y_all[rows])
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


def holdout_split(cfg: TrainConfig, table: CaseTable) -> tuple[np.ndarray, np.ndarray]:
    """(rows the encoder trains on, training patients' rows held out of training to calibrate
    on): patient-grouped, ``cfg.holdout_patients`` of the training folds; none when it is 0."""
    from .data import grouped_inner_folds

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
        raise ValueError(f"{run} holds no training patients out of training (holdout_patients = 0)")
    arrays = np.load(trial_dir(run, cfg.first_seed) / "embeddings.npz")
    where = {int(r): i for i, r in enumerate(arrays["archive_rows"])}
    emb = arrays["archive"]
    return cfg, fit_rows, cal_rows, emb[[where[r] for r in fit_rows]], emb[[where[r] for r in cal_rows]]


def calibrate_on_holdout(run: Path, table: CaseTable) -> None:
    """Calibrated probabilities, prediction sets and the outline level of a run whose encoder
    never saw some training patients (``holdout_patients``): those patients are queried against
    the other training patients with the first trial's embeddings. One training instead of the
    three of inner CV: what makes calibration affordable on a CPU."""
    cfg, fit_rows, cal_rows, fit, cal = holdout_embeddings(run, table)
    held_out = NIRClassifier().fit(fit, table.label[fit_rows]).neighbour_labels(cal)
    how = (
        f"{len(np.unique(table.patient_id[cal_rows]))} training patients ({len(cal_rows)} slices, "
        f"1/{round(1 / cfg.holdout_patients)} of folds != {cfg.fold}, patient-grouped) held out of training, "
        f"queried against the other training patients with seed {cfg.first_seed}'s encoder (test fold unseen)"
    )
    y, groups = table.label[cal_rows], table.patient_id[cal_rows]
    fit_calibration(Path(run), [held_out], [y], [groups], how, len(CLASS_NAMES))
    fit_tumor_level(Path(run), table, cal_rows, cfg.first_seed)


def fit_tumor_level(run: Path, table: CaseTable, cal_rows: np.ndarray, seed: int) -> dict:
    """The probability level at which the app outlines the query's tumor, chosen on training
    patients held out of training (``cal_rows``), through the app's own path (full-resolution
    slices); written as the run's ``tumor_level.json``."""
    from .inference import load_model

    model = load_model(run, seed)
    probs = ((model.analyse(image)[2], image.shape[:2]) for image in map(table.load_image, cal_rows))
    how = f"median relative area error on {len(cal_rows)} slices of training patients held out of training"
    return write_tumor_level(run, outline_area_errors(probs, table.area_mm2[cal_rows]), how)


def outline_area_errors(probs: Iterable[tuple[np.ndarray, tuple[int, int]]], true_area: np.ndarray) -> np.ndarray:
    """(slices, TUMOR_LEVELS) relative error of the outlined area at each level: ``probs`` gives
    each slice's tumor probability map and the shape of the scan it covers."""
    from .lesion import tumor_outline

    areas = [
        [(t["area_mm2"] if (t := tumor_outline(prob, shape, None, level)) else 0.0) for level in TUMOR_LEVELS]
        for prob, shape in probs
    ]
    return np.abs(np.asarray(areas) - true_area[:, None]) / true_area[:, None]


def write_tumor_level(run: Path, errors: np.ndarray, how: str) -> dict:
    """``tumor_level.json``: the level of :data:`TUMOR_LEVELS` with the smallest median error."""
    median = np.median(errors, axis=0)
    doc = {
        "level": TUMOR_LEVELS[int(np.argmin(median))],
        "how": how,
        "held_out_median_area_error": {str(k): round(float(v), 4) for k, v in zip(TUMOR_LEVELS, median)},
    }
    write_json(Path(run) / TUMOR_LEVEL_FILE, doc)
    return doc


def lesion_inner_cv_neighbours(
    cfg: TrainConfig,
    encoder: Encoder,
    images: torch.Tensor,
    masks: torch.Tensor,
    train: CaseTable,
    train_rows: np.ndarray,
    device: torch.device,
    n_splits: int = 3,
    compile_net: bool = False,
) -> tuple[list, list, list, np.ndarray]:
    """Held-out neighbour labels of 3 patient-grouped inner folds of the training patients, a
    LesionNet retrained on each (see :func:`neurocbir.training.inner_cv_neighbours`), and the
    held-out slices' outline area errors at each level (:func:`outline_area_errors`)."""
    from .data import grouped_inner_folds

    held_out, y, groups, area_errors = [], [], [], []
    grid = (cfg.image_size, cfg.image_size)
    for tr, va in grouped_inner_folds(train, n_splits):
        net = train_lesion(
            cfg,
            encoder,
            images[train_rows[tr]],
            masks[train_rows[tr]],
            train.label[tr],
            cfg.first_seed,
            device,
            progress=False,
            compile_net=compile_net,
        )
        emb, _, prob = embed_tensors(net, images[train_rows], device, level=None)
        held_out.append(NIRClassifier().fit(emb[tr], train.label[tr]).neighbour_labels(emb[va]))
        y.append(train.label[va])
        groups.append(train.patient_id[va])
        area_errors.append(outline_area_errors(((prob[i].astype(np.float32), grid) for i in va), train.area_mm2[va]))
    return held_out, y, groups, np.concatenate(area_errors)


def calibrate_by_inner_cv(
    cfg: TrainConfig,
    run: Path,
    table: CaseTable,
    encoder: Encoder,
    images: torch.Tensor,
    masks: torch.Tensor,
    device: torch.device,
    compile_net: bool = False,
) -> None:
    """``calibration.json`` and ``tumor_level.json`` of a run that holds no training patients out
    (the GPU preset), from 3 patient-grouped inner folds of its training patients, a LesionNet
    retrained on each: 3 more trainings."""
    train_rows = np.flatnonzero(table.fold != cfg.fold)
    *parts, area_errors = lesion_inner_cv_neighbours(
        cfg, encoder, images, masks, table.subset(train_rows), train_rows, device, compile_net=compile_net
    )
    how = (
        f"3-fold patient-grouped CV inside the training folds (test fold {cfg.fold} unseen), "
        f"LesionNet retrained per inner fold with seed {cfg.first_seed}"
    )
    fit_calibration(run, *parts, how, len(CLASS_NAMES))
    write_tumor_level(run, area_errors, f"median relative area error on {len(area_errors)} slices: {how}")


def recalibrate_lesion_run(
    run: Path, table: CaseTable, cfg: TrainConfig | None = None, compile_net: bool = False
) -> None:
    """Refit a lesion run's calibration and outline level from its files: on its held-out training
    patients (the CPU preset; no training), or by inner CV (3 trainings; a GPU is advised).
    ``cfg``: the run's config with other data or weights paths (default: its config.json)."""
    cfg = cfg or TrainConfig(**json.loads((Path(run) / "config.json").read_text()))
    if cfg.holdout_patients > 0:
        calibrate_on_holdout(run, table)
        return
    device = pick_device()
    images, masks = load_tensors(table, cfg.image_size)
    encoder = cfg.build_encoder()
    calibrate_by_inner_cv(cfg, run, table, encoder, images.to(device), masks.to(device), device, compile_net)


def train_lesion_run(
    cfg: TrainConfig,
    out: Path,
    table: CaseTable,
    deadline: float | None = None,
    progress: bool = True,
    on_trial: Callable[[int, float], None] | None = None,
    score_test_outline: bool = False,
    compile_net: bool = False,
) -> dict:
    """Train ``cfg.trials`` seeds (fewer if ``deadline``, a ``time.time()``, would be passed) and
    write the run; returns timings, and with ``score_test_outline`` the first trial's tumor-outline
    scores on the test fold: a report, for where the test fold is read anyway (the GPU recipe), never
    for a run among candidates still to be chosen from."""
    t_start = time.time()
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device()
    encoder = cfg.build_encoder()
    t0 = time.time()
    images, masks = load_tensors(table, cfg.image_size)
    images, masks = images.to(device), masks.to(device)
    timings: dict = {"load_s": round(time.time() - t0, 1), "trials_s": []}
    write_json(out / "config.json", dataclasses.asdict(cfg))
    test_rows = np.flatnonzero(table.fold == cfg.fold)
    if len(test_rows) == 0:
        raise ValueError(f"fold {cfg.fold} has no cases")
    fit_rows, cal_rows = holdout_split(cfg, table)
    tumor: dict = {}
    for seed in range(cfg.first_seed, cfg.first_seed + cfg.trials):
        last = timings["trials_s"][-1] if timings["trials_s"] else 0.0
        if deadline is not None and time.time() + 1.2 * last > deadline:
            break
        t1 = time.time()
        tdir = trial_dir(out, seed)
        tdir.mkdir(parents=True, exist_ok=True)
        net = train_lesion(
            cfg,
            encoder,
            images[fit_rows],
            masks[fit_rows],
            table.label[fit_rows],
            seed,
            device,
            log_path=tdir / "log.jsonl",
            progress=progress,
            compile_net=compile_net,
        )
        pred = write_trial(tdir, net, cfg, encoder, images, table, device)
        if seed == cfg.first_seed and cfg.calibrate and len(cal_rows):
            calibrate_on_holdout(out, table)
        timings["trials_s"].append(round(time.time() - t1, 1))
        write_json(out / "timings.json", timings)
        if on_trial:
            on_trial(seed, timings["trials_s"][-1])
        if seed == cfg.first_seed and score_test_outline:  # the served trial's outline quality on the test fold
            s = mask_scores(pred, masks[test_rows, 0].cpu().numpy())
            true_area = table.area_mm2[test_rows]
            rel = np.abs(s["area_mm2"] - true_area) / np.maximum(true_area, 1e-6)
            tumor = {
                "median_dice": float(np.median(s["dice"])),
                "mean_dice": float(np.mean(s["dice"])),
                "median_area_rel_error": float(np.median(rel)),
                "seed": seed,
            }
    if (
        cfg.calibrate
        and not len(cal_rows)
        and (deadline is None or time.time() + 3.6 * max(timings["trials_s"]) < deadline)
    ):
        t2 = time.time()
        calibrate_by_inner_cv(cfg, out, table, encoder, images, masks, device, compile_net)
        timings["calibration_s"] = round(time.time() - t2, 1)
    if score_test_outline:
        timings["tumor_outline"] = tumor
    timings["total_s"] = round(time.time() - t_start, 1)  # weights, data, training, index, calibration
    write_json(out / "timings.json", timings)
    return timings
