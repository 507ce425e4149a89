"""A region of a scan that the clinician draws to search by ("find cases like this lesion").

A region is a box ``x0,y0,x1,y1`` in the scan's pixels (x: column, y: row; the far edges
exclusive, as the UI draws them) or a binary mask image the size of the scan. Either becomes a
:class:`Region`: the boolean mask, a short description for the audit trail and an outline to
draw over the scan. Bad regions are refused with a message that names the problem.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from neurocbir.errors import InvalidInput

#: the fewest scan pixels a region may cover
MIN_PIXELS = 4
#: the most points of a drawn outline returned with the answer
MAX_OUTLINE_POINTS = 200


class RegionError(InvalidInput):
    """A region that cannot be searched by (empty, outside the scan, wrong size, not binary)."""


@dataclass(frozen=True)
class Region:
    """A searched region of one scan: ``mask`` (H, W) bool, ``kind`` ``"box"`` or ``"mask"``."""

    mask: np.ndarray
    kind: str
    box: tuple[int, int, int, int]  # the region's bounding box x0, y0, x1, y1 (far edges exclusive)

    @property
    def pixels(self) -> int:
        return int(self.mask.sum())

    def describe(self) -> str:
        """One line for the audit trail: the box, or the mask's bounding box and a digest of it."""
        x0, y0, x1, y1 = self.box
        if self.kind == "box":
            return f"box {x0},{y0},{x1},{y1}"
        digest = hashlib.sha256(np.packbits(self.mask).tobytes()).hexdigest()[:12]
        return f"mask {self.pixels} px in {x0},{y0},{x1},{y1} sha256:{digest}"

    def outline(self) -> list[list[float]]:
        """The region's outline, (x, y) points in the scan's pixels (the largest part of a mask)."""
        if self.kind == "box":
            x0, y0, x1, y1 = self.box
            return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
        from skimage import measure

        contour = max(measure.find_contours(np.pad(self.mask, 1).astype(np.float32), 0.5), key=len) - 1
        contour = contour[:: -(-len(contour) // MAX_OUTLINE_POINTS)]
        return [[round(float(c), 1), round(float(r), 1)] for r, c in contour]

    def as_dict(self) -> dict:
        return {"kind": self.kind, "box": list(self.box), "pixels": self.pixels, "outline": self.outline()}


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x0,y0,x1,y1"`` -> four numbers (a clear error otherwise)."""
    parts = [p.strip() for p in str(text).replace(" ", ",").split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(np.isfinite(values)):
        raise RegionError(f"a region box is four numbers x0,y0,x1,y1 in the scan's pixels, got {text!r}")
    return values  # type: ignore[return-value]


def box_region(box: str | tuple | list, shape: tuple[int, int]) -> Region:
    """The region of a box (text ``"x0,y0,x1,y1"`` or four numbers) on a scan of ``shape`` (rows, cols)."""
    x0, y0, x1, y1 = parse_box(box) if isinstance(box, str) else parse_box(",".join(map(str, box)))
    rows, cols = int(shape[0]), int(shape[1])
    if x1 <= x0 or y1 <= y0:
        raise RegionError(f"the region box {x0:g},{y0:g},{x1:g},{y1:g} is empty: x1 must exceed x0 and y1 exceed y0")
    if x0 < 0 or y0 < 0 or x1 > cols or y1 > rows:
        raise RegionError(
            f"the region box {x0:g},{y0:g},{x1:g},{y1:g} is outside the image ({cols} x {rows} pixels: "
            f"x from 0 to {cols}, y from 0 to {rows})"
        )
    ix0, iy0 = int(np.floor(x0)), int(np.floor(y0))
    ix1, iy1 = max(int(np.ceil(x1)), ix0 + 1), max(int(np.ceil(y1)), iy0 + 1)
    mask = np.zeros((rows, cols), bool)
    mask[iy0:iy1, ix0:ix1] = True
    if mask.sum() < MIN_PIXELS:
        raise RegionError(f"the region box covers {int(mask.sum())} pixels; draw at least {MIN_PIXELS}")
    return Region(mask, "box", (ix0, iy0, ix1, iy1))


def mask_region(mask: np.ndarray, shape: tuple[int, int]) -> Region:
    """The region of a mask image (2-D, the scan's size, two values: the larger one is the region)."""
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].max(-1)
    if arr.ndim != 2:
        raise RegionError(f"a region mask is a 2-D image, got shape {arr.shape}")
    if tuple(arr.shape) != (int(shape[0]), int(shape[1])):
        raise RegionError(
            f"the region mask is {arr.shape[1]} x {arr.shape[0]} pixels; it must be the scan's size, "
            f"{int(shape[1])} x {int(shape[0])}"
        )
    values = np.unique(arr)
    if len(values) > 2:
        raise RegionError(
            f"the region mask is not binary: it has {len(values)} distinct values (use 0 outside, one value inside)"
        )
    inside = arr > values.min() if len(values) == 2 else (arr > 0)
    if inside.sum() < MIN_PIXELS:
        raise RegionError(f"the region mask is empty (it marks {int(inside.sum())} pixels; at least {MIN_PIXELS})")
    ys, xs = np.nonzero(inside)
    return Region(inside, "mask", (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


def read_region_mask(data: bytes, shape: tuple[int, int]) -> Region:
    """A region mask uploaded as an image file (PNG, ...)."""
    import io

    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RegionError("the region mask file is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "1", "I", "I;16", "F") else im)
    except (UnidentifiedImageError, OSError, ValueError):
        raise RegionError("the region mask is not an image file (send a PNG the size of the scan)") from None
    return mask_region(arr, shape)


def region_on_grid(region: Region, side: int) -> np.ndarray:
    """The share of each cell of a ``side`` x ``side`` grid over the scan (the network's input
    grid: the scan resized, as :func:`neurocbir.data.transforms.preprocess` does) inside the region:
    (side, side) float32 in [0, 1]."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(region.mask.astype(np.float32))[None, None]
    return F.interpolate(m, size=(side, side), mode="area")[0, 0].numpy()


def region_peak(prob: np.ndarray, grid: np.ndarray) -> float:
    """The tumor decoder's highest probability inside a region (both on the input grid, (S, S)):
    cells at least half inside count (every touched cell, for a region smaller than that)."""
    inside = grid >= 0.5
    if not inside.any():
        inside = grid > 0
    return float(np.asarray(prob)[inside].max())


def tumor_box(mask: np.ndarray, scale: float = 1.0) -> tuple[int, int, int, int]:
    """The bounding box (x0, y0, x1, y1) of a tumor mask, ``scale`` times as wide and tall about
    its centre, clipped to the image (what the region benchmarks query by)."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        raise RegionError("the mask marks no tumor")
    rows, cols = mask.shape
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    hw, hh = scale * (xs.max() + 1 - xs.min()) / 2, scale * (ys.max() + 1 - ys.min()) / 2
    x0, y0 = max(0, int(round(cx - hw))), max(0, int(round(cy - hh)))
    return x0, y0, min(cols, max(x0 + 2, int(round(cx + hw)))), min(rows, max(y0 + 2, int(round(cy + hh))))


def away_box(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, tries: int = 200
) -> tuple[int, int, int, int] | None:
    """A box of the tumor's bounding-box size on the same slice, on tissue (at least 80 % of its
    pixels inside the head) and away from the tumor (no tumor pixel within a quarter of the box's
    size); None when the slice has no room for one."""
    from scipy import ndimage

    x0, y0, x1, y1 = tumor_box(mask)
    w, h = x1 - x0, y1 - y0
    rows, cols = mask.shape
    if w >= cols or h >= rows:
        return None
    arr = np.asarray(image, np.float32)
    lo, hi = np.percentile(arr, (1, 99))
    head = ndimage.binary_fill_holes(arr > lo + 0.1 * (hi - lo))
    near = ndimage.binary_dilation(mask > 0, iterations=max(1, min(w, h) // 4))
    head_sum = np.pad(head, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    near_sum = np.pad(near, ((1, 0), (1, 0))).cumsum(0).cumsum(1)

    def count(s: np.ndarray, x: int, y: int) -> int:
        return int(s[y + h, x + w] - s[y, x + w] - s[y + h, x] + s[y, x])

    for _ in range(tries):
        x, y = int(rng.integers(0, cols - w + 1)), int(rng.integers(0, rows - h + 1))
        if count(near_sum, x, y) == 0 and count(head_sum, x, y) >= 0.8 * w * h:
            return x, y, x + w, y + h
    return None
