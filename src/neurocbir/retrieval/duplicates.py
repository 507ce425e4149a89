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
   new image's, the new image's window scaled and shifted a little (:data:`SCALES`, :data:`SHIFTS`);
3. a candidate close enough (:data:`REFINE_FROM`) is **registered**: the new image's window is moved
   and scaled freely (Nelder-Mead) and compared on the pixels that lie inside the new image only. A
   copy cropped a little has another head window (the crop cuts into the head) and lacks what the
   crop removed; registered on what it has, it matches its original at 0.999 and more, while the
   same patient's neighbouring slices stay below 0.99. A duplicate reaches :data:`THRESHOLD`.

How the method and the threshold were chosen, on figshare training folds only
(``benchmarks/duplicates.py``, docs/results.md "Duplicates"): copies made as archives receive them
(re-encoded as 8-bit JPEG, resized, cropped a little, mirrored) against every other training slice
in both orientations, the same patient's neighbouring slices included. The threshold is the lowest
that takes at most 0.1 % of training slices for a duplicate of another slice. Without stage 3,
copies cropped by 3 % on each side were found only 37-42 % of the time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

#: coarse fingerprint side in pixels (SIDE * SIDE values)
SIDE = 16
#: fine detail side in pixels
FINE = 32
#: the coarse similarity from which a stored case is a candidate
GATE = 0.91
#: the registered fine similarity from which a candidate is a duplicate (chosen on figshare training folds)
THRESHOLD = 0.992
#: the aligned fine similarity from which a candidate is registered (stage 3)
REFINE_FROM = 0.95
#: at most this many function evaluations per registration (after a 27-point grid)
REFINE_EVALS = 120
#: a registration below this after its first evaluations gives up (on figshare training copies,
#: cropped or all at once, the lowest score after 60 was 0.993; neighbouring slices stay below 0.975)
REFINE_CHECK_EVALS, REFINE_CHECK_FROM = 60, 0.98
#: the least share of the window that must lie inside the new image to be compared (stage 3)
MIN_INSIDE = 0.3
#: what counts as the head: pixels above this share of the (1st - 99th percentile) range
HEAD_LEVEL = 0.1
#: the window: the head's centroid +- this many standard deviations of its pixels' positions
SPREAD = 2.5
#: how the new image's window is varied for the fine comparison (scale of the window; shift, share of it)
SCALES = (0.95, 1.0, 1.05)
SHIFTS = (-0.02, 0.0, 0.02)
CANDIDATES = 8
#: from this many cases the coarse prints are searched through an inverted file, not exhaustively:
#: at a million, 110 -> 8 ms a query (one core), planted copies found 300 of 300 either way, at coarse
#: similarities down to the gate (benchmarks/duplicate_gate_scale.py)
IVF_FROM, IVF_LISTS, IVF_PROBE = 50_000, 1024, 32
#: k-means rounds of the inverted file's training (FAISS's default is 25; with 32 lists probed the
#: lists need not be exact, and training is the slow part of loading a view)
IVF_TRAIN_ROUNDS = 10
#: the variants' windows (offset x, offset y, scale x, scale y), in units of the head's window
VARIANTS = [(2 * dx, 2 * dy, sx, sy) for sx in SCALES for sy in SCALES for dx in SHIFTS for dy in SHIFTS]


@functools.lru_cache(maxsize=256)
def _box_weights(size: int, start: float, end: float, out: int) -> np.ndarray:
    """(out, size): PIL's BOX resampling of ``size`` pixels from ``start`` to ``end`` onto ``out``
    as a matrix (Pillow's ``precompute_coeffs``: the box's ends as float32, each output pixel the
    mean of the input pixels whose centres its box covers)."""
    start, end = np.float32(start), np.float32(end)
    scale = float(np.float32(end - start)) / out
    support = 0.5 * max(scale, 1.0)
    weights = np.zeros((out, size))
    for i in range(out):
        centre = float(start) + (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), size)
        t = (np.arange(lo, hi) - centre + 0.5) / max(scale, 1.0)
        w = ((t > -0.5) & (t <= 0.5)).astype(np.float64)
        weights[i, lo:hi] = w / w.sum() if w.sum() else w
    weights.flags.writeable = False
    return weights


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
    x = np.asarray(small, dtype=np.float32).reshape(len(small), -1)
    n, m = x.shape
    # scipy's rankdata(x, axis=1), at nearly twice its speed (a query ranks 2 x 81 windows): rows
    # sorted unstably, each position its rank, then the runs of equal values (the background's, a
    # fifth of a window) given their mean rank
    order = np.argsort(x, axis=1)
    ordered = np.take_along_axis(x, order, 1)
    same = ordered[:, 1:] == ordered[:, :-1]  # (n, m - 1): equal to the value before it
    rank = np.broadcast_to(np.arange(1, m + 1, dtype=np.float32), (n, m)).copy()
    tied = np.zeros((n, m), bool)
    tied[:, 1:] = same
    tied[:, :-1] |= same
    rows, cols = np.nonzero(tied)  # row by row, each run's positions one after another
    if len(rows):
        run = np.cumsum(~((cols > 0) & same[rows, np.maximum(cols - 1, 0)])) - 1
        rank[rows, cols] = (np.bincount(run, cols + 1.0) / np.bincount(run))[run]
    r = np.empty((n, m), np.float32)
    np.put_along_axis(r, order, rank, 1)
    r -= r.mean(1, keepdims=True)
    return r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-6)


class _SubsetRanks:
    """The ranks, ties sharing their mean rank, of any subset of one fixed array, without sorting
    it again (stage 3 ranks the stored print over a different subset at every step)."""

    def __init__(self, values: np.ndarray):
        self.order = np.argsort(values, kind="stable")
        ordered = values[self.order]
        self.group = np.cumsum(np.concatenate([[True], ordered[1:] != ordered[:-1]])) - 1

    def of(self, keep: np.ndarray) -> np.ndarray:
        kept = keep[self.order].astype(np.float64)
        position = np.cumsum(kept)  # 1-based rank among the kept, in sorted order
        n = self.group[-1] + 1
        mean = np.bincount(self.group, position * kept, n) / np.maximum(np.bincount(self.group, kept, n), 1)
        ranks = np.empty(len(keep))
        ranks[self.order] = mean[self.group]
        return ranks[keep]


def _rank(values: np.ndarray) -> np.ndarray:
    """Ranks of a 1-D array, ties sharing their mean rank (as scipy's rankdata)."""
    return _SubsetRanks(values).of(np.ones(len(values), bool))


def _spread(counts: np.ndarray) -> tuple[float, float]:
    """(centre + 0.5, SPREAD x standard deviation) of the positions 0, 1, ... weighted by ``counts``
    (the head's pixels in each row or column)."""
    at = np.arange(len(counts), dtype=np.float64)
    n = float(counts.sum())
    mean = float(counts @ at) / n
    return mean + 0.5, SPREAD * float(np.sqrt(counts @ (at - mean) ** 2 / n))


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
            (cy, ry), (cx, rx) = (_spread(inside.sum(axis)) for axis in (1, 0))
        e = max(SCALES) + 2 * max(abs(v) for v in SHIFTS)  # the widest window of the variants
        pad = int(np.ceil(max(e * ry - cy, cy + e * ry - h, e * rx - cx, cx + e * rx - w, 0))) + 1
        padded = Image.fromarray(np.pad(arr, pad, constant_values=float(lo)))
        cx, cy = cx + pad, cy + pad
        # the mirror image's window is the mirror of this one
        self._views = [(padded, cx), (padded.transpose(Image.Transpose.FLIP_LEFT_RIGHT), padded.width - cx)]
        self._cy, self._rx, self._ry = cy, rx, ry
        self._image, self._window, self._level = arr, (cx - pad, cy - pad, rx, ry), float(lo)

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
        """The fine windows ``boxes`` (x0, y0, x1, y1, in units of the head's window) of the patch,
        each BOX-resampled to FINE x FINE and ranked: one product per axis for all of them (a query
        takes 2 x 81), equal to PIL's ``resize(..., BOX, box=...)`` of each to float32 rounding."""
        patch = np.asarray(self._fine_patches[view], dtype=np.float64)
        e = max(SCALES) + 2 * max(abs(v) for v in SHIFTS)
        c, r = patch.shape[1] / 2, patch.shape[1] / (2 * e)
        xs = sorted({(x0, x1) for x0, _, x1, _ in boxes})
        ys = sorted({(y0, y1) for _, y0, _, y1 in boxes})
        across = np.vstack([_box_weights(patch.shape[1], c + a * r, c + b * r, FINE) for a, b in xs])
        down = np.vstack([_box_weights(patch.shape[0], c + a * r, c + b * r, FINE) for a, b in ys])
        # PIL's two passes, each rounded to float32: across (rows), then down (columns)
        rows = (patch @ across.T).astype(np.float32).astype(np.float64)
        grid = (down @ rows).astype(np.float32).reshape(len(ys), FINE, len(xs), FINE)
        xi, yi = {v: i for i, v in enumerate(xs)}, {v: i for i, v in enumerate(ys)}
        return _ranks(np.stack([grid[yi[(y0, y1)], :, xi[(x0, x1)]] for x0, y0, x1, y1 in boxes]))

    def _integral(self, view: int) -> np.ndarray:
        """The summed-area table ((h + 1, w + 1), float64) of the image (``view`` 1: its mirror
        image), made once, for the orientation stage 3 registers only: any box's mean at full
        resolution in a few lookups."""
        tables = self.__dict__.setdefault("_integrals", {})
        if view not in tables:
            arr = self._image[:, ::-1] if view else self._image
            tables[view] = np.zeros((arr.shape[0] + 1, arr.shape[1] + 1))
            tables[view][1:, 1:] = arr.cumsum(0, dtype=np.float64).cumsum(1)
        return tables[view]

    def _box_means(self, view: int, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The mean of each cell of the grid with edges ``xs`` x ``ys`` (pixels; the sum table read
        bilinearly, which is exact for pixels constant over their square), and whether the cell lies
        inside the image."""
        sat = self._integral(view)
        h, w = self._image.shape
        x, y = np.clip(xs, 0, w), np.clip(ys, 0, h)
        x0, y0 = np.minimum(x.astype(int), w - 1), np.minimum(y.astype(int), h - 1)
        fx, fy = (x - x0)[None, :], (y - y0)[:, None]
        top, bottom = sat[y0[:, None], x0[None, :]], sat[y0[:, None] + 1, x0[None, :]]
        top_r, bottom_r = sat[y0[:, None], x0[None, :] + 1], sat[y0[:, None] + 1, x0[None, :] + 1]
        s = (top + (top_r - top) * fx) * (1 - fy) + (bottom + (bottom_r - bottom) * fx) * fy
        sums = s[1:, 1:] - s[:-1, 1:] - s[1:, :-1] + s[:-1, :-1]
        area = np.maximum(np.outer(np.diff(y), np.diff(x)), 1e-9)
        inside = np.outer((ys[:-1] >= -1e-6) & (ys[1:] <= h + 1e-6), (xs[:-1] >= -1e-6) & (xs[1:] <= w + 1e-6))
        return (sums / area).ravel(), inside.ravel()

    def registered(self, stored: np.ndarray, view: int, start: tuple = (0.0, 0.0, 1.0, 1.0)) -> float:
        """Stage 3: the best rank correlation of a stored fine print with this image's window
        (``view`` 1: the mirror image's) moved by (ox, oy) and scaled by (sx, sy), in units of the
        window, from ``start``; only the pixels inside this image count. A coarse grid around
        ``start`` first, then Nelder-Mead from its best point (given up early when it stays low)."""
        from scipy.optimize import minimize

        cx, cy, rx, ry = self._window
        cx = self._image.shape[1] - cx if view else cx
        stored_ranks = _SubsetRanks(np.asarray(stored, dtype=np.float32).ravel())
        edges = np.linspace(-1.0, 1.0, FINE + 1)

        def loss(x) -> float:
            ox, oy, sx, sy = x
            if min(sx, sy) < 0.5:
                return 1.0
            means, keep = self._box_means(view, cx + (ox + sx * edges) * rx, cy + (oy + sy * edges) * ry)
            if keep.mean() < MIN_INSIDE:
                return 1.0
            a, b = _rank(means[keep]), stored_ranks.of(keep)
            a, b = a - a.mean(), b - b.mean()
            return -float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-9))

        grid = [
            np.add(start, (ox, oy, ds, ds))
            for ds in (-0.08, 0.0, 0.08)
            for ox in (-0.1, 0, 0.1)
            for oy in (-0.1, 0, 0.1)
        ]
        x = min(grid, key=loss)
        for step, evals in ((0.03, REFINE_CHECK_EVALS), (0.01, REFINE_EVALS - REFINE_CHECK_EVALS)):
            simplex = np.vstack([x, x + np.diag([step] * 4)])
            options = {"initial_simplex": simplex, "xatol": 0.002, "fatol": 1e-5, "maxfev": evals}
            found = minimize(loss, x, method="Nelder-Mead", options=options)
            x, score = found.x, -float(found.fun)
            if score < REFINE_CHECK_FROM:  # no copy scores this low after the first steps: give up
                break
        return score

    @property
    def stored(self) -> np.ndarray:
        """What an archive stores of the image: its coarse fingerprint then its fine print (float16)."""
        return np.concatenate([self.coarse[0], self.fine]).astype(np.float16)

    @cached_property
    def fine(self) -> np.ndarray:
        return self._fine_windows(0, [(-1, -1, 1, 1)])[0]

    @cached_property
    def variants(self) -> np.ndarray:
        boxes = [(ox - sx, oy - sy, ox + sx, oy + sy) for ox, oy, sx, sy in VARIANTS]
        return np.stack([self._fine_windows(v, boxes) for v in (0, 1)])


def fingerprint(image: np.ndarray) -> np.ndarray:
    """(2, SIDE * SIDE) float32: the coarse fingerprint of the slice and of its mirror image."""
    return ImagePrints(image).coarse


def aligned_similarity(variants: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """(2, c): the correlation of each orientation's best window (:attr:`ImagePrints.variants`) with
    each stored fine print ((c, FINE * FINE))."""
    return (variants @ np.asarray(stored, dtype=np.float32).T).max(1)


def match(prints: ImagePrints, stored: np.ndarray, refine_below: float = 1.0) -> list[tuple[bool, float]]:
    """Stages 2 and 3 against stored fine prints ((c, FINE * FINE)): for each, whether the image
    matches it as its mirror, and the similarity (registered when the aligned one is at least
    :data:`REFINE_FROM` and below ``refine_below``)."""
    stored = np.asarray(stored, dtype=np.float32)
    sims = prints.variants @ stored.T  # (2, V, c)
    best = sims.max(1)
    out = []
    for j in range(len(stored)):
        view = int(best[1, j] > best[0, j])
        s = float(best[view, j])
        if REFINE_FROM <= s < refine_below:
            s = max(s, prints.registered(stored[j], view, VARIANTS[int(sims[view, :, j].argmax())]))
        out.append((bool(view), s))
    return out


@dataclass
class Duplicate:
    """A stored case that an image duplicates, and whether the image is its mirror."""

    case_id: int
    mirrored: bool
    similarity: float


class _Part:
    """Coarse prints searched together: exhaustively (float16 codes: half the memory of float32, and
    the gate, 0.91, is far coarser than their rounding), or, for :data:`IVF_FROM` cases or more,
    through an inverted file of :data:`IVF_LISTS` lists (:data:`IVF_PROBE` probed) of 8-bit codes
    (256 bytes a case, 256 MB at a million; a print's values lie in a narrow range, so a code's
    rounding moves a similarity by about 0.001), trained on the first prints it is given."""

    def __init__(self, inverted: bool = False):
        import faiss

        if inverted:
            self.index = faiss.index_factory(SIDE * SIDE, f"IVF{IVF_LISTS},SQ8", faiss.METRIC_INNER_PRODUCT)
            self.index.nprobe = IVF_PROBE
            faiss.extract_index_ivf(self.index).cp.niter = IVF_TRAIN_ROUNDS
        else:
            self.index = faiss.IndexScalarQuantizer(
                SIDE * SIDE, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
            )
        self.ids = np.zeros(0, np.int64)  # not a Python int per case: 36 MB at a million

    def add(self, case_ids: list[int], prints: np.ndarray) -> None:
        if not self.index.is_trained:
            self.index.train(prints)
        self.index.add(prints)
        self.ids = np.concatenate([self.ids, np.asarray(case_ids, dtype=np.int64)])

    def copy(self) -> _Part:
        import copy

        import faiss

        out = copy.copy(self)
        out.index, out.ids = faiss.clone_index(self.index), self.ids.copy()
        return out

    def candidates(self, coarse: np.ndarray) -> set[int]:
        sims, rows = self.index.search(coarse, min(CANDIDATES, len(self.ids)))
        return {int(self.ids[r]) for s, r in zip(sims.ravel(), rows.ravel()) if r >= 0 and s >= GATE}


class DuplicateIndex:
    """Stored cases' coarse fingerprints (in memory, searched with FAISS) and a way to their fine prints
    (``details``: case ids -> (n, FINE * FINE), e.g. read from the archive's database). ``expected``:
    how many cases it will hold (from :data:`IVF_FROM`, an inverted file). Cases added to a copy
    (:meth:`with_added`, while others search this one) go to a small exhaustive part of their own,
    so the large one is never copied."""

    @classmethod
    def of_archive(cls, archive) -> DuplicateIndex:
        """The prints an archive stores (coarse ones in memory, read a chunk at a time; fine ones
        read when needed)."""
        out = cls(lambda case_ids: archive.stored_prints(case_ids)[:, SIDE * SIDE :], expected=archive.n_prints())
        for ids, coarse in archive.fingerprints(SIDE * SIDE):
            out.add(ids, coarse)
        return out

    @classmethod
    def of_images(cls, images: Iterable[np.ndarray], case_ids=None) -> DuplicateIndex:
        """An index of ``images`` (ids 0, 1, ... unless ``case_ids``), their prints held in memory."""
        prints = [ImagePrints(im) for im in images]
        case_ids = range(len(prints)) if case_ids is None else case_ids
        if not prints:
            return cls(lambda ids: np.zeros((0, FINE * FINE), np.float32))
        return cls().add(case_ids, np.stack([p.coarse[0] for p in prints]), np.stack([p.fine for p in prints]))

    def __init__(
        self, details: Callable[[list[int]], np.ndarray] | None = None, threshold: float = THRESHOLD, expected: int = 0
    ):
        self.threshold = threshold
        self.parts = [_Part(inverted=expected >= IVF_FROM)]
        self._details: dict[int, np.ndarray] = {}
        self._read_details = details

    def __len__(self) -> int:
        return sum(len(p.ids) for p in self.parts)

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
            self.parts[-1].add(case_ids, prints)
        return self

    def with_added(self, case_ids, prints: np.ndarray) -> DuplicateIndex:
        """A new index: this one's cases and ``case_ids`` with their coarse ``prints`` (fine ones
        read as this index reads them); this one is not changed (others search it meanwhile). The
        first part is shared; only the small part of added cases is copied."""
        import copy

        out = copy.copy(self)
        added = self.parts[1].copy() if len(self.parts) > 1 else _Part()
        out.parts, out._details = [self.parts[0], added], dict(self._details)
        return out.add(case_ids, prints)

    def _fine(self, case_ids: list[int]) -> np.ndarray:
        """The fine prints of ``case_ids``: those added with theirs from memory, the others read."""
        unread = [c for c in case_ids if c not in self._details]
        read = dict(zip(unread, np.asarray(self._read_details(unread), dtype=np.float32))) if unread else {}
        return np.stack([self._details[c] if c in self._details else read[c] for c in case_ids])

    def find(self, image: np.ndarray | ImagePrints) -> list[Duplicate]:
        """The stored cases that ``image`` (or its :class:`ImagePrints`) duplicates, most similar
        first (an empty list for an image not yet stored)."""
        if not len(self):
            return []
        prints = image if isinstance(image, ImagePrints) else ImagePrints(image)
        candidates = sorted(set().union(*(p.candidates(prints.coarse) for p in self.parts if len(p.ids))))
        if not candidates:
            return []
        matches = match(prints, self._fine(candidates), refine_below=self.threshold)
        out = [Duplicate(c, m, round(s, 4)) for c, (m, s) in zip(candidates, matches) if s >= self.threshold]
        return sorted(out, key=lambda d: -d.similarity)
