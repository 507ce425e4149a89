"""Small file utilities every stage shares: atomic writes and streamed hashes.

A reader must never see half a file (a crash mid-write, a second process reading), so every
output goes to a temporary file in the same folder, is flushed to disk, and is renamed over
the target; the folder is synced so that the rename itself survives a power cut.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from neurocbir.errors import Conflict


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, the file written there
    is synced and renamed onto ``path``. On error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffix: np.save / np.savez / faiss choose formats by it
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent, directory=True)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path | str, write: Callable[[Path], object]) -> None:
    """``write(tmp_path)`` then move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path | str, obj, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent))


CACHE_ENV = "NEUROCBIR_CACHE"


def default_cache_dir() -> Path:
    """Derived files (feature cache, LLM-written reports, held-out twins): ``$NEUROCBIR_CACHE``, else
    ``~/.cache/neurocbir``. Safe to delete; they are rebuilt on demand."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "neurocbir"))


def sha256_file(path: Path | str) -> str:
    """SHA-256 of a file, streamed: identifies weights, checkpoints and archived scans."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class WriterBusy(Conflict, ValueError):
    """Another process holds a folder's writer lock."""


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
            raise WriterBusy(f"another `neurocbir add` is writing to {root}; wait for it to finish") from None
        yield
