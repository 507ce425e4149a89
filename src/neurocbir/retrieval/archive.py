"""The case archive: SQLite holds every case (metadata, report, embedding) and is the source
of truth; the vector store (a FAISS file or a Milvus collection) is derived from it.

Why SQLite: one file, transactions, and a UNIQUE content hash make "add this folder" safe to
kill and rerun. The protocol, each step crash-safe:

1. a batch of new cases goes into the table in one transaction, ``state='pending'``
   (re-adding a file is a no-op: its SHA-256 is already there);
2. the pending vectors go into the store, which is persisted;
3. one transaction marks them ``'indexed'``.

Deletes run the other way (``'deleting'`` -> store -> rows removed). On open,
:meth:`CaseArchive.reconcile` finishes whatever a crash interrupted, and rebuilds the store
from the table when the store cannot be explained by it (lost or stale file).

Patient ids are stored only as salted hashes (``patient_key``): enough to keep one slice per
patient, never shown or logged.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neurocbir.data.cases import CASE_LABELS
from neurocbir.errors import InvalidInput
from neurocbir.files import atomic_path
from neurocbir.retrieval.archive_reads import READ_INDEXES, ArchiveReads
from neurocbir.retrieval.index import IndexMismatchError
from neurocbir.retrieval.milvus import CONSISTENCY, READER_CONSISTENCY, MilvusStore
from neurocbir.retrieval.store import CaseStore, FaissStore, StaleCollection, StoreUnavailable

STORE_KINDS = ("flat", "hnsw", "milvus")
MILVUS_COLLECTION = "neurocbir_cases"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    content_sha256 TEXT NOT NULL UNIQUE,
    label INTEGER NOT NULL,
    patient_key TEXT NOT NULL,
    plane TEXT NOT NULL DEFAULT '',
    area_mm2 REAL,
    image_path TEXT NOT NULL,
    source_case INTEGER,
    report TEXT,
    embedding BLOB NOT NULL,
    trunk BLOB,
    fingerprint BLOB,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'indexed', 'deleting')),
    added TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cases_state ON cases(state);
"""


class ArchiveError(InvalidInput):
    """The archive cannot be opened or a case cannot be added."""


@dataclass
class CaseRecord:
    """One case ready to be stored: file identity, labels and its vectors."""

    content_sha256: str
    label: int
    patient_id: str
    plane: str
    area_mm2: float | None
    image_path: str
    embedding: np.ndarray
    trunk: np.ndarray | None = None
    source_case: int | None = None
    report: str | None = None
    #: the image's near-duplicate prints (:meth:`neurocbir.retrieval.duplicates.ImagePrints.stored`)
    fingerprint: np.ndarray | None = None


class CaseArchive(ArchiveReads):
    """Cases in SQLite + their vectors in a :class:`neurocbir.retrieval.store.CaseStore`.

    Create with :meth:`create`, reopen with :meth:`open` (which refuses another encoder).
    ``store``: ``"flat"`` (exact FAISS, default), ``"hnsw"`` (approximate FAISS) or
    ``"milvus"`` (``milvus_uri``: a Milvus Lite ``.db`` path, default inside the archive, or a
    server ``http://host:19530``; token from ``$NEUROCBIR_MILVUS_TOKEN``; ``milvus_index``:
    the collection's index type, e.g. FLAT, IVF_FLAT, HNSW, for a server).
    """

    DB = "archive.db"

    def __init__(
        self, root: Path, db: sqlite3.Connection, meta: dict, writer: bool = True, store_wait_s: float | None = None
    ):
        self.root, self.db, self.meta, self.writer = root, db, meta, writer
        self.store_wait_s = store_wait_s  # how long to wait for a store server that is not ready yet
        self.changed = False  # cases added or removed by this writer (its start file is remade at close)
        self._lock = threading.RLock()
        self.dim = int(meta["dim"])
        self.checkpoint_sha256 = meta["checkpoint_sha256"]
        # read before the store: a commit while this view loads counts as a change
        # (a served view reloads when the version moves: sources.ArchiveCases.changed)
        self.opened_version = self.data_version()
        self.store, self._store_stale = self._open_store(fresh=False)
        if writer:
            self.reconcile()
        elif self._store_stale:  # a reader never writes: it indexes the committed cases in memory
            self.store = self._memory_store()

    # --- opening ------------------------------------------------------------------------
    @staticmethod
    def _connect(path: Path, writer: bool = True) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        if writer:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            columns = {r[1] for r in db.execute("PRAGMA table_info(cases)")}
            if "fingerprint" not in columns:  # an archive made before duplicates were recognised
                db.execute("ALTER TABLE cases ADD COLUMN fingerprint BLOB")
            db.executescript(READ_INDEXES)
        else:
            db.execute("PRAGMA query_only=ON")
        return db

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One state change of a batch, all or nothing."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    @classmethod
    def create(
        cls,
        root: Path | str,
        dim: int,
        checkpoint_sha256: str,
        store: str = "flat",
        milvus_uri: str | None = None,
        run: str = "",
        milvus_index: str = "FLAT",
        store_wait_s: float | None = None,
    ) -> CaseArchive:
        """Open the archive at ``root``, creating it for this encoder if it does not exist
        (``store_wait_s``: how long to wait for a Milvus server that is not ready yet)."""
        root = Path(root)
        if (root / cls.DB).is_file():
            return cls.open(root, checkpoint_sha256, dim, store_wait_s=store_wait_s)
        if store not in STORE_KINDS:
            raise ArchiveError(f"unknown store {store!r}; choose one of {', '.join(STORE_KINDS)}")
        meta = {
            "dim": str(dim),
            "checkpoint_sha256": checkpoint_sha256,
            "store": store,
            "run": run,
            "milvus_uri": milvus_uri or "",
            "milvus_index": milvus_index,
            "patient_salt": secrets.token_hex(16),
            "milvus_collection": f"neurocbir_{secrets.token_hex(8)}",  # one collection per archive
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        with atomic_path(root / cls.DB) as tmp:  # the archive exists only once complete
            db = cls._connect(tmp)
            db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            db.close()
        db = cls._connect(root / cls.DB)
        try:
            return cls(root, db, meta, store_wait_s=store_wait_s)
        except ArchiveError:  # e.g. Milvus unreachable: leave no half-made archive behind
            db.close()
            for suffix in ("", "-wal", "-shm"):
                (root / (cls.DB + suffix)).unlink(missing_ok=True)
            raise

    @classmethod
    def open(
        cls,
        root: Path | str,
        checkpoint_sha256: str | None = None,
        dim: int | None = None,
        writer: bool = True,
        store_wait_s: float | None = None,
    ) -> CaseArchive:
        """Open an archive. The writer (``neurocbir add`` / ``remove``, under :func:`writer_lock`)
        repairs what a crash interrupted; a reader (``writer=False``: the app, ``query``)
        never writes and sees the cases committed as indexed."""
        root = Path(root)
        if not (root / cls.DB).is_file():
            raise FileNotFoundError(f"no case archive at {root} (expected {cls.DB}): create one with `neurocbir add`")
        try:
            db = cls._connect(root / cls.DB, writer)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise ArchiveError(f"{root / cls.DB} is not a readable case archive ({exc})") from None
        if checkpoint_sha256 is not None and meta.get("checkpoint_sha256") != checkpoint_sha256:
            raise IndexMismatchError(
                f"archive {root} was embedded by checkpoint {meta.get('checkpoint_sha256', '?')[:12]} "
                f"(run {meta.get('run') or '?'}), not {checkpoint_sha256[:12]}: pass that --run, "
                "or use a new archive folder for this encoder"
            )
        if dim is not None and int(meta.get("dim", -1)) != dim:
            raise IndexMismatchError(f"archive {root} holds {meta.get('dim')}-d vectors, the encoder gives {dim}-d")
        return cls(root, db, meta, writer, store_wait_s)

    def _open_store(self, fresh: bool) -> tuple[CaseStore, bool]:
        """(store, stale): stale when the saved index is lost or unreadable."""
        kind = self.meta["store"]
        if kind == "milvus":
            try:
                return self._open_milvus(fresh), False
            except StaleCollection:
                if not self.writer:
                    return self._memory_store(), False
                return self._open_milvus(fresh=True), True
        path = self.root / "index.faiss"
        if not fresh:
            try:
                return FaissStore.open(path, self.checkpoint_sha256, self.dim), False
            except (FileNotFoundError, IndexMismatchError, RuntimeError):
                pass  # lost or stale: reconcile() rebuilds it from the table
        return FaissStore(path, self.dim, kind=kind, checkpoint_sha256=self.checkpoint_sha256), not fresh

    def _open_milvus(self, fresh: bool) -> CaseStore:
        uri = self.meta["milvus_uri"] or str(self.root / "milvus.db")
        try:
            return MilvusStore.connect(
                uri,
                self.meta.get("milvus_collection") or MILVUS_COLLECTION,  # archives made before: the shared name
                self.dim,
                self.checkpoint_sha256,
                index_type=self.meta.get("milvus_index") or "FLAT",
                fresh=fresh,
                wait_s=self.store_wait_s,
                consistency=CONSISTENCY if self.writer else READER_CONSISTENCY,
            )
        except StoreUnavailable as exc:
            raise ArchiveError(str(exc)) from None

    # --- durability -----------------------------------------------------------------------
    def _ids(self, state: str) -> np.ndarray:
        return np.array(
            [r[0] for r in self.db.execute("SELECT id FROM cases WHERE state = ?", (state,))], dtype=np.int64
        )

    def reconcile(self) -> None:  # the writer only (see open)
        """Bring the store in line with the table after a crash (idempotent, cheap when clean)."""
        indexed = self.db.execute("SELECT COUNT(*) FROM cases WHERE state = 'indexed'").fetchone()[0]
        pending, deleting = self._ids("pending"), self._ids("deleting")
        n = self.store.count()
        if self._store_stale or not indexed <= n <= indexed + len(pending) + len(deleting):
            self.rebuild_store()
            return
        if len(deleting):
            self.store.delete(deleting)
            self.store.save()
            self.db.execute("DELETE FROM cases WHERE state = 'deleting'")
        self.index_pending()

    def rebuild_store(self) -> None:
        """Re-create the store from the table (the table is the source of truth)."""
        self.db.execute("DELETE FROM cases WHERE state = 'deleting'")
        self.store, self._store_stale = self._open_store(fresh=True)
        for ids, vecs, groups in self._vectors("state IN ('indexed', 'pending')"):
            self.store.add(ids, vecs, groups)
        self.store.save()
        self.db.execute("UPDATE cases SET state = 'indexed' WHERE state = 'pending'")

    def index_pending(self) -> int:
        """Put committed-but-pending cases into the store, save it, mark them indexed."""
        pending = list(self._vectors("state = 'pending'"))
        if not pending:
            return 0
        ids = np.concatenate([p[0] for p in pending])
        vecs = np.concatenate([p[1] for p in pending])
        groups = np.concatenate([p[2] for p in pending])
        new = ~self.store.contains(ids)  # a crash after the store was saved: those are in already
        if new.any():
            self.store.add(ids[new], vecs[new], groups[new])
        self.store.save()
        with self._transaction():
            self.db.executemany("UPDATE cases SET state = 'indexed' WHERE id = ?", [(int(i),) for i in ids])
        return len(ids)

    def _memory_store(self) -> FaissStore:
        """The indexed cases in an unsaved exact FAISS store (a reader's view of a stale file)."""
        store = FaissStore(self.root / "index.faiss", self.dim, kind="flat", checkpoint_sha256=self.checkpoint_sha256)
        for ids, vecs, groups in self._vectors("state = 'indexed'"):
            store.add(ids, vecs, groups)
        return store

    # --- writing --------------------------------------------------------------------------
    def patient_key(self, patient_id: str) -> str:
        return hashlib.sha256((self.meta["patient_salt"] + str(patient_id)).encode()).hexdigest()[:32]

    def ids_of(self, hashes: Iterable[str]) -> dict[str, int]:
        """The case id of each content hash the archive holds."""
        hashes = list(hashes)
        found: dict[str, int] = {}
        for b in range(0, len(hashes), 500):
            chunk = hashes[b : b + 500]
            q = f"SELECT content_sha256, id FROM cases WHERE content_sha256 IN ({','.join('?' * len(chunk))})"
            found.update((r[0], int(r[1])) for r in self.db.execute(q, chunk))
        return found

    def add(self, records: list[CaseRecord], index: bool = True) -> int:
        """Insert new cases in one transaction (already-known content is skipped), then index
        them. Returns how many were new."""
        rows = []
        for r in records:
            e = np.asarray(r.embedding, dtype=np.float32).ravel()
            if e.shape[0] != self.dim or not np.isfinite(e).all():
                raise ArchiveError(f"{r.image_path}: embedding must be {self.dim} finite values")
            if not 0 <= int(r.label) < len(CASE_LABELS):
                raise ArchiveError(f"{r.image_path}: label {r.label} is not one of 0..{len(CASE_LABELS) - 1}")
            trunk = None if r.trunk is None else np.asarray(r.trunk, dtype=np.float32).ravel().tobytes()
            fp = None if r.fingerprint is None else np.asarray(r.fingerprint, dtype=np.float16).ravel().tobytes()
            rows.append(
                (
                    r.content_sha256,
                    int(r.label),
                    self.patient_key(r.patient_id),
                    r.plane or "",
                    None if r.area_mm2 is None else float(r.area_mm2),
                    str(r.image_path),
                    r.source_case,
                    r.report,
                    e.tobytes(),
                    trunk,
                    fp,
                    time.strftime("%Y-%m-%dT%H:%M:%S"),
                )
            )
        before = self.db.total_changes
        with self._transaction():
            self.db.executemany(
                "INSERT OR IGNORE INTO cases (content_sha256, label, patient_key, plane, area_mm2, image_path, "
                "source_case, report, embedding, trunk, fingerprint, added) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
        new = self.db.total_changes - before
        self.changed |= new > 0
        if index:
            self.index_pending()
        return new

    def delete(self, case_ids: Iterable[int]) -> list[int]:
        """Remove cases (table marks them, the store drops them, then the rows go); returns the
        ids that were in the archive."""
        ids = sorted({int(i) for i in case_ids})
        found = sorted(self.cases(ids))
        with self._transaction():
            self.db.executemany("UPDATE cases SET state = 'deleting' WHERE id = ?", [(i,) for i in found])
        self.reconcile()
        self.changed |= bool(found)
        return found

    # --- reading --------------------------------------------------------------------------
    def data_version(self) -> int:
        """Changes whenever another connection (an `add` or `remove`) commits: SQLite's
        ``PRAGMA data_version``, a cheap way for a long-lived reader to notice."""
        with self._lock:
            return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM cases WHERE state != 'deleting'").fetchone()[0])

    def check(self) -> dict:
        """Consistency report: table integrity, duplicates, store == table."""
        integrity = self.db.execute("PRAGMA integrity_check").fetchone()[0]
        dups = self.db.execute("SELECT COUNT(*) - COUNT(DISTINCT content_sha256) FROM cases").fetchone()[0]
        states = dict(self.db.execute("SELECT state, COUNT(*) FROM cases GROUP BY state").fetchall())
        return {
            "integrity": integrity,
            "duplicates": int(dups),
            "states": states,
            "store_count": self.store.count(),
            "indexed": int(states.get("indexed", 0)),
        }

    def close(self) -> None:
        """Close the store and the table; a writer that changed the archive first brings its start
        file (:mod:`neurocbir.retrieval.start_file`: what the app reads at start) up to date."""
        if self.writer and self.changed:
            from neurocbir.retrieval import start_file

            try:
                start_file.refresh(self)
            except OSError as exc:  # e.g. a full disk: the archive is whole, only its start reads the table
                logging.getLogger(__name__).warning("the archive's start file was not written (%s)", exc)
            self.changed = False
        if hasattr(self.store, "close"):
            self.store.close()
        self.db.close()
