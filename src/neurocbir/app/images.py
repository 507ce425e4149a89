"""Scans as the page shows them: an 8-bit PNG, scaled to its own range, with the tumor's edge
drawn in red where a mask is given; or as a data URL, for a series' slice strip."""

from __future__ import annotations

import base64
import io

import numpy as np


def png(img: np.ndarray, mask: np.ndarray | None = None, size: int = 256) -> bytes:
    from PIL import Image
    from scipy.ndimage import binary_erosion

    a = img.astype(np.float32)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6) * 255
    rgb = np.repeat(a.astype(np.uint8)[..., None], 3, axis=2)
    if mask is not None and mask.shape == img.shape:
        edge = mask & ~binary_erosion(mask, iterations=3)
        rgb[edge] = (255, 40, 40)
    buf = io.BytesIO()
    Image.fromarray(rgb).resize((size, size)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(img: np.ndarray, size: int) -> str:
    """A PNG of ``img`` at ``size`` px as a data URL (the slice strip; allowed by the page's CSP)."""
    return "data:image/png;base64," + base64.b64encode(png(img, None, size)).decode()
