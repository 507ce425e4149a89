"""The Milvus case store: ``pymilvus`` against Milvus Lite (a local ``.db`` file, in process) or
a Milvus standalone / cluster (``uri="http://host:19530"``, ``token=...``), with its
collection's lifecycle (create, refuse a mismatch, drop for a rebuild). The same interface as
:class:`neurocbir.retrieval.store.FaissStore`; only ids, vectors and a group key go to Milvus."""

from __future__ import annotations

import json
import os

import numpy as np

from neurocbir.retrieval.index import IndexMismatchError, _as_f32
from neurocbir.retrieval.store import StaleCollection, StoreUnavailable

MILVUS_TOKEN_ENV = "NEUROCBIR_MILVUS_TOKEN"


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
        manifest = json.dumps({"checkpoint_sha256": checkpoint_sha256, "dim": dim, "groups": True})
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
            if not stored.get("groups"):
                raise StaleCollection(f"Milvus collection {collection} predates the group field: rebuild it")
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

    def add(self, ids: np.ndarray, vectors: np.ndarray, groups: np.ndarray | None = None) -> None:
        """Upsert vectors with their group key (a scalar field ``grp`` the filters read)."""
        v = _as_f32(vectors, self.dim)
        groups = np.full(len(v), "") if groups is None else np.asarray(groups).astype(str)
        self.client.upsert(
            self.collection,
            [{"id": int(i), "vector": row.tolist(), "grp": str(g)} for i, row, g in zip(ids, v, groups)],
        )

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, groups=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``groups``: only cases of these group keys, ``allowed``: only these case ids (both
        Milvus filter expressions, on the scalar field ``grp`` and the primary key)."""
        k = min(int(k), self.count(), 16384)  # Milvus caps top-k at 16384
        if k < 1:
            raise ValueError("the store is empty")
        terms = []
        if groups is not None:
            terms.append(f"grp in {json.dumps(sorted(str(g) for g in groups))}")
        if allowed is not None:
            terms.append(f"id in [{','.join(str(int(i)) for i in allowed)}]")
        extra = {"filter": " and ".join(terms)} if terms else {}
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
