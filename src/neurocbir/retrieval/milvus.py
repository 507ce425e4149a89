"""The Milvus case store: ``pymilvus`` against Milvus Lite (a local ``.db`` file, in process) or
a Milvus standalone / cluster (``uri="http://host:19530"``, ``token=...``), with its
collection's lifecycle (create, refuse a mismatch, drop for a rebuild). The same interface as
:class:`neurocbir.retrieval.store.FaissStore`; only ids, vectors and a group key go to Milvus."""

from __future__ import annotations

import json
import logging
import os
import re
import time

import numpy as np

from neurocbir.errors import Unavailable
from neurocbir.retrieval.index import IndexMismatchError, _as_f32
from neurocbir.retrieval.store import StaleCollection, StoreUnavailable

log = logging.getLogger(__name__)
MILVUS_TOKEN_ENV = "NEUROCBIR_MILVUS_TOKEN"
#: how long `add` and `serve` wait for a Milvus server that is not ready yet, unless told (--milvus-wait)
DEFAULT_WAIT_S = 60.0
#: index parameters when none are given, as the FAISS store's (HNSW M 32); IVF lists for ~1M cases
INDEX_DEFAULTS = {"HNSW": {"M": 32, "efConstruction": 200}, "IVF_FLAT": {"nlist": 1024}}
#: the writer's reads see every acknowledged write: the archive's crash-safe protocol counts on it
CONSISTENCY = "Strong"
#: a reader's (the app's, `query`'s): Milvus's default, which sees every write older than the
#: server's graceful time (5 s by default) and usually newer ones. Strong makes each search wait for
#: the next time tick: 201 ms against 4 ms at 1M cases on the standalone server (docs/results.md)
READER_CONSISTENCY = "Bounded"
CALL_TIMEOUT_S = 30.0
#: how long a reader reuses the collection's count and partition list (each an RPC otherwise, per
#: query); Bounded consistency already lets a reader's view lag the writer's by up to 5 s
READER_CACHE_S = 2.0


def partition_name(group: str) -> str:
    """The Milvus partition of a store group key ("1:axial" -> "g_1_axial"): a filter by tumor type
    and plane searches only its partitions' own indexes, as the FAISS store does. A filter
    expression on the HNSW graph instead found 0.2-0.7 of the true top 25 (docs/results.md)."""
    return "g_" + re.sub(r"[^A-Za-z0-9_]", "_", str(group))


def group_of_partition(name: str) -> str | None:
    """The group key a partition holds ("g_1_axial" -> "1:axial", "g_1_" -> "1:"), as far as
    :func:`partition_name` keeps it (it maps back to the same partition); None for another one."""
    found = re.fullmatch(r"g_(_?)(\d+)_(.*)", name)
    return None if found is None else f"{'-' if found[1] else ''}{found[2]}:{found[3]}"


def search_defaults(index_type: str, k: int) -> dict:
    """Search parameters that keep an approximate index near exact (HNSW ef >= k, IVF 64 lists)."""
    if index_type == "HNSW":
        return {"ef": max(256, int(k))}
    if index_type.startswith("IVF"):
        return {"nprobe": 64}
    return {}


class MilvusStore:
    """Milvus (Lite file, standalone or cluster), L2. A server builds the ``index_type`` asked
    for (FLAT, exact, by default); Milvus Lite builds its own AUTOINDEX whatever is asked."""

    #: searches of several label's partitions go to the server side by side (store.deep_search)
    remote = True

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
        consistency: str = CONSISTENCY,
    ):
        from pymilvus import DataType, MilvusClient

        self.dim, self.collection, self.checkpoint_sha256 = dim, collection, checkpoint_sha256
        self.index_type, self.search_params, self.uri = index_type, search_params, uri
        self.consistency = consistency  # of searches and counts; `contains` is always Strong
        self.reread()  # a reader's cached count and partition list: none yet
        self.client = (
            MilvusClient(uri, token=token, timeout=CALL_TIMEOUT_S)
            if token
            else MilvusClient(uri, timeout=CALL_TIMEOUT_S)
        )
        manifest = json.dumps(
            {
                "checkpoint_sha256": checkpoint_sha256,
                "dim": dim,
                "groups": True,
                "index": index_type,
                "partitions": True,
            }
        )
        self.partitioned = True  # one partition per group key; collections made before hold them in a field only
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
            if not stored.get("groups") and not self._rows_have_groups(uri):
                raise StaleCollection(f"Milvus collection {collection} predates the group field: rebuild it")
            self.index_type = stored.get("index", index_type)
            self.partitioned = bool(stored.get("partitions")) or any(p.startswith("g_") for p in self._partitions())
        elif uri.endswith(".db"):  # Milvus Lite: it keeps no schema description, and builds AUTOINDEX anyway
            self.client.create_collection(
                collection,
                dimension=dim,
                metric_type="L2",
                auto_id=False,
                id_type="int",
                description=manifest,
                consistency_level=CONSISTENCY,
            )
        else:  # a server: an explicit schema (its quick set-up builds AUTOINDEX whatever is asked)
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True, description=manifest)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            schema.add_field("grp", DataType.VARCHAR, max_length=64)
            params = self.client.prepare_index_params()
            params.add_index(
                field_name="vector",
                index_type=index_type,
                metric_type="L2",
                params=index_params or INDEX_DEFAULTS.get(index_type, {}),
            )
            self.client.create_collection(collection, schema=schema, index_params=params, consistency_level=CONSISTENCY)

    def _call(self, fn, *args, **kwargs):
        """One client call; a server that is down or restarting becomes a :class:`StoreUnavailable`
        with one line (the service answers 503 with it, and serves again once the server is back)."""
        from pymilvus.exceptions import MilvusException

        try:
            return fn(*args, timeout=CALL_TIMEOUT_S, **kwargs)  # never a request that hangs on a dead server
        except MilvusException as exc:
            if "not loaded" in str(getattr(exc, "message", exc)):  # a restarted server: load it again, once
                try:
                    self.client.load_collection(self.collection, timeout=CALL_TIMEOUT_S)
                    return fn(*args, timeout=CALL_TIMEOUT_S, **kwargs)
                except MilvusException as again:
                    exc = again
            raise StoreUnavailable(
                f"the Milvus server at {self.uri} cannot answer: {getattr(exc, 'message', exc)}"
            ) from None
        except Exception as exc:  # grpc raises its own types while the server is gone
            if "grpc" in type(exc).__module__ or "RpcError" in type(exc).__name__:
                raise StoreUnavailable(
                    f"the Milvus server at {self.uri} cannot be reached ({type(exc).__name__})"
                ) from None
            raise

    def _partitions(self, refresh: bool = True) -> set[str]:
        if refresh or not hasattr(self, "_known"):
            self._known = set(self._call(self.client.list_partitions, self.collection))
        return self._known

    def _ensure_partition(self, name: str) -> None:
        if name in self._partitions(refresh=False) or name in self._partitions():
            return
        try:
            self._call(self.client.create_partition, self.collection, name)
        except StoreUnavailable:
            if name not in self._partitions():  # not another writer's, a moment before
                raise
        self._known.add(name)

    def _rows_have_groups(self, uri: str) -> bool:
        """Milvus Lite returns no collection description (its file is the archive's own): a
        collection there predates the group field when its rows carry none."""
        if not uri.endswith(".db"):
            return False
        rows = self.client.query(self.collection, filter="", output_fields=["grp"], limit=1)
        return not rows or "grp" in rows[0]

    @classmethod
    def connect(
        cls,
        uri: str,
        collection: str,
        dim: int,
        checkpoint_sha256: str = "",
        index_type: str = "FLAT",
        fresh: bool = False,
        wait_s: float | None = None,
        consistency: str = CONSISTENCY,
    ) -> MilvusStore:
        """Open (``fresh``: drop and re-create) a collection, the token from ``$NEUROCBIR_MILVUS_TOKEN``.
        A server that is not ready yet (its port opens before it answers) is waited for, up to
        ``wait_s`` seconds (default :data:`DEFAULT_WAIT_S`), saying so once; then, or for a
        refused token, a :class:`StoreUnavailable` with one line."""
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        token = os.environ.get(MILVUS_TOKEN_ENV, "")
        wait_s = DEFAULT_WAIT_S if wait_s is None else wait_s
        deadline, said = time.monotonic() + wait_s, False
        while True:
            try:
                if fresh:
                    client = MilvusClient(uri, token=token) if token else MilvusClient(uri)
                    if client.has_collection(collection):
                        client.drop_collection(collection)
                    client.close()
                return cls(
                    uri, collection, dim, checkpoint_sha256, token=token, index_type=index_type, consistency=consistency
                )
            except MilvusException as exc:
                message = str(getattr(exc, "message", exc))
                refused = "auth" in message.lower() or "denied" in message.lower() or "credential" in message.lower()
                if refused or uri.endswith(".db") or time.monotonic() >= deadline:
                    waited = "" if refused or uri.endswith(".db") else f" after waiting {wait_s:.0f} s"
                    raise StoreUnavailable(
                        f"Milvus at {uri}: {message}{waited} (is the server up, and ${MILVUS_TOKEN_ENV} right?)"
                    ) from None
                if not said:
                    log.warning("the Milvus server at %s is not ready yet: waiting up to %.0f s", uri, wait_s)
                    said = True
                time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))

    def add(self, ids: np.ndarray, vectors: np.ndarray, groups: np.ndarray | None = None) -> None:
        """Upsert vectors into their group's partition (and its key in the field ``grp``, which older,
        unpartitioned collections filter on)."""
        v = _as_f32(vectors, self.dim)
        groups = np.full(len(v), "") if groups is None else np.asarray(groups).astype(str)
        ids = np.asarray(ids)
        for g in np.unique(groups) if self.partitioned else [None]:
            rows = np.flatnonzero(groups == g) if g is not None else np.arange(len(v))
            where = {}
            if g is not None:
                self._ensure_partition(partition_name(g))
                where = {"partition_name": partition_name(g)}
            self._call(
                self.client.upsert,
                self.collection,
                [{"id": int(ids[r]), "vector": v[r].tolist(), "grp": str(groups[r])} for r in rows],
                **where,
            )

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, groups=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``groups``: only cases of these group keys (their partitions), ``allowed``: only these
        case ids (a filter expression on the primary key)."""
        k = min(int(k), 16384)  # Milvus caps top-k at 16384 (callers cap k at the count)
        if k < 1:
            raise Unavailable("the store is empty")
        terms, where = [], {}
        if groups is not None and self.partitioned:
            wanted = {partition_name(g) for g in groups}
            names = sorted(wanted & self._partitions(refresh=False)) or sorted(wanted & self._partitions())
            if not names:  # no case of these types and planes (yet)
                return np.full((len(queries), k), np.inf), np.full((len(queries), k), -1, dtype=np.int64)
            where["partition_names"] = names
        elif groups is not None:
            terms.append(f"grp in {json.dumps(sorted(str(g) for g in groups))}")
        if allowed is not None:
            terms.append(f"id in [{','.join(str(int(i)) for i in allowed)}]")
        extra = {"filter": " and ".join(terms), **where} if terms else where
        res = self._call(
            self.client.search,
            self.collection,
            data=_as_f32(queries, self.dim).tolist(),
            limit=k,
            search_params={"params": self.search_params or search_defaults(self.index_type, k)},
            consistency_level=self.consistency,
            **extra,
        )
        dist = np.full((len(res), k), np.inf)
        ids = np.full((len(res), k), -1, dtype=np.int64)
        for q, hits in enumerate(res):
            n = len(hits.ids)  # the hits' columns, as received: not a Python object per hit
            dist[q, :n] = np.sqrt(np.maximum(np.asarray(hits.distances, dtype=float), 0.0))  # Milvus L2 is squared
            ids[q, :n] = np.asarray(hits.ids, dtype=np.int64)
        return dist, ids

    def reread(self) -> None:
        """Ask the server for the count and the partitions next time (a reader whose archive
        changed: its cached ones are no longer the archive's)."""
        self._count, self._listed = None, -np.inf

    @property
    def parts(self) -> list[str]:
        """The group keys of the collection's partitions (none for an unpartitioned one): what
        NIR's two-step deep search (:func:`neurocbir.retrieval.store.deep_search`) reads."""
        if not self.partitioned:
            return []
        fresh = time.monotonic() - self._listed >= READER_CACHE_S
        if fresh:
            self._listed = time.monotonic()
        keys = (group_of_partition(name) for name in self._partitions(refresh=fresh))
        return sorted(k for k in keys if k is not None)

    def range_search(
        self, query: np.ndarray, radius: float, groups, limit: int = 16384
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The cases of the ``groups`` partitions closer than ``radius`` to one query, sorted
        (distances, ids), at most ``limit`` (Milvus's range search: exact on a FLAT index, as
        approximate as a search on HNSW); None for an unpartitioned collection."""
        if not self.partitioned:
            return None
        limit = max(1, min(int(limit), 16384))
        names = sorted({partition_name(g) for g in groups} & self._partitions(refresh=False))
        if not names:
            return np.zeros(0), np.zeros(0, np.int64)
        params = {**(self.search_params or search_defaults(self.index_type, limit)), "radius": float(radius) ** 2}
        res = self._call(
            self.client.search,
            self.collection,
            data=_as_f32(np.asarray(query).reshape(1, -1), self.dim).tolist(),
            limit=limit,
            search_params={"params": params},
            consistency_level=self.consistency,
            partition_names=names,
        )
        d2, ids = np.asarray(res[0].distances, dtype=float), np.asarray(res[0].ids, dtype=np.int64)
        order = np.lexsort((ids, d2))  # by distance, then id (ties as a sort of the pairs had them)
        return np.sqrt(np.maximum(d2[order], 0.0)), ids[order]

    def delete(self, ids: np.ndarray) -> None:
        self._call(self.client.delete, self.collection, ids=[int(i) for i in ids])

    def contains(self, ids: np.ndarray) -> np.ndarray:
        ids = [int(i) for i in ids]
        found = (
            {
                int(r["id"])
                for r in self._call(
                    self.client.query, self.collection, ids=ids, output_fields=["id"], consistency_level=CONSISTENCY
                )
            }
            if ids
            else set()
        )
        return np.array([i in found for i in ids], dtype=bool)

    def ids(self) -> np.ndarray:
        """Every id in the collection, as many times as it is stored (Strong: the writer's view)."""
        rows = self._call(
            self.client.query, self.collection, filter="id >= 0", output_fields=["id"], consistency_level=CONSISTENCY
        )
        return np.array(sorted(int(r["id"]) for r in rows), dtype=np.int64)

    def count(self) -> int:
        """Cases in the collection; a reader (not Strong) reuses it for :data:`READER_CACHE_S`."""
        cached = self._count
        if self.consistency != CONSISTENCY and cached is not None and time.monotonic() - cached[0] < READER_CACHE_S:
            return cached[1]
        rows = self._call(
            self.client.query,
            self.collection,
            filter="",
            output_fields=["count(*)"],
            consistency_level=self.consistency,
        )
        self._count = (time.monotonic(), int(rows[0]["count(*)"]))
        return self._count[1]

    def save(self) -> None:
        self._call(self.client.flush, self.collection)

    def close(self) -> None:
        self.client.close()
