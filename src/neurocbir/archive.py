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

import csv
import hashlib
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .data import CLASS_NAMES, PLANES, DatasetError, load_cases
from .index import IndexMismatchError, sha256_file
from .store import CaseStore, FaissStore, MilvusStore

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
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'indexed', 'deleting')),
    added TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cases_state ON cases(state);
"""


class ArchiveError(ValueError):
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


class CaseArchive:
    """Cases in SQLite + their vectors in a :class:`neurocbir.store.CaseStore`.

    Create with :meth:`create`, reopen with :meth:`open` (which refuses another encoder).
    ``store``: ``"flat"`` (exact FAISS, default), ``"hnsw"`` (approximate FAISS) or
    ``"milvus"`` (``milvus_uri``: a Milvus Lite ``.db`` path, default inside the archive, or a
    server ``http://host:19530``; token from ``$NEUROCBIR_MILVUS_TOKEN``; ``milvus_index``:
    the collection's index type, e.g. FLAT, IVF_FLAT, HNSW, for a server).
    """

    DB = "archive.db"

    def __init__(self, root: Path, db: sqlite3.Connection, meta: dict):
        self.root, self.db, self.meta = root, db, meta
        self._lock = threading.RLock()
        self.dim = int(meta["dim"])
        self.checkpoint_sha256 = meta["checkpoint_sha256"]
        self.store, self._store_stale = self._open_store(fresh=False)
        self.reconcile()

    # --- opening ------------------------------------------------------------------------
    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        return db

    @classmethod
    def create(cls, root: Path | str, dim: int, checkpoint_sha256: str, store: str = "flat",
               milvus_uri: str | None = None, run: str = "", milvus_index: str = "FLAT") -> "CaseArchive":
        """Open the archive at ``root``, creating it for this encoder if it does not exist."""
        root = Path(root)
        if (root / cls.DB).is_file():
            return cls.open(root, checkpoint_sha256, dim)
        if store not in STORE_KINDS:
            raise ArchiveError(f"unknown store {store!r}; choose one of {', '.join(STORE_KINDS)}")
        root.mkdir(parents=True, exist_ok=True)
        db = cls._connect(root / (cls.DB + ".tmp"))
        meta = {"dim": str(dim), "checkpoint_sha256": checkpoint_sha256, "store": store, "run": run,
                "milvus_uri": milvus_uri or "", "milvus_index": milvus_index, "patient_salt": secrets.token_hex(16),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        db.close()
        os.replace(root / (cls.DB + ".tmp"), root / cls.DB)  # the archive exists only once complete
        db = cls._connect(root / cls.DB)
        try:
            return cls(root, db, meta)
        except ArchiveError:  # e.g. Milvus unreachable: leave no half-made archive behind
            db.close()
            for suffix in ("", "-wal", "-shm"):
                (root / (cls.DB + suffix)).unlink(missing_ok=True)
            raise

    @classmethod
    def open(cls, root: Path | str, checkpoint_sha256: str | None = None, dim: int | None = None) -> "CaseArchive":
        root = Path(root)
        if not (root / cls.DB).is_file():
            raise FileNotFoundError(f"no case archive at {root} (expected {cls.DB}): create one with `neurocbir add`")
        try:
            db = cls._connect(root / cls.DB)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise ArchiveError(f"{root / cls.DB} is not a readable case archive ({exc})") from None
        if checkpoint_sha256 is not None and meta.get("checkpoint_sha256") != checkpoint_sha256:
            raise IndexMismatchError(f"archive {root} was embedded by checkpoint {meta.get('checkpoint_sha256', '?')[:12]} "
                                     f"(run {meta.get('run') or '?'}), not {checkpoint_sha256[:12]}: pass that --run, "
                                     "or use a new archive folder for this encoder")
        if dim is not None and int(meta.get("dim", -1)) != dim:
            raise IndexMismatchError(f"archive {root} holds {meta.get('dim')}-d vectors, the encoder gives {dim}-d")
        return cls(root, db, meta)

    def _open_store(self, fresh: bool) -> tuple[CaseStore, bool]:
        """(store, stale): stale when the saved index is lost or unreadable."""
        kind = self.meta["store"]
        if kind == "milvus":
            return self._open_milvus(fresh), False
        path = self.root / "index.faiss"
        if not fresh:
            try:
                return FaissStore.open(path, self.checkpoint_sha256, self.dim), False
            except (FileNotFoundError, IndexMismatchError, RuntimeError):
                pass  # lost or stale: reconcile() rebuilds it from the table
        return FaissStore(path, self.dim, kind=kind, checkpoint_sha256=self.checkpoint_sha256), not fresh

    def _open_milvus(self, fresh: bool) -> CaseStore:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        uri = self.meta["milvus_uri"] or str(self.root / "milvus.db")
        token = os.environ.get("NEUROCBIR_MILVUS_TOKEN", "")
        try:
            if fresh:
                client = MilvusClient(uri, token=token) if token else MilvusClient(uri)
                if client.has_collection(MILVUS_COLLECTION):
                    client.drop_collection(MILVUS_COLLECTION)
                client.close()
            return MilvusStore(uri, MILVUS_COLLECTION, self.dim, self.checkpoint_sha256, token=token,
                               index_type=self.meta.get("milvus_index") or "FLAT")
        except MilvusException as exc:
            raise ArchiveError(f"Milvus at {uri}: {exc.message if hasattr(exc, 'message') else exc} "
                               "(is the server up, and $NEUROCBIR_MILVUS_TOKEN right?)") from None

    # --- durability -----------------------------------------------------------------------
    def _ids(self, state: str) -> np.ndarray:
        return np.array([r[0] for r in self.db.execute("SELECT id FROM cases WHERE state = ?", (state,))], dtype=np.int64)

    def reconcile(self) -> None:
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
        for ids, vecs in self._vectors("state IN ('indexed', 'pending')"):
            self.store.add(ids, vecs)
        self.store.save()
        self.db.execute("UPDATE cases SET state = 'indexed' WHERE state = 'pending'")

    def _vectors(self, where: str, chunk: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cur = self.db.execute(f"SELECT id, embedding FROM cases WHERE {where} ORDER BY id")
        while rows := cur.fetchmany(chunk):
            yield (np.array([r[0] for r in rows], dtype=np.int64),
                   np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows]))

    def index_pending(self) -> int:
        """Put committed-but-pending cases into the store, save it, mark them indexed."""
        pending = list(self._vectors("state = 'pending'"))
        if not pending:
            return 0
        ids = np.concatenate([p[0] for p in pending])
        vecs = np.concatenate([p[1] for p in pending])
        new = ~self.store.contains(ids)  # a crash after the store was saved: those are in already
        if new.any():
            self.store.add(ids[new], vecs[new])
        self.store.save()
        self.db.executemany("UPDATE cases SET state = 'indexed' WHERE id = ?", [(int(i),) for i in ids])
        return len(ids)

    # --- writing --------------------------------------------------------------------------
    def patient_key(self, patient_id: str) -> str:
        return hashlib.sha256((self.meta["patient_salt"] + str(patient_id)).encode()).hexdigest()[:32]

    def known_hashes(self, hashes: Iterable[str]) -> set[str]:
        hashes = list(hashes)
        found: set[str] = set()
        for b in range(0, len(hashes), 500):
            chunk = hashes[b:b + 500]
            q = f"SELECT content_sha256 FROM cases WHERE content_sha256 IN ({','.join('?' * len(chunk))})"
            found.update(r[0] for r in self.db.execute(q, chunk))
        return found

    def add(self, records: list[CaseRecord], index: bool = True) -> int:
        """Insert new cases in one transaction (already-known content is skipped), then index
        them. Returns how many were new."""
        rows = []
        for r in records:
            e = np.asarray(r.embedding, dtype=np.float32).ravel()
            if e.shape[0] != self.dim or not np.isfinite(e).all():
                raise ArchiveError(f"{r.image_path}: embedding must be {self.dim} finite values")
            if not 0 <= int(r.label) < len(CLASS_NAMES):
                raise ArchiveError(f"{r.image_path}: label {r.label} is not one of 0..{len(CLASS_NAMES) - 1}")
            trunk = None if r.trunk is None else np.asarray(r.trunk, dtype=np.float32).ravel().tobytes()
            rows.append((r.content_sha256, int(r.label), self.patient_key(r.patient_id), r.plane or "",
                         None if r.area_mm2 is None else float(r.area_mm2), str(r.image_path), r.source_case,
                         r.report, e.tobytes(), trunk, time.strftime("%Y-%m-%dT%H:%M:%S")))
        before = self.db.total_changes
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(
                "INSERT OR IGNORE INTO cases (content_sha256, label, patient_key, plane, area_mm2, image_path, "
                "source_case, report, embedding, trunk, added) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        new = self.db.total_changes - before
        if index:
            self.index_pending()
        return new

    def delete(self, case_ids: Iterable[int]) -> None:
        ids = [(int(i),) for i in case_ids]
        self.db.executemany("UPDATE cases SET state = 'deleting' WHERE id = ?", ids)
        self.reconcile()

    # --- reading --------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM cases WHERE state != 'deleting'").fetchone()[0])

    def columns(self) -> dict[str, np.ndarray]:
        """id, label, patient_key of every indexed case (what NIR needs in memory)."""
        rows = self.db.execute("SELECT id, label, patient_key FROM cases WHERE state = 'indexed' ORDER BY id").fetchall()
        return {"id": np.array([r[0] for r in rows], dtype=np.int64), "label": np.array([r[1] for r in rows], dtype=np.int64),
                "patient_key": np.array([r[2] for r in rows])}

    def cases(self, case_ids: Iterable[int]) -> dict[int, dict]:
        ids = [int(i) for i in case_ids]
        out = {}
        for b in range(0, len(ids), 500):
            chunk = ids[b:b + 500]
            q = (f"SELECT id, label, plane, area_mm2, image_path, source_case, report FROM cases "
                 f"WHERE state = 'indexed' AND id IN ({','.join('?' * len(chunk))})")
            with self._lock:  # the app reads from several threads
                rows = self.db.execute(q, chunk).fetchall()
            for r in rows:
                out[r[0]] = {"case_id": r[0], "label": CLASS_NAMES[r[1]], "plane": r[2] or None,
                             "area_mm2": None if r[3] is None else round(r[3], 2), "image_path": r[4],
                             "source_case": r[5], "report": r[6]}
        return out

    def trunk_vectors(self) -> np.ndarray | None:
        rows = self.db.execute("SELECT trunk FROM cases WHERE state = 'indexed' AND trunk IS NOT NULL ORDER BY id").fetchall()
        return np.stack([np.frombuffer(r[0], dtype=np.float32) for r in rows]) if rows else None

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self._vectors("state = 'indexed'"))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def check(self) -> dict:
        """Consistency report: table integrity, duplicates, store == table."""
        integrity = self.db.execute("PRAGMA integrity_check").fetchone()[0]
        dups = self.db.execute("SELECT COUNT(*) - COUNT(DISTINCT content_sha256) FROM cases").fetchone()[0]
        states = dict(self.db.execute("SELECT state, COUNT(*) FROM cases GROUP BY state").fetchall())
        return {"integrity": integrity, "duplicates": int(dups), "states": states,
                "store_count": self.store.count(), "indexed": int(states.get("indexed", 0))}

    def close(self) -> None:
        if hasattr(self.store, "close"):
            self.store.close()
        self.db.close()


@contextmanager
def writer_lock(root: Path | str) -> Iterator[None]:
    """One writer (`neurocbir add`) per archive at a time; readers (the app) need no lock."""
    import fcntl

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "writer.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArchiveError(f"another `neurocbir add` is writing to {root}; wait for it to finish") from None
        yield


# --- folders of cases ----------------------------------------------------------------------

@dataclass
class CaseFile:
    """A case on disk before it is embedded."""

    path: Path
    label: int
    patient_id: str
    plane: str = ""
    area_mm2: float | None = None
    source_case: int | None = None
    report: str | None = None
    load: Callable[[], np.ndarray] | None = None

    def pixels(self) -> np.ndarray:
        if self.load is not None:
            return self.load()
        from .uploads import read_scan

        return read_scan(self.path.read_bytes(), self.path.name)


def _label_of(value: str, where: str) -> int:
    v = value.strip().lower()
    if v in CLASS_NAMES:
        return CLASS_NAMES.index(v)
    if v in ("1", "2", "3"):  # the figshare convention
        return int(v) - 1
    raise ArchiveError(f"{where}: label {value!r} is not one of {', '.join(CLASS_NAMES)} (or 1, 2, 3)")


def scan_folder(folder: Path | str, folds: Iterable[int] | None = None) -> list[CaseFile]:
    """The cases of a folder: the bundled dataset layout, the figshare ``.mat`` release, or
    any folder of PNG/JPEG/DICOM/.mat scans with a ``cases.csv`` (columns ``file,label`` and
    optionally ``patient_id,plane,area_mm2,report``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArchiveError(f"no such folder: {folder}")
    if (folder / "cases.csv").is_file():
        return _scan_csv(folder)
    try:
        table = load_cases(folder)
    except DatasetError as exc:
        raise ArchiveError(f"{exc}; or put a cases.csv (file,label[,patient_id,plane,area_mm2,report]) "
                           f"beside the scans") from None
    keep = np.ones(len(table), bool) if folds is None else np.isin(table.fold, list(folds))
    loader = table.loader
    files = []
    for r in np.flatnonzero(keep):
        idx = int(table.idx[r])
        path = loader.root / ("images" / Path(f"{idx}.jpg") if loader.name == "folder" else Path(f"{idx}.mat"))
        files.append(CaseFile(path, int(table.label[r]), str(table.patient_id[r]), str(table.plane[r]),
                              float(table.area_mm2[r]), idx, load=lambda i=idx: loader.load_image(i)))
    return files


def _scan_csv(folder: Path) -> list[CaseFile]:
    path = folder / "cases.csv"
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = {"file", "label"} - set(reader.fieldnames or [])
            if missing:
                raise ArchiveError(f"{path} lacks columns {sorted(missing)}")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ArchiveError(f"{path} is not a UTF-8 CSV file ({exc})") from None
    files = []
    for n, r in enumerate(rows, 2):
        where = f"{path}, line {n}"
        if r.get("file") is None or r.get("label") is None:
            raise ArchiveError(f"{where}: fewer values than columns")
        try:
            f = (folder / r["file"]).resolve()
        except (ValueError, OSError):  # e.g. a NUL in the name
            raise ArchiveError(f"{where}: {r['file']!r} is not a file name") from None
        if not f.is_relative_to(folder.resolve()) or not f.is_file():
            raise ArchiveError(f"{where}: no file {r['file']!r} in {folder}")
        plane = (r.get("plane") or "").strip().lower()
        if plane and plane not in PLANES:
            raise ArchiveError(f"{where}: plane {plane!r} is not one of {', '.join(PLANES)}")
        try:
            area = float(r["area_mm2"]) if (r.get("area_mm2") or "").strip() else None
        except ValueError:
            raise ArchiveError(f"{where}: area_mm2 {r['area_mm2']!r} is not a number") from None
        files.append(CaseFile(f, _label_of(r["label"], where), (r.get("patient_id") or "").strip() or f.name,
                              plane, area, report=(r.get("report") or None)))
    return files


def add_folder(archive: CaseArchive, files: list[CaseFile], embed: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]],
               batch_size: int = 32, progress: Callable[[int], None] | None = None, index_every_s: float = 30.0) -> dict:
    """Embed and add the files the archive does not hold yet, one committed batch at a time
    (so a killed run resumes where it stopped). The store is written every ``index_every_s``
    seconds and at the end (saving a large index per batch would dominate); committed cases
    not yet in the store are indexed on the next open. Unreadable files are skipped and reported."""
    hashes = [sha256_file(f.path) for f in files]
    known = archive.known_hashes(hashes)
    todo = [(f, h) for f, h in zip(files, hashes) if h not in known]
    seen: set[str] = set()
    todo = [(f, h) for f, h in todo if not (h in seen or seen.add(h))]  # the same file twice in one folder
    added, skipped, errors = 0, len(files) - len(todo), []
    if progress:
        progress(skipped)
    last_index = time.monotonic()
    for b in range(0, len(todo), batch_size):
        batch, images = [], []
        for f, h in todo[b:b + batch_size]:
            try:
                images.append(f.pixels())
                batch.append((f, h))
            except (ValueError, OSError) as exc:  # UploadError / DatasetError are ValueErrors
                errors.append(f"{f.path.name}: {exc}")
        if batch:
            emb, trunk = embed(images)
            added += archive.add([CaseRecord(h, f.label, f.patient_id, f.plane, f.area_mm2, str(f.path), e, t,
                                             f.source_case, f.report) for (f, h), e, t in zip(batch, emb, trunk)],
                                 index=False)
        if time.monotonic() - last_index >= index_every_s:
            archive.index_pending()
            last_index = time.monotonic()
        if progress:
            progress(len(todo[b:b + batch_size]))
    archive.index_pending()
    return {"added": added, "already_there": skipped, "errors": errors, "total": len(archive)}

