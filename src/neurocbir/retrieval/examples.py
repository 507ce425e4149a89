"""Held-out examples kept beside an archive's cases: scans a user can try the app with (the test
fold, another site's validation slices), stored in the archive's database but never searched,
so an example never finds itself. Their ids start at :data:`EXAMPLE_ID_BASE`, apart from the
case ids."""

from __future__ import annotations

import random
import sqlite3
import time

from neurocbir.data.cases import CASE_LABELS
from neurocbir.files import sha256_file
from neurocbir.retrieval.archive import CaseArchive
from neurocbir.retrieval.casefiles import CaseFile

EXAMPLE_ID_BASE = 1_000_000_000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    content_sha256 TEXT NOT NULL UNIQUE,
    label INTEGER NOT NULL,
    image_path TEXT NOT NULL,
    source_case INTEGER,
    added TEXT NOT NULL
);
"""


def add_examples(archive: CaseArchive, files: list[CaseFile], duplicates=None) -> tuple[int, int, list[dict]]:
    """Store ``files`` as examples (the writer's; a file already there is skipped; with
    ``duplicates``, an :class:`~neurocbir.retrieval.ingest.DuplicateCheck`, one whose image the
    archive's cases already hold is left out and reported). Returns (added, already there,
    duplicates found)."""
    if duplicates is not None:
        kept = []
        for f in files:
            try:
                image = f.pixels()
            except (ValueError, OSError):  # kept as before: the app says so when it is opened
                kept.append(f)
                continue
            kept += [g for g, _ in duplicates.split([(f, "")], [image], remember=False)[0]]
        files = kept
    rows = [
        (f.key or sha256_file(f.path), int(f.label), str(f.path), f.source_case, time.strftime("%Y-%m-%dT%H:%M:%S"))
        for f in files
    ]
    archive.db.executescript(_SCHEMA)
    before = archive.db.total_changes
    archive.db.execute("BEGIN IMMEDIATE")
    try:
        archive.db.executemany(
            "INSERT OR IGNORE INTO examples (content_sha256, label, image_path, source_case, added) VALUES (?,?,?,?,?)",
            rows,
        )
        archive.db.execute("COMMIT")
    except BaseException:
        archive.db.execute("ROLLBACK")
        raise
    added = archive.db.total_changes - before
    return added, len(rows) - added, [] if duplicates is None else duplicates.found


def _rows(archive: CaseArchive, where: str = "", args: tuple = ()) -> list[tuple]:
    try:
        with archive._lock:
            return archive.db.execute(
                f"SELECT id, label, image_path FROM examples {where} ORDER BY id", args
            ).fetchall()
    except sqlite3.OperationalError:  # an archive made before examples existed, opened read-only
        return []


def list_examples(archive: CaseArchive, per_label: int = 4, seed: int = 0) -> list[dict]:
    """Up to ``per_label`` examples of each label (tumor types and no tumor), a fixed sample."""
    by_label: dict[int, list[int]] = {}
    for rid, label, _ in _rows(archive):
        by_label.setdefault(label, []).append(rid)
    rng = random.Random(seed)
    out = []
    for label in sorted(by_label):
        for rid in sorted(rng.sample(by_label[label], min(per_label, len(by_label[label])))):
            out.append({"case_id": EXAMPLE_ID_BASE + rid, "label": CASE_LABELS[label]})
    return out


def find_example(archive: CaseArchive, case_id: int) -> dict | None:
    """An example by its id: label and image path (None when there is none)."""
    if case_id < EXAMPLE_ID_BASE:
        return None
    rows = _rows(archive, "WHERE id = ?", (case_id - EXAMPLE_ID_BASE,))
    if not rows:
        return None
    _, label, path = rows[0]
    return {"case_id": case_id, "label": CASE_LABELS[label], "image_path": path}
