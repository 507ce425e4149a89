"""Case vector stores behind one small interface: add in batches, search top-K, delete,
count, persist. Two backends with the same results on exact search:

* :class:`FaissStore` (embedded default): exact L2 (``kind="flat"``) or approximate HNSW
  (``kind="hnsw"``) for large archives; saved atomically beside a manifest.
* :class:`MilvusStore`: ``pymilvus`` against Milvus Lite (a local ``.db`` file, in process) or
  a Milvus standalone / cluster (``uri="http://host:19530"``, ``token=...``); its collection's
  lifecycle (create, refuse a mismatch, drop for a rebuild) lives here too.

:func:`deep_search` searches deep enough for NIR / I-NIR (doubling the depth until every
class has its n-th incorrect retrieval, up to a documented cap).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from .classify import compact, first_per_group
from .index import IndexMismatchError, _as_f32, faiss_search, read_index, selector, write_index

#: Deepest search NIR makes; beyond it a class's I_c is taken as at least the cap.
NIR_MAX_DEPTH = 4096
MILVUS_TOKEN_ENV = "NEUROCBIR_MILVUS_TOKEN"


class StoreUnavailable(RuntimeError):
    """The vector store's server cannot be reached or refuses us."""


class Searchable(Protocol):
    """Enough of a store for :func:`deep_search` (also :class:`neurocbir.index.VectorIndex`)."""

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...
    def count(self) -> int: ...


class CaseStore(Searchable, Protocol):
    dim: int

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...
    def delete(self, ids: np.ndarray) -> None: ...
    def contains(self, ids: np.ndarray) -> np.ndarray: ...
    def save(self) -> None: ...


class FaissStore:
    """FAISS with external int64 ids. ``kind``: "flat" (exact) or "hnsw" (approximate)."""

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
        self.index = self._empty()

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
        index, m = read_index(path, checkpoint_sha256, dim)
        store = cls(path, m["dim"], m["kind"], m["checkpoint_sha256"])
        store.index = index
        if m["kind"] == "hnsw":
            faiss.downcast_index(store.index.index).hnsw.efSearch = store.ef_search
        return store

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(_as_f32(vectors, self.dim), np.asarray(ids, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``allowed``: search only these case ids (an ID selector inside FAISS; -1 pads)."""
        k = min(int(k), self.count())
        if k < 1:
            raise ValueError("the store is empty")
        hnsw = {}
        if self.kind == "hnsw":  # a filter hides most of the graph: widen the beam as it narrows
            share = 1.0 if allowed is None else max(len(allowed), 1) / max(self.count(), 1)
            hnsw = {"params_type": faiss.SearchParametersHNSW, "efSearch": int(min(4096, self.ef_search / share))}
        q = _as_f32(queries, self.dim)
        with selector(allowed, **hnsw) as params:
            d2, ids = faiss_search(self.index, q, k, params)
        if hnsw and allowed is not None and ((ids >= 0).sum(1) < min(k, len(allowed))).any():
            d2, ids = self._exact_within(q, k, allowed)  # the graph walk found too few allowed cases
        return np.sqrt(np.maximum(d2, 0)), ids

    def _exact_within(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact search of the HNSW's own flat storage, restricted to ``allowed`` (a filter far
        from the query, e.g. another tumor type, leaves HNSW's beam with too few candidates)."""
        id_map = faiss.vector_to_array(self.index.id_map)
        storage = faiss.downcast_index(faiss.downcast_index(self.index.index).storage)
        wanted = np.zeros(max(int(id_map.max()), int(np.max(allowed))) + 1, bool)  # a lookup, not np.isin:
        wanted[np.asarray(allowed, dtype=np.int64)] = True  # ~5x faster at 1M cases
        with selector(np.flatnonzero(wanted[id_map])) as params:
            d2, internal = faiss_search(storage, q, k, params)
        return d2, np.where(internal >= 0, id_map[np.maximum(internal, 0)], -1)

    def delete(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if self.kind == "flat":
            self.index.remove_ids(ids)
            return
        # HNSW cannot remove in place: rebuild from the remaining vectors.
        keep = np.setdiff1d(faiss.vector_to_array(self.index.id_map), ids)
        vecs = (
            np.stack([self.index.reconstruct(int(i)) for i in keep])
            if len(keep)
            else np.zeros((0, self.dim), np.float32)
        )
        self.index = self._empty()
        if len(keep):
            self.add(keep, vecs)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return np.isin(np.asarray(ids, dtype=np.int64), faiss.vector_to_array(self.index.id_map))

    def count(self) -> int:
        return int(self.index.ntotal)

    def save(self) -> None:
        write_index(
            self.index, self.path, {"checkpoint_sha256": self.checkpoint_sha256, "dim": self.dim, "kind": self.kind}
        )


class MilvusStore:
    """Milvus (Lite file, standalone or cluster), L2. A server builds the ``index_type`` asked
    for (FLAT, exact, by default); Milvus Lite builds its own AUTOINDEX whatever is asked."""

    def __init__(
        self,
        uri: str,
        collection: str,
        dim: int,
        checkpoint_sha256: str = "",
        token: str = "",
        index_type: str = "FLAT",
        index_params: dict | None = None,
        search_params: dict | None = None,
    ):
        from pymilvus import MilvusClient

        self.dim, self.collection, self.checkpoint_sha256 = dim, collection, checkpoint_sha256
        self.search_params = search_params or {}
        self.client = MilvusClient(uri, token=token) if token else MilvusClient(uri)
        manifest = json.dumps({"checkpoint_sha256": checkpoint_sha256, "dim": dim})
        if self.client.has_collection(collection):
            desc = self.client.describe_collection(collection)
            got = next(f["params"].get("dim") for f in desc["fields"] if f["name"] == "vector")
            stored = json.loads(desc.get("description") or "{}")
            if int(got) != dim:
                raise IndexMismatchError(
                    f"Milvus collection {collection} holds {got}-d vectors, the encoder gives {dim}-d"
                )
            if checkpoint_sha256 and stored.get("checkpoint_sha256") not in (None, checkpoint_sha256):
                raise IndexMismatchError(f"Milvus collection {collection} was built with another encoder checkpoint")
        else:
            params = self.client.prepare_index_params()
            params.add_index(field_name="vector", index_type=index_type, metric_type="L2", params=index_params or {})
            self.client.create_collection(
                collection,
                dimension=dim,
                metric_type="L2",
                auto_id=False,
                id_type="int",
                index_params=params,
                description=manifest,
            )

    @classmethod
    def connect(
        cls,
        uri: str,
        collection: str,
        dim: int,
        checkpoint_sha256: str = "",
        index_type: str = "FLAT",
        fresh: bool = False,
    ) -> MilvusStore:
        """Open (``fresh``: drop and re-create) a collection, the token from ``$NEUROCBIR_MILVUS_TOKEN``;
        an unreachable server or a refused token is a :class:`StoreUnavailable` with one line."""
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        token = os.environ.get(MILVUS_TOKEN_ENV, "")
        try:
            if fresh:
                client = MilvusClient(uri, token=token) if token else MilvusClient(uri)
                if client.has_collection(collection):
                    client.drop_collection(collection)
                client.close()
            return cls(uri, collection, dim, checkpoint_sha256, token=token, index_type=index_type)
        except MilvusException as exc:
            raise StoreUnavailable(
                f"Milvus at {uri}: {getattr(exc, 'message', exc)} (is the server up, and ${MILVUS_TOKEN_ENV} right?)"
            ) from None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        v = _as_f32(vectors, self.dim)
        self.client.upsert(self.collection, [{"id": int(i), "vector": row.tolist()} for i, row in zip(ids, v)])

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``allowed``: search only these case ids (a Milvus filter expression)."""
        k = min(int(k), self.count(), 16384)  # Milvus caps top-k at 16384
        if k < 1:
            raise ValueError("the store is empty")
        extra = {} if allowed is None else {"filter": f"id in [{','.join(str(int(i)) for i in allowed)}]"}
        res = self.client.search(
            self.collection,
            data=_as_f32(queries, self.dim).tolist(),
            limit=k,
            search_params={"params": self.search_params},
            **extra,
        )
        dist = np.full((len(res), k), np.inf)
        ids = np.full((len(res), k), -1, dtype=np.int64)
        for q, hits in enumerate(res):
            for j, h in enumerate(hits):
                dist[q, j] = np.sqrt(max(float(h["distance"]), 0.0))  # Milvus L2 is squared
                ids[q, j] = int(h["id"])
        return dist, ids

    def delete(self, ids: np.ndarray) -> None:
        self.client.delete(self.collection, ids=[int(i) for i in ids])

    def contains(self, ids: np.ndarray) -> np.ndarray:
        ids = [int(i) for i in ids]
        found = (
            {int(r["id"]) for r in self.client.query(self.collection, ids=ids, output_fields=["id"])} if ids else set()
        )
        return np.array([i in found for i in ids], dtype=bool)

    def count(self) -> int:
        return int(self.client.query(self.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def save(self) -> None:
        self.client.flush(self.collection)

    def close(self) -> None:
        self.client.close()


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
    has its ``nth`` incorrect retrieval or ``cap`` retrievals were read. ``group_of`` (ids ->
    patient keys) keeps only the closest slice of each patient."""
    total = store.count()
    k = min(start, total, cap)
    while True:
        dist, ids = store.search(queries, k)
        known = label_of(ids) >= 0  # a reader may meet vectors of cases not yet committed as indexed
        if group_of is not None:
            known &= first_per_group(np.where(known, ids, -1), group_of(ids))
        dist, ids = compact(dist, ids, known)
        labels = label_of(ids)
        done = all((((labels >= 0) & (labels != c)).sum(1) >= nth).all() for c in range(n_classes))
        if done or k >= min(total, cap):
            return dist, ids, labels
        k = min(k * 2, total, cap)


def lookup(keys: np.ndarray, values: np.ndarray, missing=-1) -> Callable[[np.ndarray], np.ndarray]:
    """ids -> values by sorted search (``missing`` for ids not in ``keys``, e.g. -1 padding)."""
    order = np.argsort(keys)
    keys, values = np.asarray(keys)[order], np.asarray(values)[order]

    def get(ids: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(keys, ids), 0, max(len(keys) - 1, 0))
        found = (keys[pos] == ids) if len(keys) else np.zeros(ids.shape, bool)
        return np.where(found, values[pos], missing)

    return get
