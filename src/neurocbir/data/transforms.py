"""Preprocessing (as the paper) and the fixed training augmentations.

Inference: scale each image to [-1, 1], resize to 224x224, repeat to 3 channels.
Training: each case gets ``n_copies`` extra deterministic copies (Gaussian blur, random
rotation, ...), so the trunk's frozen part can be run once and cached.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

IMAGE_SIZE = 224


def preprocess(image: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(H, W) array of any intensity range -> (3, size, size) float tensor in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(axis=-1)
    if arr.ndim != 2 or min(arr.shape) < 8:
        raise ValueError(f"expected a 2-D grayscale image of at least 8x8 pixels, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("image has NaN or infinite pixels")
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) / (hi - lo) * 2.0 - 1.0 if hi > lo else np.zeros_like(arr)
    t = torch.from_numpy(scaled)[None]
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
