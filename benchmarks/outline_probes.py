"""Can post-processing or a small second stage bring the query tumor's area error under 20 %
(issue 9) without retraining the encoder on a GPU?

Read only training patients: the run must have been trained with ``holdout_patients`` (the CPU
default, ``benchmarks/cpu_recipe.py``); its held-out patients are the evaluation set, the test
fold is never loaded. Every method's free choices (outline level; zoom gate) are made by
patient-grouped 5-fold CV over those held-out slices, so each figure is an out-of-sample median.

Methods, each on top of the run's network, unchanged:
- ``base``: the app's outline (the run's network, largest region at one level);
- ``flip``: the mean tumor probability of the slice and its mirror image;
- ``zoom``: a second pass on a crop around the predicted tumor, 1.5x larger, for tumors predicted
  smaller than a gate (the network over-outlines small tumors);
- ``refine``: a small convolutional head trained on the run's training patients (the held-out
  ones excluded) that refines the stride-4 tumor logits with the stride-2 trunk features;
- ``crop``: a small U-Net trained from scratch on tumor-centred crops of the full 512 px slices
  (2.5x the tumor's box, 128 px), applied around the predicted tumor.

    python benchmarks/outline_probes.py runs/cpu/lesion-fold5-mobilenetv2-224px-25ep
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from skimage import measure

from neurocbir.data.cases import load_cases
from neurocbir.data.transforms import preprocess
from neurocbir.models.inference import load_model
from neurocbir.models.lesion import _taps, tumor_outline
from neurocbir.models.runs import TrainConfig
from neurocbir.training.lesion_run import TUMOR_LEVELS, holdout_split
from results_doc import machine, write_section

SPACING = 0.49  # mm per pixel at 512 px (the dataset's)
ZOOM = 1.5
GATES_MM2 = (200, 400, 600, 800, 1000)
CROP_PX = 128


def areas(prob: np.ndarray, shape: tuple[int, int], spacing: tuple[float, float] | None = None) -> np.ndarray:
    """Outlined area (mm^2) at each of TUMOR_LEVELS, 0 where nothing is outlined."""
    return np.array([(o["area_mm2"] if (o := tumor_outline(prob, shape, spacing, lv)) else 0.0) for lv in TUMOR_LEVELS])


def largest_box(prob: np.ndarray, level: float) -> tuple[float, float, float, float] | None:
    """(centre row, centre col, box side, area in cells) of the largest region >= level."""
    regions = measure.label(prob >= level)
    if regions.max() == 0:
        return None
    big = regions == 1 + int(np.argmax(np.bincount(regions.ravel())[1:]))
    rr, cc = np.nonzero(big)
    side = max(rr.max() - rr.min() + 1, cc.max() - cc.min() + 1)
    return (rr.min() + rr.max() + 1) / 2, (cc.min() + cc.max() + 1) / 2, float(side), float(big.sum())


def crop(img: torch.Tensor, cy: float, cx: float, side: float, out: int) -> torch.Tensor:
    """(C, H, W) -> (C, out, out): the square of ``side`` px centred at (cy, cx), zero outside."""
    h, w = img.shape[-2:]
    steps = (torch.arange(out) + 0.5) * side / out - side / 2
    ys, xs = (cy + steps) / h * 2 - 1, (cx + steps) / w * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1)[None]
    return F.grid_sample(img[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


class Refiner(nn.Module):
    """Residual refinement of the stride-4 tumor logits at stride 2 (trunk features, image, logits)."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels + 2, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 1),
        )
        nn.init.zeros_(self.body[-1].weight)  # starts as the network's own outline
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, image: torch.Tensor, fine: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(logits, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return up + self.body(torch.cat([image, fine, up], 1))


def _block(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(i, o, 3, padding=1, bias=False),
        nn.BatchNorm2d(o),
        nn.ReLU(inplace=True),
        nn.Conv2d(o, o, 3, padding=1, bias=False),
        nn.BatchNorm2d(o),
        nn.ReLU(inplace=True),
    )


class CropUNet(nn.Module):
    """A 4-level U-Net on (crop, the network's tumor probability in the crop)."""

    def __init__(self, w: int = 16):
        super().__init__()
        self.enc = nn.ModuleList([_block(2, w), _block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 8 * w)])
        self.dec = nn.ModuleList([_block(12 * w, 4 * w), _block(6 * w, 2 * w), _block(3 * w, w)])
        self.out = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.enc):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for dec in self.dec:
            skip = skips.pop()
            x = dec(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1))
        return self.out(x)


def train_loop(model: nn.Module, batches, epochs: int, steps: int, lr: float) -> float:
    """DiceCE training with one-cycle AdamW; returns the wall time (s)."""
    from monai.losses import DiceCELoss

    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps, pct_start=0.15)
    loss_fn, t0 = DiceCELoss(sigmoid=True), time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for x, y in batches(epoch):
            loss = loss_fn(model(*x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"  epoch {epoch + 1}/{epochs} loss {total / steps:.4f}", flush=True)
    model.eval()
    return time.perf_counter() - t0


def grouped_cv(errors: dict[tuple, np.ndarray], groups: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Out-of-sample errors: each candidate (key) chosen on 4/5 of the patients, applied to the rest."""
    from sklearn.model_selection import GroupKFold

    keys = list(errors)
    table = np.stack([errors[k] for k in keys])
    out = np.zeros(table.shape[1])
    for fit, held in GroupKFold(5).split(table.T, groups=groups):
        out[held] = table[int(np.argmin(np.median(table[:, fit], axis=1))), held]
    return out, keys[int(np.argmin(np.median(table, axis=1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a lesion run trained with holdout_patients (the CPU default)")
    ap.add_argument("--refine-epochs", type=int, default=12)
    ap.add_argument("--crop-epochs", type=int, default=10)
    ap.add_argument("--subset", type=int, default=0, help="only this many slices of each set (a smoke test)")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = TrainConfig(**json.loads((args.run / "config.json").read_text()))
    table = load_cases(cfg.data)
    fit_rows, cal_rows = holdout_split(cfg, table)
    if args.subset:
        fit_rows, cal_rows = fit_rows[: args.subset], cal_rows[: args.subset]
    if not len(cal_rows):
        sys.exit(f"{args.run} holds no training patients out of training: train it with holdout_patients")
    model = load_model(args.run, cfg.first_seed)
    net, size = model.net, cfg.image_size
    level0 = json.loads((args.run / "tumor_level.json").read_text())["level"]
    true = table.area_mm2[cal_rows]
    groups = table.patient_id[cal_rows]
    rng = np.random.default_rng(0)
    (fine_tap,), (fine_channels,) = _taps(net.trunk, (2,))

    fine: list[torch.Tensor] = []  # the stride-2 trunk output, caught during the one pass
    net.trunk[fine_tap].register_forward_hook(lambda _m, _i, out: fine.append(out))

    def net_inputs(image: np.ndarray) -> tuple[torch.Tensor, ...]:
        """(image at stride 2, stride-2 trunk features, stride-4 logits) of one slice."""
        x = preprocess(image, size)[None].contiguous(memory_format=torch.channels_last)
        fine.clear()  # a PyTorch-path analyse() runs the trunk too
        with torch.inference_mode():
            logits = net.features(x)[1]
        return F.avg_pool2d(x[:, :1], 2).half(), fine.pop().half(), logits.half()

    def scaled(image: np.ndarray) -> torch.Tensor:
        """The slice in [-1, 1] at its own resolution (the crops are cut from it)."""
        return preprocess(image, image.shape[0])[0]

    print(f"{len(cal_rows)} held-out slices, {len(fit_rows)} training slices", flush=True)
    errors: dict[str, dict[tuple, np.ndarray]] = {m: {} for m in ("base", "flip", "zoom", "refine", "crop")}
    per_slice: dict[str, list] = {m: [] for m in ("base", "flip", "zoom_crop", "gate")}
    held_inputs, held_full = [], []
    extra_ms: dict[str, list[float]] = {m: [] for m in ("base", "flip", "zoom", "refine", "crop")}

    def timed(name: str, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        extra_ms[name].append(1000 * (time.perf_counter() - t))
        return out

    t0 = time.perf_counter()
    for r in cal_rows:
        image = table.load_image(r)
        shape = image.shape[:2]
        base = timed("base", model.analyse, image)[2]
        flip = (base + timed("flip", model.analyse, image[:, ::-1].copy())[2][:, ::-1]) / 2
        per_slice["base"].append(areas(base, shape))
        per_slice["flip"].append(areas(flip, shape))
        box = largest_box(base, level0)
        per_slice["gate"].append(box[3] * (shape[0] / size) ** 2 * SPACING**2 * (512 / shape[0]) ** 2 if box else 0.0)
        if box is None:
            per_slice["zoom_crop"].append(np.zeros(len(TUMOR_LEVELS)))
        else:  # the second pass: a crop 1/ZOOM of the slice around the tumor, through the app's path
            sy = shape[0] / size
            side = int(round(shape[0] / ZOOM))
            y0 = int(round(min(max(box[0] * sy - side / 2, 0), shape[0] - side)))
            x0 = int(round(min(max(box[1] * sy - side / 2, 0), shape[1] - side)))
            sub = timed("zoom", model.analyse, image[y0 : y0 + side, x0 : x0 + side])[2]
            per_slice["zoom_crop"].append(areas(sub, (side, side)))
        held_inputs.append(net_inputs(image))
        held_full.append((scaled(image), torch.from_numpy(base).float()))
    print(f"  held-out passes {time.perf_counter() - t0:.0f} s", flush=True)
    base_a, flip_a, zoom_a, gate = (np.asarray(per_slice[k]) for k in ("base", "flip", "zoom_crop", "gate"))
    rel = lambda a: np.abs(a - true) / true  # noqa: E731
    for j, lv in enumerate(TUMOR_LEVELS):
        errors["base"][(lv,)] = rel(base_a[:, j])
        errors["flip"][(lv,)] = rel(flip_a[:, j])
    for (jb, lb), (jz, lz), g in itertools.product(enumerate(TUMOR_LEVELS), enumerate(TUMOR_LEVELS), GATES_MM2):
        errors["zoom"][(lb, lz, g)] = rel(np.where(gate < g, zoom_a[:, jz], base_a[:, jb]))

    # the two trained second stages: the held-out patients' slices are never trained on
    train_images = [table.load_image(r) for r in fit_rows]
    train_masks = [table.load_mask(r) > 0 for r in fit_rows]
    batch = 32
    steps = len(fit_rows) // batch
    timings = {}
    if args.refine_epochs:
        cache = [net_inputs(im) for im in train_images]
        targets = [
            (F.interpolate(torch.from_numpy(m.astype(np.float32))[None, None], size=(size, size), mode="area") >= 0.5)
            for m in train_masks
        ]

        def refine_batches(epoch: int):
            order = rng.permutation(len(cache))
            for s in range(steps):
                idx = order[s * batch : (s + 1) * batch]
                parts = [torch.cat([cache[i][k] for i in idx]).float() for k in range(3)]
                y = torch.cat([targets[i] for i in idx]).float()
                if rng.random() < 0.5:
                    parts, y = [p.flip(-1) for p in parts], y.flip(-1)
                yield parts, F.interpolate(y, size=parts[1].shape[-2:], mode="area")

        refiner = Refiner(fine_channels)
        timings["refine"] = train_loop(refiner, refine_batches, args.refine_epochs, steps, 2e-3)
        with torch.no_grad():
            refined = []
            for img, fine, logits in held_inputs:
                out = timed("refine", refiner, img.float(), fine.float(), logits.float())
                prob = torch.sigmoid(F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False))
                refined.append(areas(prob[0, 0].numpy(), (512, 512)))
        refined = np.asarray(refined)
        for j, lv in enumerate(TUMOR_LEVELS):
            errors["refine"][(lv,)] = rel(refined[:, j])

    if args.crop_epochs:
        train_probs = [torch.from_numpy(model.analyse(im)[2]).float() for im in train_images]
        train_full = [scaled(im) for im in train_images]
        boxes = [largest_box(m.astype(np.float32), 0.5) for m in train_masks]

        def stack(full: torch.Tensor, prob: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
            p = F.interpolate(prob[None, None], size=full.shape, mode="bilinear", align_corners=False)[0]
            return torch.cat([full[None], p * 2 - 1] + ([extra[None].float()] if extra is not None else []))

        def crop_batches(epoch: int):
            order = rng.permutation(len(train_full))
            for s in range(steps):
                xs, ys = [], []
                for i in order[s * batch : (s + 1) * batch]:
                    cy, cx, side, _ = boxes[i]  # the true tumor's box, jittered in place and size
                    cy, cx = cy + rng.uniform(-0.15, 0.15) * side, cx + rng.uniform(-0.15, 0.15) * side
                    c = crop(
                        stack(train_full[i], train_probs[i], torch.from_numpy(train_masks[i])),
                        cy,
                        cx,
                        max(side * rng.uniform(2.0, 3.0), 64),
                        CROP_PX,
                    )
                    if rng.random() < 0.5:
                        c = c.flip(-1)
                    xs.append(c[:2])
                    ys.append((c[2:] >= 0.5).float())
                yield [torch.stack(xs)], torch.stack(ys)

        unet = CropUNet()
        timings["crop"] = train_loop(unet, crop_batches, args.crop_epochs, steps, 3e-3)

        def crop_pass(full: torch.Tensor, prob: torch.Tensor, box: tuple, side: float) -> torch.Tensor:
            return unet(crop(stack(full, prob), box[0], box[1], side, CROP_PX)[None])

        cropped = []
        with torch.no_grad():
            for full, prob in held_full:
                up = F.interpolate(prob[None, None], size=full.shape, mode="bilinear", align_corners=False)[0, 0]
                box = largest_box(up.numpy(), level0)
                if box is None:
                    cropped.append(np.zeros(len(TUMOR_LEVELS)))
                    continue
                side = max(box[2] * 2.5, 64)
                c = timed("crop", crop_pass, full, prob, box, side)
                p = torch.sigmoid(c)[0, 0].numpy()
                s = SPACING * 512 / full.shape[0] * side / CROP_PX
                cropped.append(areas(p, (CROP_PX, CROP_PX), (s, s)))
        cropped = np.asarray(cropped)
        for j, lv in enumerate(TUMOR_LEVELS):
            errors["crop"][(lv,)] = rel(cropped[:, j])

    small = true < np.quantile(true, 0.25)
    rows = []
    labels = {
        "base": "the app's outline (one level)",
        "flip": "mean with the mirror image",
        "zoom": f"second pass on a crop {ZOOM}x larger, below a predicted-size gate",
        "refine": "trained stride-2 refinement head",
        "crop": f"trained U-Net on {CROP_PX} px tumor-centred crops of the 512 px slice",
    }
    for name, errs in errors.items():
        if not errs:
            continue
        out, chosen = grouped_cv(errs, groups)
        ms = np.median(extra_ms[name]) if extra_ms[name] else 0.0
        cost = f"{ms:.1f} (the CNN pass itself)" if name == "base" else f"+{ms:.1f}"
        train = f"{timings[name] / 60:.1f}" if name in timings else "-"
        rows.append(
            f"| {labels[name]} | {cost} | {train} | **{np.median(out):.3f}** | {np.median(out[small]):.3f} | "
            f"{np.median(out[~small]):.3f} | {', '.join(map(str, chosen))} |"
        )
        print(name, f"{np.median(out):.4f}", chosen, flush=True)
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = "\n".join(
        [
            "## Query tumor area: post-processing and second stages, on held-out training patients (issue 9)",
            "",
            f"Command: `python benchmarks/outline_probes.py {args.run}` | machine: {machine()} | {now}",
            "",
            f"Run `{args.run.name}` (the CPU default, fold {cfg.fold}); {len(cal_rows)} slices of "
            f"{len(np.unique(groups))} training patients held out of its training. The test fold is not read. "
            "Each figure is out of sample: the method's free choices (outline level; for the zoom, the levels "
            "and the size gate) are made by patient-grouped 5-fold CV over the held-out slices. The trained "
            "second stages are trained on the run's other training patients only. Small: the quarter of "
            "slices with the smallest true tumors. Cost: median time per slice on this CPU, one at a time (the "
            "trained stages in PyTorch float32, their inputs ready; the second passes through the app's path).",
            "",
            "| method | time per query (ms) | training (min, this CPU) | median relative area error | small tumors "
            "| the others | choice on all held-out slices |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(body)
    if not (args.no_doc or args.subset):
        write_section("outline-probes", body)


if __name__ == "__main__":
    main()
