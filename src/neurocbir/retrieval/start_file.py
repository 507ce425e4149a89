"""What a served archive reads at start, kept beside it in one file (``start.npz``).

At a million cases the app's start used to read a random spread of 20,000 trunk descriptors and
every case's coarse print out of a 7 GB table, one small page at a time, and to train and fill
the prints' inverted file again. Right after a bulk add, while the system still writes the table
out, those reads took minutes (docs/results.md app-scale-milvus). The writer (``neurocbir add`` /
``remove``) therefore keeps them in one file, read at start in a few large reads:

- the trunk sample (:meth:`neurocbir.retrieval.archive_reads.ArchiveReads.trunk_sample`), and
- the prints' inverted file (:class:`neurocbir.retrieval.duplicates.DuplicateIndex`), with its case ids,

as of the cases up to ``max_id``. A reader takes the file only while it still describes the
archive: no case up to ``max_id`` removed since, and the archive grown by at most
:data:`STALE_SHARE` beyond it; the prints of the cases added since are read from the table and
joined, the trunk sample stays the file's (as a served view keeps its own until it reloads). Else
the reader reads the table as before, and the next writer makes the file again. Archives under
:data:`START_FILE_FROM` cases have none: they read their table in about a second.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from neurocbir.files import atomic_path
from neurocbir.retrieval.duplicates import IVF_FROM, SIDE, DuplicateIndex

NAME = "start.npz"
#: what reading a damaged file raises (cut short by a full disk, say): then the table is read instead
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)
#: the file's layout (a reader ignores a file of another)
FORMAT = 1
#: the smallest archive (indexed cases) the writer keeps a start file for: from here its prints are an inverted file
START_FILE_FROM = IVF_FROM
#: how far past its file an archive may grow before a reader reads the table instead (and a writer remakes it)
STALE_SHARE = 0.1
#: the most cases whose trunk descriptors a served view holds ("no similar case", presence): 20,000 x
#: 1280 float32 is 100 MB, one flat search of them ~10 ms on 2 cores; an archive this size or smaller is read whole
TRUNK_SAMPLE = 20_000


def _counts(archive, max_id: int) -> tuple[int, int]:
    """(indexed cases, cases with a print) up to ``max_id``, as the archive holds them now."""
    db = archive.db
    indexed = db.execute("SELECT COUNT(*) FROM cases WHERE state = 'indexed' AND id <= ?", (max_id,)).fetchone()[0]
    printed = db.execute(
        "SELECT COUNT(*) FROM cases WHERE state != 'deleting' AND fingerprint IS NOT NULL AND id <= ?", (max_id,)
    ).fetchone()[0]
    return int(indexed), int(printed)


def _meta(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
    except _UNREADABLE:
        return None
    return meta if meta.get("format") == FORMAT else None


def still_describes(archive, meta: dict | None) -> bool:
    """Does a start file's ``meta`` still describe ``archive`` (same encoder, nothing it holds
    removed, grown by at most :data:`STALE_SHARE`)?"""
    if not meta or meta.get("checkpoint_sha256") != archive.checkpoint_sha256:
        return False
    indexed, printed = _counts(archive, int(meta["max_id"]))
    if (indexed, printed) != (meta["indexed"], meta["printed"]):
        return False
    now = archive.db.execute("SELECT COUNT(*) FROM cases WHERE state = 'indexed'").fetchone()[0]
    return now - indexed <= STALE_SHARE * max(indexed, 1)


def write(archive) -> Path:
    """Write ``archive``'s start file (the writer; a reader opens it meanwhile unharmed: atomic)."""
    import faiss

    max_id = int(archive.db.execute("SELECT COALESCE(MAX(id), 0) FROM cases").fetchone()[0])
    indexed, printed = _counts(archive, max_id)
    sample = archive.trunk_sample(TRUNK_SAMPLE)
    prints = DuplicateIndex.of_archive(archive)
    part = prints.parts[0]
    meta = {
        "format": FORMAT,
        "checkpoint_sha256": archive.checkpoint_sha256,
        "max_id": max_id,
        "indexed": indexed,
        "printed": printed,
        "trunk_sample": sample is not None,
    }
    arrays = {"meta": np.array(json.dumps(meta)), "print_ids": part.ids}
    arrays["print_index"] = faiss.serialize_index(part.index)
    if sample is not None:
        arrays.update({f"trunk_{k}": v for k, v in sample.items()})
    path = archive.root / NAME
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
    return path


def refresh(archive, min_cases: int | None = None) -> Path | None:
    """After a writer changed ``archive``: remake its start file unless the one there still
    describes it; none for an archive under ``min_cases`` (default :data:`START_FILE_FROM`)
    indexed cases (any old one removed)."""
    path = archive.root / NAME
    n = archive.db.execute("SELECT COUNT(*) FROM cases WHERE state = 'indexed'").fetchone()[0]
    if n < (START_FILE_FROM if min_cases is None else min_cases):
        path.unlink(missing_ok=True)
        return None
    if still_describes(archive, _meta(path)):
        return path
    return write(archive)


def read(archive) -> tuple[dict[str, np.ndarray] | None, DuplicateIndex] | None:
    """(the trunk sample, the prints' index with the cases added since joined) from ``archive``'s
    start file, or None where it has none that still describes it (then read the table)."""
    import faiss

    path = archive.root / NAME
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            if meta.get("format") != FORMAT or not still_describes(archive, meta):
                return None
            arrays = {k: f[k] for k in f.files if k != "meta"}
    except _UNREADABLE:
        return None
    prints = DuplicateIndex(lambda case_ids: archive.stored_prints(case_ids)[:, SIDE * SIDE :])
    prints.parts[0].index = faiss.deserialize_index(arrays.pop("print_index"))  # nprobe and all, as written
    prints.parts[0].ids = arrays.pop("print_ids")
    for ids, coarse in archive.fingerprints(SIDE * SIDE, after_id=int(meta["max_id"])):
        prints.add(ids, coarse)
    sample = {k.removeprefix("trunk_"): v for k, v in arrays.items()} if meta["trunk_sample"] else None
    if (
        sample is not None
        and archive.db.execute("SELECT COUNT(*) FROM cases WHERE state = 'indexed' AND trunk IS NULL").fetchone()[0]
    ):
        sample = None  # as the table would say: some indexed case has no descriptor
    return sample, prints
