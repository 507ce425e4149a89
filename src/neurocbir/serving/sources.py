"""Case sources: where a query's neighbours, their attributes, reports and images come from.

The service talks to one :class:`CaseSource`; two exist:

* :class:`RunCases`: the training folds indexed by ``neurocbir train`` (the run's own index);
* :class:`ArchiveCases`: a case archive built by ``neurocbir add`` (SQLite + FAISS or Milvus).

A new source (a PACS, say) implements the same few methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np

from neurocbir.classify.presence import TumorPresence
from neurocbir.data.cases import CLASS_NAMES, PLANES, CaseTable, load_cases
from neurocbir.errors import InvalidInput
from neurocbir.reports.text import cached_llm_reports, case_attributes, make_report
from neurocbir.retrieval.duplicates import Duplicate, DuplicateIndex, ImagePrints
from neurocbir.retrieval.index import VectorIndex
from neurocbir.retrieval.neighbours import compact, first_per_group
from neurocbir.retrieval.store import NIR_MAX_DEPTH, Searchable, deep_search, group_keys, lookup


@dataclass(frozen=True)
class CaseFilter:
    """Which archive cases a user wants to see: plane, tumor type, size range (mm²). Applied
    inside the vector store (FAISS ID selectors, Milvus filter expressions) to the retrievals
    shown; the prediction always comes from the whole archive."""

    plane: str | None = None
    tumor_type: str | None = None
    min_area_mm2: float | None = None
    max_area_mm2: float | None = None

    def __post_init__(self):
        if self.plane is not None and self.plane not in PLANES:
            raise InvalidInput(f"plane must be one of {PLANES}, got {self.plane!r}")
        if self.tumor_type is not None and self.tumor_type not in CLASS_NAMES:
            raise InvalidInput(f"tumor_type must be one of {CLASS_NAMES}, got {self.tumor_type!r}")
        lo, hi = self.min_area_mm2, self.max_area_mm2
        if (
            (lo is not None and lo < 0)
            or (hi is not None and hi < 0)
            or (lo is not None and hi is not None and lo > hi)
        ):
            raise InvalidInput("the size range must be 0 <= min_area_mm2 <= max_area_mm2")

    def active(self) -> bool:
        return any(v is not None for v in (self.plane, self.tumor_type, self.min_area_mm2, self.max_area_mm2))

    def mask(self, labels: np.ndarray, planes: np.ndarray, areas: np.ndarray) -> np.ndarray:
        """Which cases pass (cases of unknown size fail a size bound)."""
        keep = self.size_mask(areas)
        if self.plane is not None:
            keep &= planes == self.plane
        if self.tumor_type is not None:
            keep &= labels == CLASS_NAMES.index(self.tumor_type)
        return keep

    def sized(self) -> bool:
        return self.min_area_mm2 is not None or self.max_area_mm2 is not None

    def size_mask(self, areas: np.ndarray) -> np.ndarray:
        keep = np.ones(len(areas), bool)
        with np.errstate(invalid="ignore"):
            if self.min_area_mm2 is not None:
                keep &= areas >= self.min_area_mm2
            if self.max_area_mm2 is not None:
                keep &= areas <= self.max_area_mm2
        return keep

    def groups(self) -> list[str] | None:
        """The store partitions (:func:`neurocbir.retrieval.store.group_keys`) the type and plane allow;
        None when neither is set."""
        if self.plane is None and self.tumor_type is None:
            return None
        types = [CLASS_NAMES.index(self.tumor_type)] if self.tumor_type else list(range(len(CLASS_NAMES)))
        planes = [self.plane] if self.plane else [*PLANES, ""]
        return group_keys(np.repeat(types, len(planes)), np.tile(planes, len(types))).tolist()


#: the deepest over-fetch of a size-filtered search (Milvus's top-k cap)
OVERFETCH_MAX = 16384
#: how many of the scan's own copies (duplicates found in the archive, no evidence) a search read
#: to NIR's depth makes room for
OWN_COPIES_ROOM = 16


class CaseSource(Protocol):
    """What the service needs of an archive of cases (case ids are the source's own)."""

    classes: np.ndarray  # labels present in the archive (0-based class indices)
    far_threshold: float  # nearest trunk distance beyond which a query is "unlike the archive"

    def size(self) -> int: ...
    def neighbours(
        self, query: np.ndarray, one_per_patient: bool, depth: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distances, case ids, labels) of one query, distance-sorted, deep enough for NIR read to
        ``depth`` (None: as deep as the source's cap)."""
        ...

    def filtered(
        self, query: np.ndarray, filters: CaseFilter, k: int, one_per_patient: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """(distances, case ids) of the k nearest cases that pass ``filters``."""
        ...

    def nearest_trunk(self, trunk: np.ndarray) -> float | None: ...
    def tumor_presence(self, trunk: np.ndarray) -> float | None:
        """P(no tumor) of a scan from its descriptor, or None where the source cannot tell (it
        holds no cases without a tumor)."""
        ...

    def nearest(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, case ids) of the k nearest cases of any label, no-tumor ones included."""
        ...

    def describe(self, case_ids: list[int]) -> dict[int, dict]: ...
    def case(self, case_id: int, style: str) -> dict: ...
    def reports(self, case_ids: list[int], style: str) -> list[str | None]: ...
    def image(self, case_id: int) -> np.ndarray: ...
    def mask(self, case_id: int) -> np.ndarray: ...
    def examples(self, per_class: int) -> list[dict]: ...


class SearchedCases:
    """What both sources share: one search of ``store`` deep enough for NIR (ids -> case ids
    by ``_case_ids``), and the distance to the nearest archive case in trunk space."""

    store: Searchable
    label_of: Callable[[np.ndarray], np.ndarray]  # store ids -> labels (-1 for padding)
    group_of: Callable[[np.ndarray], np.ndarray]  # store ids -> patient keys
    store_ids: np.ndarray  # every searchable id, with its label, plane and area: the filters' input
    attr_label: np.ndarray
    attr_plane: np.ndarray
    attr_area: np.ndarray
    trunk_index: VectorIndex | None
    first_depth = 64  # deep_search doubles it only when NIR needs more
    nir_cap = NIR_MAX_DEPTH  # the most retrievals NIR reads (its positions, and so its confidence, stop there)
    partitioned = False  # the store is split by tumor type and plane (group_keys): filters pick partitions
    presence: TumorPresence | None = None  # fitted on the source's tumor and no-tumor cases, if it has both
    duplicate_index: DuplicateIndex | None = None  # the cases' fingerprints, where the source keeps them

    def _case_ids(self, ids: np.ndarray) -> np.ndarray:
        return ids

    def size(self) -> int:
        return self.store.count()

    def neighbours(
        self, query: np.ndarray, one_per_patient: bool, depth: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        group_of = self.group_of if one_per_patient else None
        # NIR read to ``depth`` needs the list that deep, with room for the scan's own copies (dropped
        # after the search); one slice per patient thins the list after the search: read to the cap
        cap = self.nir_cap if depth is None or one_per_patient else min(self.nir_cap, depth + OWN_COPIES_ROOM)
        dist, ids, labels = deep_search(
            self.store, self.label_of, query, len(CLASS_NAMES), 1, group_of, min(self.first_depth, cap), cap
        )
        valid = ids[0] >= 0
        return dist[0][valid], self._case_ids(ids[0][valid]), labels[0][valid]

    def nearest_trunk(self, trunk: np.ndarray) -> float | None:
        return None if self.trunk_index is None else float(self.trunk_index.search(trunk, 1)[0][0, 0])

    def duplicates_of(self, prints: ImagePrints) -> list[Duplicate]:
        """The source's cases that show the scan itself (re-encoded, resized, cropped a little or
        mirrored); none where the source keeps no prints."""
        return [] if self.duplicate_index is None else self.duplicate_index.find(prints)

    def tumor_presence(self, trunk: np.ndarray) -> float | None:
        return None if self.presence is None else float(self.presence.proba_no_tumor(trunk)[0])

    def nearest(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dist, ids = self.store.search(query, min(k, self.size()))
        known = (ids[0] >= 0) & (self.any_label_of(ids[0]) >= 0)  # a reader may meet uncommitted vectors
        return dist[0][known], self._case_ids(ids[0][known])

    def any_label_of(self, ids: np.ndarray) -> np.ndarray:
        return self.label_of(ids)

    def patients(self, case_ids: np.ndarray) -> np.ndarray:
        """The (salted or dataset) patient key of each case id: to group a series' neighbours by
        patient on the server; never sent to a client."""
        return self.group_of(self._store_ids(np.asarray(case_ids)))

    def _store_ids(self, case_ids: np.ndarray) -> np.ndarray:
        return case_ids

    def filtered(
        self, query: np.ndarray, filters: CaseFilter, k: int, one_per_patient: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        depth = max(8 * k, 64) if one_per_patient else k
        if self.partitioned:  # type and plane pick the store's partitions; a size range is checked after
            dist, ids = self._partitioned_search(query, filters, depth)
        else:
            allowed = self.store_ids[filters.mask(self.attr_label, self.attr_plane, self.attr_area)]
            if not len(allowed):
                return np.zeros(0), np.zeros(0, np.int64)
            dist, ids = self.store.search(query, min(depth, len(allowed)), allowed=allowed)
        known = (ids >= 0) & (self.label_of(ids) >= 0)
        if one_per_patient:
            known &= first_per_group(np.where(known, ids, -1), self.group_of(ids))
        dist, ids = compact(dist, ids, known)
        valid = ids[0] >= 0
        return dist[0][valid][:k], self._case_ids(ids[0][valid][:k])

    @cached_property
    def _sorted_areas(self) -> np.ndarray:  # a size range's share of the archive in O(log n)
        return np.sort(self.attr_area[np.isfinite(self.attr_area)])

    @cached_property
    def _area_of(self) -> Callable[[np.ndarray], np.ndarray]:
        return lookup(self.store_ids, self.attr_area, missing=np.nan)

    def _partitioned_search(self, query: np.ndarray, filters: CaseFilter, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """Search the partitions of the filter's type and plane. A size range: over-fetch by
        its share of the archive and keep the cases in range (no 1M-case mask per query), deeper
        for a query near few such cases; only when still too few pass, an id list of the cases in
        range (exact in FAISS; on a Milvus server that list was slow and inexact at 1M cases)."""
        groups = filters.groups()
        if not filters.sized():
            return self.store.search(query, min(depth, self.size()), groups=groups)
        lo = -np.inf if filters.min_area_mm2 is None else filters.min_area_mm2
        hi = np.inf if filters.max_area_mm2 is None else filters.max_area_mm2
        n_in = np.searchsorted(self._sorted_areas, hi, "right") - np.searchsorted(self._sorted_areas, lo, "left")
        if n_in == 0:
            return np.zeros((1, 0)), np.zeros((1, 0), np.int64)
        want = int(np.ceil(3 * depth * len(self.attr_area) / n_in))
        if want <= 1024:  # then deeper (x4, up to Milvus's top-k cap) for a query with too few in range
            while True:
                dist, ids = self.store.search(query, min(want, self.size()), groups=groups)
                keep = (ids >= 0) & filters.size_mask(self._area_of(ids).ravel()).reshape(ids.shape)
                if keep.sum(1).min() >= depth or want >= self.size():
                    return compact(dist, ids, keep)
                if want * 4 > OVERFETCH_MAX:
                    break
                want *= 4
        allowed = self.store_ids[filters.size_mask(self.attr_area)]
        return self.store.search(query, min(depth, len(allowed)), allowed=allowed, groups=groups)

    def _far_threshold(self, patient_keys: np.ndarray) -> float:
        """ "No similar case": farther, in frozen-trunk feature space, than 1.1 x the 99.5th
        percentile of archive cases' distances to their nearest case of another patient.
        Judged inside the archive (training patients only, never a test fold); a sample of
        2000 cases is enough for a percentile."""
        if self.trunk_index is None:
            return float("inf")
        n = len(patient_keys)
        sample = np.random.default_rng(0).choice(n, min(2000, n), replace=False)
        d, rows = self.trunk_index.search(self.trunk_index.index.reconstruct_batch(sample), min(50, n))
        other = patient_keys[rows] != patient_keys[sample][:, None]
        nearest = np.where(other.any(1), d[np.arange(len(d)), np.argmax(other, 1)], np.nan)
        nearest = nearest[np.isfinite(nearest)]
        return float(np.percentile(nearest, 99.5) * 1.1) if len(nearest) else float("inf")


class RunCases(SearchedCases):
    """The training folds of a run's trial, searched through the run's own exact index (in
    one search of the whole index: it is training-fold sized)."""

    def __init__(
        self, trial_dir: Path, checkpoint_sha256: str, dim: int, table: CaseTable | None = None, data: str | None = None
    ):
        self.table = table if table is not None else load_cases(data)
        self.store = VectorIndex.load(trial_dir / "index.faiss", checkpoint_sha256=checkpoint_sha256, dim=dim)
        self.first_depth = self.store.count()
        emb = np.load(trial_dir / "embeddings.npz")
        self.archive_rows = emb["archive_rows"]
        if len(self.archive_rows) != self.store.count():
            raise InvalidInput(f"{trial_dir}: index and embeddings disagree on the archive size")
        self.example_rows = emb["test_rows"]
        labels = self.table.label[self.archive_rows]
        self.classes = np.unique(labels)
        rows = np.arange(len(self.archive_rows))
        self.label_of = lookup(rows, labels)
        self.group_of = lookup(rows, self.table.patient_id[self.archive_rows], missing="")
        self.store_ids, self.attr_label = rows, labels  # what the retrieval filters read
        self.attr_plane, self.attr_area = self.table.plane[self.archive_rows], self.table.area_mm2[self.archive_rows]
        self.trunk_index = VectorIndex.build(emb["archive_trunk"], half=True) if "archive_trunk" in emb else None
        self.far_threshold = self._far_threshold(self.table.patient_id[self.archive_rows])
        self.case_row = {int(i): r for r, i in enumerate(self.table.idx)}
        self.llm_reports = cached_llm_reports()

    def _case_ids(self, rows: np.ndarray) -> np.ndarray:
        return self.table.idx[self.archive_rows[rows]]

    def _store_ids(self, case_ids: np.ndarray) -> np.ndarray:
        position = {int(c): r for r, c in enumerate(self.table.idx[self.archive_rows])}
        return np.array([position.get(int(c), -1) for c in case_ids], dtype=np.int64)

    def _row(self, case_id: int) -> int:
        if case_id not in self.case_row:
            raise KeyError(
                f"no case {case_id} (case ids run from {int(self.table.idx.min())} to {int(self.table.idx.max())})"
            )
        return self.case_row[case_id]

    def describe(self, case_ids: list[int]) -> dict[int, dict]:
        out = {}
        for c in case_ids:
            row = self._row(c)
            out[c] = {
                "case_id": c,
                "label": CLASS_NAMES[int(self.table.label[row])],
                "plane": str(self.table.plane[row]) or None,
                "area_mm2": round(float(self.table.area_mm2[row]), 2),
            }
        return out

    def case(self, case_id: int, style: str = "normal") -> dict:
        out = {**self.describe([case_id])[case_id], "in_archive": bool(np.isin(self._row(case_id), self.archive_rows))}
        out["report"] = self.reports([case_id], style)[0] if out["plane"] else None
        return out

    def reports(self, case_ids: list[int], style: str = "normal") -> list[str]:
        """Normal reports written by an LLM where `neurocbir write-reports` cached them, else by
        the offline paraphraser."""
        llm = self.llm_reports if style == "normal" else {}
        return [llm.get(c) or make_report(case_attributes(self.table, self._row(c)), style, c) for c in case_ids]

    def image(self, case_id: int) -> np.ndarray:
        return self.table.load_image(self._row(case_id))

    def mask(self, case_id: int) -> np.ndarray:
        return self.table.load_mask(self._row(case_id))

    def examples(self, per_class: int = 4) -> list[dict]:
        """Held-out cases of each class (the run never trained on them) to try the app with."""
        rng = np.random.default_rng(0)
        out = []
        for c in range(len(CLASS_NAMES)):
            rows = self.example_rows[self.table.label[self.example_rows] == c]
            for r in rng.choice(rows, min(per_class, len(rows)), replace=False):
                out.append({"case_id": int(self.table.idx[r]), "label": CLASS_NAMES[c]})
        return out
