"""Vector index of archive embeddings (FAISS, exact L2 by default), saved with a manifest
that ties it to the checkpoint that made the embeddings. Without FAISS (a borrowed GPU
machine that trains and evaluates, never serves) the search is exact in NumPy instead."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neurocbir.errors import InvalidInput

try:
    import faiss
except ImportError:  # training and evaluation still work (ExactL2); serving and the case store need FAISS
    faiss = None

from neurocbir.files import atomic_write, write_json


class IndexMismatchError(InvalidInput):
    """The index on disk was built by another encoder or has another dimension."""


def _as_f32(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (n, dim), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"embeddings have dimension {x.shape[1]}, the index has {dim}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    return x


class ExactL2:
    """Exact Euclidean search in NumPy: the part of FAISS's flat index that training and
    evaluation use, for machines without FAISS. Its saved file is a NumPy array, which only
    this class reads back; `neurocbir index RUN` builds the FAISS index a server needs."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.d = x.shape[1]
        self.ntotal = len(x)

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        d2 = (q * q).sum(1)[:, None] - 2 * q @ self.x.T + (self.x * self.x).sum(1)[None]
        if allowed is not None:
            keep = np.zeros(self.ntotal, bool)
            keep[np.asarray(allowed, np.int64)[(allowed >= 0) & (allowed < self.ntotal)]] = True
            d2[:, ~keep] = np.inf
        ids = np.argsort(d2, axis=1, kind="stable")[:, :k]
        d2 = np.take_along_axis(d2, ids, 1).astype(np.float32)
        return d2, np.where(np.isinf(d2), -1, ids)


@dataclass
class VectorIndex:
    """Euclidean nearest-neighbour search over ``n`` vectors of dimension ``dim``."""

    index: faiss.Index | ExactL2
    checkpoint_sha256: str = ""

    @classmethod
    def build(cls, embeddings: np.ndarray, checkpoint_sha256: str = "", half: bool = False) -> VectorIndex:
        """An exhaustive index of ``embeddings``; ``half``: stored as float16 (half the memory, a
        single query faster than over float32, distances within 1e-4 of the float32 ones:
        docs/results.md, "The query's parts at scale")."""
        x = _as_f32(embeddings)
        if faiss is None:
            return cls(ExactL2(x), checkpoint_sha256)
        if half:
            index = faiss.IndexScalarQuantizer(x.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
        else:
            index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        return cls(index, checkpoint_sha256)

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def count(self) -> int:  # the vector-store interface (neurocbir.retrieval.store.CaseStore)
        return len(self)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids), each (n_queries, k), sorted by increasing Euclidean distance;
        ``allowed``: search only these ids (a filter applied inside FAISS; -1 pads the rest)."""
        q = _as_f32(queries, self.dim)
        k = min(int(k), len(self))
        if k < 1:
            raise ValueError("k must be >= 1 and the index must not be empty")
        if isinstance(self.index, ExactL2):
            d2, ids = self.index.search(q, k, allowed)
            return np.sqrt(np.maximum(d2, 0.0)), ids
        with id_selector(allowed) as sel:
            params = search_params(sel)
            d2, ids = faiss_search(self.index, q, k, params)
        return np.sqrt(np.maximum(d2, 0.0)), ids

    def save(self, path: Path | str) -> None:
        if isinstance(self.index, ExactL2):

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as fh:
                    np.save(fh, self.index.x)

            manifest = {"checkpoint_sha256": self.checkpoint_sha256, "dim": self.dim, "kind": "numpy"}
            write_manifested(path, write, {**manifest, "count": len(self)})
            return
        write_index(
            self.index,
            path,
            {"checkpoint_sha256": self.checkpoint_sha256, "dim": self.dim, "kind": type(self.index).__name__},
        )

    @classmethod
    def load(cls, path: Path | str, checkpoint_sha256: str | None = None, dim: int | None = None) -> VectorIndex:
        """Load an index; refuse it if it was built for another checkpoint or dimension."""
        manifest = read_manifest(path, checkpoint_sha256, dim)
        if manifest.get("kind") == "numpy":  # written where FAISS was missing (ExactL2)
            with open(path, "rb") as fh:
                return cls(ExactL2(_as_f32(np.load(fh), manifest["dim"])), manifest["checkpoint_sha256"])
        index, manifest = read_index(path, checkpoint_sha256, dim)
        return cls(index, manifest["checkpoint_sha256"])


def numpy_search_takes_params() -> None:
    """pytorch-metric-learning imports ``faiss.contrib.torch_utils``, which replaces every
    index's ``search`` by a torch wrapper that refuses ``params`` (search parameters, ID
    selectors) even for numpy input; every other FAISS user in the process then fails (Milvus
    Lite's filtered search did). Send numpy calls back to FAISS's own method. Idempotent."""
    for name in dir(faiss) if faiss is not None else ():
        cls = getattr(faiss, name)
        if not (isinstance(cls, type) and "search_numpy" in cls.__dict__) or getattr(cls.search, "_numpy_ok", False):
            continue

        def search(self, x, k, *args, _torch=cls.search, _numpy=cls.search_numpy, **kwargs):
            return (_numpy if isinstance(x, np.ndarray) else _torch)(self, x, k, *args, **kwargs)

        search._numpy_ok = True
        cls.search = search


def faiss_search(index: faiss.Index, q: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
    """index.search with search parameters. faiss.contrib.torch_utils (imported by
    pytorch-metric-learning) replaces ``search`` by a wrapper without ``params``; the numpy
    original stays as ``search_numpy``."""
    if params is None:
        return index.search(q, k)
    return getattr(index, "search_numpy", index.search)(q, k, params=params)


@contextmanager
def id_selector(allowed: np.ndarray | None):
    """A FAISS ID selector that keeps only the ``allowed`` ids (None: no filter), for every
    search in the block (the selector must outlive them, hence a context)."""
    if allowed is None:
        yield None
        return
    allowed = np.ascontiguousarray(allowed, dtype=np.int64)
    bitmap = None
    if len(allowed) and allowed.min() >= 0 and allowed.max() < 1 << 28:  # dense ids: a bitmap, built in ~1 ms at 1M
        bits = np.zeros(int(allowed.max()) + 1, bool)
        bits[allowed] = True
        bitmap = np.packbits(bits, bitorder="little")
        sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
    else:
        sel = faiss.IDSelectorBatch(allowed)
    yield sel
    del sel, bitmap


def search_params(sel, params_type=None, **fields):
    """FAISS search parameters with the selector ``sel`` (None when there is no filter)."""
    if sel is None:
        return None
    params = (params_type or faiss.SearchParameters)(**fields)
    params.sel = sel
    return params


def write_index(index: faiss.Index, path: Path | str, manifest: dict) -> None:
    """Write a FAISS index and its JSON manifest, each atomically (temp file + rename)."""
    write_manifested(path, lambda tmp: faiss.write_index(index, str(tmp)), {**manifest, "count": int(index.ntotal)})


def write_manifested(path: Path | str, write, manifest: dict) -> None:
    """``write(tmp)`` the index file atomically, then its JSON manifest beside it."""
    path = Path(path)
    atomic_write(path, write)
    manifest = {**manifest, "metric": "l2", "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(path.with_name(path.name + ".json"), manifest)


def read_manifest(path: Path | str, checkpoint_sha256: str | None = None, dim: int | None = None) -> dict:
    """The manifest of an index written by :func:`write_manifested`, refusing another
    checkpoint or dimension."""
    path = Path(path)
    mpath = path.with_name(path.name + ".json")
    if not path.is_file() or not mpath.is_file():
        raise FileNotFoundError(f"no index at {path} (expected the index file and its .json manifest)")
    try:
        manifest = json.loads(mpath.read_text())
        manifest["checkpoint_sha256"], manifest["dim"], manifest["count"]  # noqa: B018 - required keys
    except (ValueError, KeyError, TypeError) as exc:
        raise IndexMismatchError(f"the manifest {mpath} is corrupt ({type(exc).__name__}): rebuild the index") from None
    if checkpoint_sha256 is not None and manifest["checkpoint_sha256"] != checkpoint_sha256:
        raise IndexMismatchError(
            f"index {path} was built from checkpoint {manifest['checkpoint_sha256'][:12]}, "
            f"not {checkpoint_sha256[:12]}: rebuild it with the current encoder"
        )
    if dim is not None and manifest["dim"] != dim:
        raise IndexMismatchError(f"index {path} holds {manifest['dim']}-d vectors, the encoder gives {dim}-d")
    return manifest


def read_index(
    path: Path | str, checkpoint_sha256: str | None = None, dim: int | None = None
) -> tuple[faiss.Index, dict]:
    """Read an index written by :func:`write_index`, refusing another checkpoint or dimension."""
    manifest = read_manifest(path, checkpoint_sha256, dim)
    if faiss is None:
        raise ImportError(f"reading the index {path} needs FAISS: pip install faiss-cpu")
    index = faiss.read_index(str(path))
    if index.ntotal != manifest["count"]:
        raise IndexMismatchError(f"index {path} holds {index.ntotal} vectors, its manifest says {manifest['count']}")
    return index, manifest
