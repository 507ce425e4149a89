"""Is this image already in the archive? Near-duplicate detection of slices, mirrors included.

Real archives receive the same image twice: a re-sent study, a re-exported file, a display copy
flipped left to right. Two stages, both on the head's window (centred on the centroid of the
pixels brighter than the background, :data:`SPREAD` standard deviations of their positions each
way), each pixel replaced by its rank (so any monotone change of intensities, an 8-bit export or
another window, changes nothing):

1. a coarse **fingerprint** (:data:`SIDE` x :data:`SIDE`, and the same of the mirror image)
   finds the candidates by inner product (FAISS): a copy scores at least :data:`GATE` with its
   original, but so do many other patients' slices at this scale (brains look alike);
2. a fine **detail** print (:data:`FINE` x :data:`FINE`) of each candidate is compared with the
   new image's, the new image's window scaled and shifted a little (a copy cropped a little has a
   slightly different window); a duplicate reaches :data:`THRESHOLD`.

How the method and the threshold were chosen, on figshare training folds only
(``benchmarks/duplicates.py``, docs/results.md "Duplicates"): copies made as archives receive them
(re-encoded as 8-bit JPEG, resized, cropped a little, mirrored) against every other training slice
in both orientations, the same patient's neighbouring slices included (they reach 0.989). The
threshold is the lowest that takes at most 0.1 % of training slices for a duplicate of another
slice: 0.992. There, re-encoded, resized and mirrored copies are found (99.5-100 % on fold 5), but
copies cropped by 3 % on each side only 37-42 %: cropping moves the head's window by more than the
variants' steps cover. Known limitation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

#: coarse fingerprint side in pixels (SIDE * SIDE values)
SIDE = 16
#: fine detail side in pixels
FINE = 32
#: the coarse similarity from which a stored case is a candidate
GATE = 0.91
#: the aligned fine similarity from which a candidate is a duplicate (chosen on figshare training folds)
THRESHOLD = 0.992
#: what counts as the head: pixels above this share of the (1st - 99th percentile) range
HEAD_LEVEL = 0.1
#: the window: the head's centroid +- this many standard deviations of its pixels' positions
SPREAD = 2.5
#: how the new image's window is varied for the fine comparison (scale of the window; shift, share of it)
SCALES = (0.95, 1.0, 1.05)
SHIFTS = (-0.02, 0.0, 0.02)
CANDIDATES = 8


def _gray(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(-1)
    if arr.ndim != 2 or min(arr.shape) < 8 or not np.isfinite(arr).all():
        raise ValueError(f"expected a finite 2-D image of at least 8x8 pixels, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _ranks(small: np.ndarray) -> np.ndarray:
    """Each row's ranks (ties, the background's above all, share their mean rank), centred and of
    unit length: (n, ...) -> (n, D) float32."""
    from scipy.stats import rankdata

    r = rankdata(np.asarray(small, dtype=np.float32).reshape(len(small), -1), axis=1).astype(np.float32)
    r -= r.mean(1, keepdims=True)
    return r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-6)


class ImagePrints:
    """One image's prints, computed once and on demand: ``coarse`` (2, SIDE * SIDE), ``fine``
    (FINE * FINE,) and ``variants`` (2, V, FINE * FINE); the second row of each pair is the mirror
    image's."""

    def __init__(self, image: np.ndarray):
        from PIL import Image

        arr = _gray(image)
        h, w = arr.shape
        lo, hi = np.percentile(arr[::2, ::2], (1, 99))
        inside = arr > lo + HEAD_LEVEL * (hi - lo)
        if hi <= lo or inside.sum() < 16:  # nothing stands out: the whole image
            cy, cx, ry, rx = h / 2, w / 2, h / 2, w / 2
        else:
            ys, xs = np.nonzero(inside)
            cy, cx, ry, rx = ys.mean() + 0.5, xs.mean() + 0.5, SPREAD * ys.std(), SPREAD * xs.std()
        e = max(SCALES) + 2 * max(abs(v) for v in SHIFTS)  # the widest window of the variants
        pad = int(np.ceil(max(e * ry - cy, cy + e * ry - h, e * rx - cx, cx + e * rx - w, 0))) + 1
        padded = Image.fromarray(np.pad(arr, pad, constant_values=float(lo)))
        cx, cy = cx + pad, cy + pad
        # the mirror image's window is the mirror of this one
        self._views = [(padded, cx), (padded.transpose(Image.Transpose.FLIP_LEFT_RIGHT), padded.width - cx)]
        self._cy, self._rx, self._ry = cy, rx, ry

    def _patch(self, view: int, extent: float, side: int):
        """The head's window ``extent`` times as wide, resampled to ``side`` x ``side`` (a PIL image)."""
        from PIL import Image

        padded, cx = self._views[view]
        cy, rx, ry = self._cy, self._rx, self._ry
        box = (cx - extent * rx, cy - extent * ry, cx + extent * rx, cy + extent * ry)
        return padded.resize((side, side), Image.Resampling.BOX, box=box)

    @cached_property
    def coarse(self) -> np.ndarray:
        return _ranks(np.stack([np.asarray(self._patch(v, 1.0, SIDE)) for v in (0, 1)]))

    @cached_property
    def _fine_patches(self) -> list:
        # sampled once at twice the fine side over the widest window; every fine window is taken from
        # it (the two resamplings smooth a little: a copy's small misalignments matter less)
        e = max(SCALES) + 2 * max(abs(v) for v in SHIFTS)
        return [self._patch(v, e, int(round(2 * FINE * e))) for v in (0, 1)]

    def _fine_windows(self, view: int, boxes) -> np.ndarray:
        from PIL import Image

        patch = self._fine_patches[view]
        e = max(SCALES) + 2 * max(abs(v) for v in SHIFTS)
        c, r = patch.width / 2, patch.width / (2 * e)
        return _ranks(
            np.stack(
                [
                    np.asarray(
                        patch.resize(
                            (FINE, FINE), Image.Resampling.BOX, box=(c + x0 * r, c + y0 * r, c + x1 * r, c + y1 * r)
                        )
                    )
                    for x0, y0, x1, y1 in boxes
                ]
            )
        )

    @property
    def stored(self) -> np.ndarray:
        """What an archive stores of the image: its coarse fingerprint then its fine print (float16)."""
        return np.concatenate([self.coarse[0], self.fine]).astype(np.float16)

    @cached_property
    def fine(self) -> np.ndarray:
        return self._fine_windows(0, [(-1, -1, 1, 1)])[0]

    @cached_property
    def variants(self) -> np.ndarray:
        boxes = [
            (2 * dx - sx, 2 * dy - sy, 2 * dx + sx, 2 * dy + sy)
            for sx in SCALES
            for sy in SCALES
            for dx in SHIFTS
            for dy in SHIFTS
        ]
        return np.stack([self._fine_windows(v, boxes) for v in (0, 1)])


def fingerprint(image: np.ndarray) -> np.ndarray:
    """(2, SIDE * SIDE) float32: the coarse fingerprint of the slice and of its mirror image."""
    return ImagePrints(image).coarse


def detail(image: np.ndarray) -> np.ndarray:
    """(FINE * FINE,) float32: the fine print of the slice as stored (its window as it is)."""
    return ImagePrints(image).fine


def detail_variants(image: np.ndarray) -> np.ndarray:
    """(2, V, FINE * FINE): fine prints of the slice and of its mirror image over windows scaled
    (each side apart) and shifted a little, V = len(SCALES) ** 2 * len(SHIFTS) ** 2."""
    return ImagePrints(image).variants


def aligned_similarity(variants: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """(2, c): the correlation of each orientation's best window (:func:`detail_variants`) with
    each stored fine print ((c, FINE * FINE))."""
    return (variants @ np.asarray(stored, dtype=np.float32).T).max(1)


@dataclass
class Duplicate:
    """A stored case that an image duplicates, and whether the image is its mirror."""

    case_id: int
    mirrored: bool
    similarity: float


class DuplicateIndex:
    """Stored cases' coarse fingerprints (searched with FAISS) and a way to their fine prints
    (``details``: case ids -> (n, FINE * FINE), e.g. read from the archive's database)."""

    @classmethod
    def of_archive(cls, archive) -> DuplicateIndex:
        """The prints an archive stores (coarse ones in memory, fine ones read when needed)."""
        ids, coarse = archive.fingerprints(SIDE * SIDE)
        return cls(lambda case_ids: archive.stored_prints(case_ids)[:, SIDE * SIDE :]).add(ids, coarse)

    def __init__(self, details: Callable[[list[int]], np.ndarray] | None = None, threshold: float = THRESHOLD):
        import faiss

        self.threshold = threshold
        self.index = faiss.IndexFlatIP(SIDE * SIDE)
        self.ids: list[int] = []
        self._details: dict[int, np.ndarray] = {}
        self._read_details = details

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, case_ids, prints: np.ndarray, details: np.ndarray | None = None) -> DuplicateIndex:
        """Add cases: ids, coarse fingerprints ((n, SIDE * SIDE), the first orientation) and, unless
        the index reads them elsewhere, their fine prints ((n, FINE * FINE))."""
        case_ids = [int(c) for c in case_ids]
        prints = np.ascontiguousarray(np.asarray(prints, dtype=np.float32).reshape(len(case_ids), SIDE * SIDE))
        if details is not None:
            self._details.update(zip(case_ids, np.asarray(details, dtype=np.float32)))
        elif self._read_details is None and case_ids:
            raise ValueError("fine prints are needed: pass details, or build the index with a reader of them")
        if case_ids:
            self.index.add(prints)
            self.ids += case_ids
        return self

    def with_added(self, case_ids, prints: np.ndarray) -> DuplicateIndex:
        """A new index: this one's cases and ``case_ids`` with their coarse ``prints`` (fine ones
        read as this index reads them); this one is not changed (others search it meanwhile)."""
        import copy

        import faiss

        out = copy.copy(self)
        out.index, out.ids, out._details = faiss.clone_index(self.index), list(self.ids), dict(self._details)
        return out.add(case_ids, prints)

    def _fine(self, case_ids: list[int]) -> np.ndarray:
        """The fine prints of ``case_ids``: those added with theirs from memory, the others read."""
        unread = [c for c in case_ids if c not in self._details]
        read = dict(zip(unread, np.asarray(self._read_details(unread), dtype=np.float32))) if unread else {}
        return np.stack([self._details[c] if c in self._details else read[c] for c in case_ids])

    def find(self, image: np.ndarray | ImagePrints) -> list[Duplicate]:
        """The stored cases that ``image`` (or its :class:`ImagePrints`) duplicates, most similar
        first (an empty list for an image not yet stored)."""
        if not self.ids:
            return []
        prints = image if isinstance(image, ImagePrints) else ImagePrints(image)
        sims, rows = self.index.search(prints.coarse, min(CANDIDATES, len(self.ids)))
        candidates = sorted({self.ids[int(r)] for s, r in zip(sims.ravel(), rows.ravel()) if r >= 0 and s >= GATE})
        if not candidates:
            return []
        scores = aligned_similarity(prints.variants, self._fine(candidates))  # (2, c)
        out = []
        for j, case_id in enumerate(candidates):
            mirrored = bool(scores[1, j] > scores[0, j])
            s = float(scores[int(mirrored), j])
            if s >= self.threshold:
                out.append(Duplicate(case_id, mirrored, round(s, 4)))
        return sorted(out, key=lambda d: -d.similarity)
