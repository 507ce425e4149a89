"""Preprocessing (as the paper) and the fixed training augmentations.

Inference: scale each image to [-1, 1] (its whole range, or a window set inside the head: see
:func:`scale_intensity`), resize to 224x224, repeat to 3 channels.
Training: each case gets ``n_copies`` extra deterministic copies (Gaussian blur, random
rotation, ...), so the trunk's frozen part can be run once and cached.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

IMAGE_SIZE = 224
#: how a slice's intensities are brought to [-1, 1]: ``minmax`` (the image's own range, as the paper)
#: or ``head`` (black stays black, the head's 99th percentile becomes white; see :func:`scale_intensity`)
INTENSITY = ("minmax", "head")
HEAD_LEVEL = 0.05  # share of the full range above which a pixel counts as inside the head
HEAD_PERCENTILE = 99.0


def scale_intensity(arr: np.ndarray, how: str = "minmax") -> np.ndarray:
    """A 2-D float image scaled to [-1, 1]. ``minmax``: its minimum and maximum. ``head``: zero at
    its minimum and one at the 99th percentile of the pixels inside the head (above 5 % of the
    range), brighter ones clipped: a few bright pixels (fat, vessels, a marker) no longer darken the
    brain, so sources whose files are windowed differently look alike (a JPEG export already
    clipped at its own window, a DICOM slice with its full range)."""
    if how not in INTENSITY:
        raise ValueError(f"intensity must be one of {INTENSITY}, got {how!r}")
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr)
    unit = (arr - lo) / (hi - lo)
    if how == "head":
        head = unit[unit > HEAD_LEVEL]
        if head.size >= 64:
            unit = np.clip(unit / max(float(np.percentile(head, HEAD_PERCENTILE)), 1e-6), 0.0, 1.0)
    return unit * 2.0 - 1.0


def preprocess(image: np.ndarray, size: int = IMAGE_SIZE, intensity: str = "minmax") -> torch.Tensor:
    """(H, W) array of any intensity range -> (3, size, size) float tensor in [-1, 1]
    (``intensity``: :func:`scale_intensity`)."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(axis=-1)
    if arr.ndim != 2 or min(arr.shape) < 8:
        raise ValueError(f"expected a 2-D grayscale image of at least 8x8 pixels, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("image has NaN or infinite pixels")
    t = torch.from_numpy(scale_intensity(arr, intensity).astype(np.float32, copy=False))[None]
    t = TF.resize(t, [size, size], antialias=True)
    return t.clamp_(-1.0, 1.0).expand(3, -1, -1).contiguous()


def augment(x: torch.Tensor, copy: int, seed: int) -> torch.Tensor:
    """Deterministic augmented copy number ``copy`` (>= 1) of a preprocessed image.

    Copy 1 is a Gaussian blur and copy 2 a random rotation (the paper's two); further
    copies combine rotation, blur, small scaling and horizontal flips for more variety.
    """
    if copy < 1:
        raise ValueError("copy 0 is the original image")
    rng = np.random.default_rng([seed, copy])
    fill = [-1.0]  # background of a [-1, 1] MRI slice
    if copy == 1:
        sigma = float(rng.uniform(0.5, 1.5))
        return TF.gaussian_blur(x, kernel_size=[7, 7], sigma=[sigma, sigma])
    if copy == 2:
        return TF.rotate(x, float(rng.uniform(-20, 20)), fill=fill)
    out = TF.affine(
        x,
        angle=float(rng.uniform(-25, 25)),
        translate=[int(rng.integers(-12, 13)), int(rng.integers(-12, 13))],
        scale=float(rng.uniform(0.9, 1.1)),
        shear=[0.0, 0.0],
        fill=fill,
    )
    if rng.random() < 0.5:
        out = TF.horizontal_flip(out)
    if rng.random() < 0.5:
        sigma = float(rng.uniform(0.3, 1.2))
        out = TF.gaussian_blur(out, kernel_size=[5, 5], sigma=[sigma, sigma])
    return out
