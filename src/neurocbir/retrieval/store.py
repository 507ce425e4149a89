"""Case vector stores behind one small interface: add in batches, search top-K, delete,
count, persist. Two backends with the same results on exact search:

* :class:`FaissStore` (embedded default): exact L2 (``kind="flat"``) or approximate HNSW
  (``kind="hnsw"``) for large archives; saved atomically beside a manifest.
* :class:`neurocbir.retrieval.milvus.MilvusStore`: Milvus Lite, standalone or a cluster.

:func:`deep_search` searches deep enough for NIR / I-NIR (doubling the depth until every
class has its n-th incorrect retrieval, up to a documented cap; for NIR on a store partitioned
by label, each label's nearest cases, then, where they all share one label, a range search).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from neurocbir.errors import Unavailable
from neurocbir.retrieval.index import (
    IndexMismatchError,
    _as_f32,
    faiss_search,
    id_selector,
    read_manifest,
    search_params,
    write_manifested,
)
from neurocbir.retrieval.neighbours import compact, first_per_group

#: Deepest search NIR makes; beyond it a class's I_c is taken as at least the cap.
NIR_MAX_DEPTH = 4096
#: The most retrievals one search asks the store for (Milvus's largest top-K): where cases NIR
#: skips (no tumor type) lie among the nearest, the store is read deeper than NIR's depth, up to this
STORE_MAX_K = 16384
#: NIR read to at most this depth searches each label's partitions that deep at once (one round to
#: the store) instead of 64 deep and then a range search of the nearest label's
ONE_ROUND_MAX = 1024


def group_keys(labels: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """The store partition of each case: tumor type and plane ("1:axial"; "1:" plane unknown),
    the two attributes a retrieval filter names exactly."""
    return np.char.add(np.char.add(np.asarray(labels).astype(int).astype(str), ":"), np.asarray(planes).astype(str))


class StoreUnavailable(Unavailable):
    """The vector store's server cannot be reached or refuses us."""


class StaleCollection(IndexMismatchError):
    """A Milvus collection made by an older neurocbir (no group field): rebuild it from the table."""


class Searchable(Protocol):
    """Enough of a store for :func:`deep_search` (also :class:`neurocbir.retrieval.index.VectorIndex`)."""

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...
    def count(self) -> int: ...


class CaseStore(Searchable, Protocol):
    dim: int

    def add(self, ids: np.ndarray, vectors: np.ndarray, groups: np.ndarray | None = None) -> None: ...
    def delete(self, ids: np.ndarray) -> None: ...
    def contains(self, ids: np.ndarray) -> np.ndarray: ...
    def save(self) -> None: ...


class FaissStore:
    """FAISS with external int64 ids. ``kind``: "flat" (exact) or "hnsw" (approximate).

    Partitioned by a group key given at :meth:`add` (an archive's is tumor type and plane):
    a search names the groups it wants, so a filter on them reads only their partitions. Why:
    a filtered walk of one HNSW graph finds nothing when the allowed cases lie far from the
    query (the nearest glioma to a meningioma query), and the exact fallback cost ~45 ms at 1M
    cases; a partition is searched as fast as an unfiltered graph. Saved as one file."""

    def __init__(
        self,
        path: Path | str,
        dim: int,
        kind: str = "flat",
        checkpoint_sha256: str = "",
        hnsw_m: int = 32,
        ef_search: int = 256,
    ):
        if kind not in ("flat", "hnsw"):
            raise ValueError("kind must be 'flat' (exact) or 'hnsw' (approximate)")
        self.path, self.dim, self.kind, self.checkpoint_sha256 = Path(path), dim, kind, checkpoint_sha256
        self.hnsw_m, self.ef_search = hnsw_m, ef_search
        self.parts: dict[str, faiss.Index] = {}

    def _empty(self) -> faiss.Index:
        if self.kind == "flat":
            base = faiss.IndexFlatL2(self.dim)
        else:
            base = faiss.IndexHNSWFlat(self.dim, self.hnsw_m)
            base.hnsw.efConstruction = 200
            base.hnsw.efSearch = self.ef_search
        return faiss.IndexIDMap2(base)

    @classmethod
    def open(cls, path: Path | str, checkpoint_sha256: str | None = None, dim: int | None = None) -> FaissStore:
        """Load a saved store; refuse one built by another encoder or of another dimension."""
        m = read_manifest(path, checkpoint_sha256, dim)
        if "partitions" not in m:
            raise IndexMismatchError(f"{path} is an index of an older format: rebuild it")
        store = cls(path, m["dim"], m["kind"], m["checkpoint_sha256"])
        try:
            with np.load(path, allow_pickle=False) as z:
                store.parts = {key: faiss.deserialize_index(z[f"part{i}"]) for i, key in enumerate(m["partitions"])}
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise IndexMismatchError(f"{path} is unreadable ({type(exc).__name__}): rebuild it") from None
        if store.count() != m["count"]:
            raise IndexMismatchError(f"index {path} holds {store.count()} vectors, its manifest says {m['count']}")
        if m["kind"] == "hnsw":
            for ix in store.parts.values():
                faiss.downcast_index(ix.index).hnsw.efSearch = store.ef_search
        return store

    def add(self, ids: np.ndarray, vectors: np.ndarray, groups: np.ndarray | None = None) -> None:
        """Add vectors under their ids, each into its group's partition (one group if None)."""
        v, ids = _as_f32(vectors, self.dim), np.asarray(ids, dtype=np.int64)
        groups = np.full(len(ids), "") if groups is None else np.asarray(groups).astype(str)
        for key in np.unique(groups):
            m = groups == key
            self.parts.setdefault(str(key), self._empty()).add_with_ids(v[m], ids[m])

    def with_added(self, ids: np.ndarray, vectors: np.ndarray, groups: np.ndarray | None = None) -> FaissStore:
        """A new store: this one's partitions, those that receive vectors copied first, so that
        this store (searched meanwhile by other threads) is never changed under them."""
        import copy

        out = copy.copy(self)
        keys = np.full(len(ids), "") if groups is None else np.asarray(groups).astype(str)
        out.parts = {k: (faiss.clone_index(ix) if k in set(keys.tolist()) else ix) for k, ix in self.parts.items()}
        out.add(ids, vectors, groups)
        return out

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, groups=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``groups``: search only these partitions; ``allowed``: only these case ids (an ID
        selector inside FAISS). Distances are sorted; -1 pads rows with fewer hits."""
        if self.count() < 1:
            raise Unavailable("the store is empty")
        parts = [ix for key, ix in self.parts.items() if ix.ntotal and (groups is None or key in groups)]
        q = _as_f32(queries, self.dim)
        k = min(int(k), max(sum(ix.ntotal for ix in parts), 1))
        with id_selector(allowed) as sel:  # one bitmap for every partition
            found = [self._search_part(ix, q, k, allowed, sel) for ix in parts]
        if not found:
            return np.full((len(q), k), np.inf), np.full((len(q), k), -1, dtype=np.int64)
        if len(found) == 1:
            d2, ids = found[0]
        else:
            d2 = np.concatenate([f[0] for f in found], axis=1)
            ids = np.concatenate([f[1] for f in found], axis=1)
        d2 = np.where(ids >= 0, np.maximum(d2, 0), np.inf)
        order = np.argsort(d2, axis=1, kind="stable")[:, :k]
        return np.sqrt(np.take_along_axis(d2, order, 1)), np.take_along_axis(ids, order, 1)

    def range_search(
        self, query: np.ndarray, radius: float, groups, limit: int | None = None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Every case of the ``groups`` partitions closer than ``radius`` to one query, sorted
        (distances, ids), the ``limit`` nearest at most; None for an HNSW store (exact range search
        needs flat partitions)."""
        if self.kind != "flat":
            return None
        q = _as_f32(np.asarray(query).reshape(1, -1), self.dim)
        found = [ix.range_search(q, float(radius) ** 2)[1:] for key, ix in self.parts.items() if key in groups]
        d2 = np.concatenate([np.zeros(0, np.float32)] + [d for d, _ in found])
        ids = np.concatenate([np.zeros(0, np.int64)] + [i for _, i in found])
        order = _nearest_first(d2, limit)
        return np.sqrt(np.maximum(d2[order], 0)), ids[order]

    def _search_part(self, ix: faiss.Index, q: np.ndarray, k: int, allowed, sel) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, ix.ntotal)
        hnsw = {}
        if self.kind == "hnsw":  # an id filter hides part of the graph: widen the beam as it narrows
            share = 1.0 if allowed is None else min(1.0, max(len(allowed), 1) / self.count())  # ~ in each part
            hnsw = {"params_type": faiss.SearchParametersHNSW, "efSearch": int(min(4096, self.ef_search / share))}
        d2, ids = faiss_search(ix, q, k, search_params(sel, **hnsw))
        if hnsw and allowed is not None and ((ids >= 0).sum(1) < min(k, len(allowed))).any():
            d2, ids = self._exact_within(ix, q, k, allowed)  # the graph walk found too few allowed cases
        return d2, ids

    @staticmethod
    def _exact_within(ix: faiss.Index, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact search of an HNSW partition's own flat storage, restricted to ``allowed``."""
        id_map = faiss.vector_to_array(ix.id_map)
        storage = faiss.downcast_index(faiss.downcast_index(ix.index).storage)
        wanted = np.zeros(max(int(id_map.max()), int(np.max(allowed))) + 1, bool)  # a lookup, not np.isin:
        wanted[np.asarray(allowed, dtype=np.int64)] = True  # ~5x faster at 1M cases
        with id_selector(np.flatnonzero(wanted[id_map])) as inner:
            d2, internal = faiss_search(storage, q, k, search_params(inner))
        return d2, np.where(internal >= 0, id_map[np.maximum(internal, 0)], -1)

    def delete(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        for key, ix in list(self.parts.items()):
            have = faiss.vector_to_array(ix.id_map)
            if not np.isin(ids, have).any():
                continue
            if self.kind == "flat":
                ix.remove_ids(ids)
                continue
            # HNSW cannot remove in place: rebuild the partition from its remaining vectors.
            keep = np.setdiff1d(have, ids)
            vecs = np.stack([ix.reconstruct(int(i)) for i in keep]) if len(keep) else None
            self.parts[key] = self._empty()
            if vecs is not None:
                self.parts[key].add_with_ids(vecs, keep)

    def _id_map(self) -> np.ndarray:
        maps = [faiss.vector_to_array(ix.id_map) for ix in self.parts.values()]
        return np.concatenate(maps) if maps else np.zeros(0, np.int64)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return np.isin(np.asarray(ids, dtype=np.int64), self._id_map())

    def count(self) -> int:
        return int(sum(ix.ntotal for ix in self.parts.values()))

    def save(self) -> None:
        keys = sorted(self.parts)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **{f"part{i}": faiss.serialize_index(self.parts[key]) for i, key in enumerate(keys)})

        manifest = {"checkpoint_sha256": self.checkpoint_sha256, "dim": self.dim, "kind": self.kind}
        write_manifested(self.path, write, {**manifest, "partitions": keys, "count": self.count()})


def deep_search(
    store: Searchable,
    label_of: Callable[[np.ndarray], np.ndarray],
    queries: np.ndarray,
    n_classes: int,
    nth: int = 1,
    group_of: Callable[[np.ndarray], np.ndarray] | None = None,
    start: int = 64,
    cap: int = NIR_MAX_DEPTH,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distances, ids, labels) deep enough for NIR: the search depth doubles until every class
    has its ``nth`` incorrect retrieval or ``cap`` retrievals of cases with a label (``label_of``
    >= 0: cases it gives -1, such as those without a tumor, are no NIR retrieval and are skipped)
    were read; at most ``cap`` of them are returned. ``group_of`` (ids -> patient keys) keeps only
    the closest slice of each patient. For NIR of one query over a store partitioned by label,
    :func:`_by_label` first (the same answer in fewer, smaller searches)."""
    total = store.count()
    k = min(start, total, cap)
    if nth == 1 and len(queries) == 1:
        # read to a shallow depth (a calibration's), each label's ``cap`` nearest in one round
        first = cap if group_of is None and cap <= ONE_ROUND_MAX else k
        if found := _by_label(store, label_of, queries, group_of, min(first, total), cap, n_classes):
            return found
    while True:
        dist, ids = store.search(queries, k)
        dist, ids, labels = _known(dist, ids, label_of, group_of)
        deep = ((labels >= 0).sum(1) >= cap).all()
        if _nir_done(labels, n_classes, nth) or deep or k >= min(total, STORE_MAX_K):
            return dist[:, :cap], ids[:, :cap], labels[:, :cap]
        k = min(k * 2, total, STORE_MAX_K)


def _known(dist, ids, label_of, group_of):
    """Retrievals of cases with a label (a reader may meet vectors of cases not yet committed as
    indexed), the closest slice of each patient where ``group_of``; and their labels."""
    known = label_of(ids) >= 0
    if group_of is not None:
        known &= first_per_group(np.where(known, ids, -1), group_of(ids))
    dist, ids = compact(dist, ids, known)
    return dist, ids, label_of(ids)


def _nir_done(labels: np.ndarray, n_classes: int, nth: int) -> bool:
    return all((((labels >= 0) & (labels != c)).sum(1) >= nth).all() for c in range(n_classes))


def _label_partitions(store) -> dict[int, list[str]]:
    """A store partitioned by label (group keys "label:plane", :func:`group_keys`): each label's
    partitions; empty for any other store."""
    parts = list(getattr(store, "parts", {}))
    if not parts or not hasattr(store, "range_search") or not all(key.split(":", 1)[0].isdigit() for key in parts):
        return {}
    by_label: dict[int, list[str]] = {}
    for key in parts:
        by_label.setdefault(int(key.split(":", 1)[0]), []).append(key)
    return by_label


@functools.cache
def _side_by_side() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="label-search")


def _by_label(store, label_of, query, group_of, k: int, cap: int, n_classes: int):
    """NIR's deep search of one query over a store partitioned by label: the ``k`` nearest of each
    of the ``n_classes`` labels (its partitions; on a server, searched side by side), merged:
    exactly the ``k`` nearest of all. The partitions of other labels are not searched: their cases
    (no tumor type) are no NIR retrieval, ``label_of`` gives them -1, as an archive's does.
    Where the ``k`` all share one label, every case of that label closer than the nearest case of
    another (already in hand: a range search of the label's partitions) instead of doubling the
    depth over every partition. For NIR (the first retrieval of another label) the list is exact up
    to that retrieval, where it ends. None where the store is not so partitioned or the answer needs
    more (then the doubling search)."""
    parts = _label_partitions(store)
    groups = [parts[c] for c in range(n_classes) if c in parts]
    if len(groups) < 2:
        return None
    jobs = [lambda keys=keys: store.search(query, k, groups=keys) for keys in groups]
    remote = getattr(store, "remote", False)  # a server answers side by side; FAISS is searched here
    each = list(_side_by_side().map(lambda job: job(), jobs)) if remote else [job() for job in jobs]
    dist, ids = np.concatenate([d for d, _ in each], 1), np.concatenate([i for _, i in each], 1)
    order = np.argsort(dist[0], kind="stable")[:k]
    first = _known(dist[:, order], ids[:, order], label_of, group_of)
    labels = first[2]
    if _nir_done(labels, n_classes, 1) or (group_of is None and k >= cap):
        return first  # NIR decided, or the ``cap`` nearest in hand
    if labels[0][0] < 0:  # not one known case among them
        return None
    label = int(labels[0][0])  # the first k all of one label: the nearest known case of another
    found = label_of(ids[0])  # -1 for padding and cases not known
    known = (found >= 0) & (found != label)
    if not known.any() or label not in parts:
        return None
    other = np.flatnonzero(known)[np.argmin(dist[0][known])]
    d_other, i_other = dist[0][other], ids[0][other]
    limit = cap if group_of is None else STORE_MAX_K  # one slice per patient thins the list: read deeper
    inside = store.range_search(query[0], d_other, parts[label], limit)
    if inside is None:
        return None
    complete = len(inside[0]) < limit  # every case of the label closer than the other one: it comes next
    dist = np.concatenate([inside[0], [d_other] if complete else []])[None]
    ids = np.concatenate([inside[1], [i_other] if complete else []]).astype(np.int64)[None]
    # as the doubling search would: patients' farther slices dropped, then the ``cap`` nearest at most
    dist, ids, labels = _known(dist, ids, label_of, group_of)
    n = int((ids[0] >= 0).sum())
    if n >= cap:
        return dist[:, :cap], ids[:, :cap], labels[:, :cap]
    if not complete or labels[0][n - 1] == label:
        return None  # the list stops short of the depth and of another label: the doubling search goes on
    return dist, ids, labels


def _nearest_first(d2: np.ndarray, limit: int | None) -> np.ndarray:
    """The positions of the ``limit`` smallest of ``d2`` in order, ties in their order in ``d2``:
    the start of a stable argsort, without sorting all of them (a range search at a million cases
    can hold most of a label: sorting all of them took 17 ms a query)."""
    if limit is None or len(d2) <= limit:
        return np.argsort(d2, kind="stable")[:limit]
    kth = np.partition(d2, limit - 1)[limit - 1]
    keep = np.flatnonzero(d2 <= kth)  # in their order: the stable sort below keeps ties so
    return keep[np.argsort(d2[keep], kind="stable")][:limit]


def lookup(keys: np.ndarray, values: np.ndarray, missing=-1) -> Callable[[np.ndarray], np.ndarray]:
    """ids -> values by sorted search (``missing`` for ids not in ``keys``, e.g. -1 padding)."""
    order = np.argsort(keys)
    keys, values = np.asarray(keys)[order], np.asarray(values)[order]

    def get(ids: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(keys, ids), 0, max(len(keys) - 1, 0))
        found = (keys[pos] == ids) if len(keys) else np.zeros(ids.shape, bool)
        return np.where(found, values[pos], missing)

    return get
