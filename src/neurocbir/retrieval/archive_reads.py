"""What a served archive reads: the columns every query needs in memory, cases by id, vectors and
near-duplicate prints (the reading half of :class:`neurocbir.retrieval.archive.CaseArchive`)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from neurocbir.data.cases import CASE_LABELS
from neurocbir.retrieval.duplicates import SIDE
from neurocbir.retrieval.store import group_keys

#: the coarse fingerprint at the start of a stored print (float16: 2 bytes a value)
COARSE_BYTES = 2 * SIDE * SIDE
#: What the app reads of every case at start, in narrow indexes of their own (named in
#: READ_INDEX_NAMES): a case's row is kilobytes wide (its trunk descriptor, its print), so without
#: them those reads walk the whole table. At a million cases a warm start reads the prints in 3-5 s
#: with them, 10-11 s without (docs/results.md app-scale-milvus); a cold start stays bound by its
#: disk reads either way. The writer (``neurocbir add``) makes them, on an older archive at its next add.
READ_INDEX_NAMES = ("cases_columns", "cases_coarse_prints", "cases_without_trunk")
READ_INDEXES = f"""
CREATE INDEX IF NOT EXISTS cases_columns ON cases(state, id, label, patient_key, plane, area_mm2);
CREATE INDEX IF NOT EXISTS cases_coarse_prints ON cases(id, state, substr(fingerprint, 1, {COARSE_BYTES}))
    WHERE fingerprint IS NOT NULL;
CREATE INDEX IF NOT EXISTS cases_without_trunk ON cases(state) WHERE trunk IS NULL;
"""


def _columns(rows: list[tuple]) -> dict[str, np.ndarray]:
    """id, label, patient_key, plane, area (NaN where unknown) from rows that begin with them."""
    return {
        "id": np.array([r[0] for r in rows], dtype=np.int64),
        "label": np.array([r[1] for r in rows], dtype=np.int64),
        "patient_key": np.array([r[2] for r in rows]),
        "plane": np.array([r[3] or "" for r in rows]),
        "area_mm2": np.array([np.nan if r[4] is None else r[4] for r in rows], dtype=float),
    }


class ArchiveReads:
    """Reading the ``cases`` table (``db``, guarded by ``_lock`` where the app reads from several threads)."""

    db: sqlite3.Connection
    dim: int
    _lock: threading.RLock

    def _vectors(self, where: str, chunk: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(ids, embeddings, store partition keys) of the cases ``where`` says, in chunks."""
        cur = self.db.execute(f"SELECT id, embedding, label, plane FROM cases WHERE {where} ORDER BY id")
        while rows := cur.fetchmany(chunk):
            yield (
                np.array([r[0] for r in rows], dtype=np.int64),
                np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows]),
                group_keys(np.array([r[2] for r in rows]), np.array([r[3] or "" for r in rows])),
            )

    def fingerprints(
        self, width: int, chunk: int = 50_000, after_id: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, the first ``width`` values of each stored print: the coarse fingerprint) of the
        cases that have one (float32, one row each; ids above ``after_id``), ``chunk`` cases at a time."""
        # only the coarse part leaves SQLite (float16: 2 bytes a value), read as one buffer a chunk:
        # at a million cases 3 s, where whole prints made an array a row took 8 s
        cur = self.db.execute(  # the length written out: so the query reads the expression's index (READ_INDEXES)
            f"SELECT id, substr(fingerprint, 1, {2 * int(width)}) FROM cases "
            "WHERE id > ? AND state != 'deleting' AND fingerprint IS NOT NULL ORDER BY id",
            (int(after_id),),
        )
        while rows := cur.fetchmany(chunk):
            coarse = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float16).reshape(len(rows), width)
            yield np.array([r[0] for r in rows], dtype=np.int64), coarse.astype(np.float32)

    def n_prints(self) -> int:
        """How many cases :meth:`fingerprints` gives."""
        return self.db.execute(
            "SELECT COUNT(*) FROM cases WHERE state != 'deleting' AND fingerprint IS NOT NULL"
        ).fetchone()[0]

    def stored_prints(self, case_ids: list[int]) -> np.ndarray:
        """The whole stored print of each case (float32, in the order asked)."""
        q = f"SELECT id, fingerprint FROM cases WHERE id IN ({','.join('?' * len(case_ids))})"
        with self._lock:
            found = {
                r[0]: np.frombuffer(r[1], dtype=np.float16) for r in self.db.execute(q, [int(c) for c in case_ids])
            }
        return np.stack([found[int(c)] for c in case_ids]).astype(np.float32)

    def columns(
        self, code: Callable[[np.ndarray], np.ndarray] | None = None, chunk: int = 50_000
    ) -> dict[str, np.ndarray]:
        """id, label, patient_key, plane and area of every indexed case (what NIR and the
        retrieval filters need in memory; area NaN where unknown), read ``chunk`` cases at a time
        (never a Python object per case for all of them at once); ``code``: patient keys -> the
        numbers kept instead (e.g. int32: a million 32-character keys are 130 MB as text)."""
        cur = self.db.execute(
            "SELECT id, label, patient_key, plane, area_mm2 FROM cases WHERE state = 'indexed' ORDER BY id"
        )
        parts = []
        while rows := cur.fetchmany(chunk):
            part = _columns(rows)
            if code is not None:
                part["patient_key"] = code(part["patient_key"])
            parts.append(part)
        if not parts:
            return _columns([])
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def cases(self, case_ids: Iterable[int]) -> dict[int, dict]:
        ids = [int(i) for i in case_ids]
        out = {}
        for b in range(0, len(ids), 500):
            chunk = ids[b : b + 500]
            q = (
                f"SELECT id, label, plane, area_mm2, image_path, source_case, report FROM cases "
                f"WHERE state = 'indexed' AND id IN ({','.join('?' * len(chunk))})"
            )
            with self._lock:  # the app reads from several threads
                rows = self.db.execute(q, chunk).fetchall()
            for r in rows:
                out[r[0]] = {
                    "case_id": r[0],
                    "label": CASE_LABELS[r[1]],
                    "plane": r[2] or None,
                    "area_mm2": None if r[3] is None else round(r[3], 2),
                    "image_path": r[4],
                    "source_case": r[5],
                    "report": r[6],
                }
        return out

    def trunk_sample(self, limit: int, chunk: int = 5_000) -> dict[str, np.ndarray] | None:
        """At most ``limit`` indexed cases with their trunk descriptors, labels and patient keys:
        every one in an archive that size or smaller; else a fixed spread of them (ordered by a
        hash of the id, so the same cases each time and an added case joins by its hash). None
        when some indexed case has no descriptor (an archive made before they were stored)."""
        with self._lock:
            missing = self.db.execute(
                "SELECT COUNT(*) FROM cases WHERE state = 'indexed' AND trunk IS NULL"
            ).fetchone()[0]
            if missing:
                return None
            ids = [
                r[0]
                for r in self.db.execute(
                    "SELECT id FROM cases WHERE state = 'indexed' ORDER BY (id * 2654435761) % 4294967296 LIMIT ?",
                    (int(limit),),
                )
            ]
            parts = []  # each chunk's rows made arrays at once: never every descriptor as a Python object
            for b in range(0, len(ids), chunk):
                part = ids[b : b + chunk]
                q = f"SELECT id, label, patient_key, trunk FROM cases WHERE id IN ({','.join('?' * len(part))})"
                rows = self.db.execute(q, part).fetchall()
                parts.append(
                    {
                        "id": np.array([r[0] for r in rows], dtype=np.int64),
                        "label": np.array([r[1] for r in rows], dtype=np.int64),
                        "patient_key": np.array([r[2] for r in rows]),
                        "trunk": np.stack([np.frombuffer(r[3], dtype=np.float32) for r in rows]),
                    }
                )
                del rows
        if not parts:
            return None
        order = np.argsort(np.concatenate([p["id"] for p in parts]), kind="stable")
        return {key: np.concatenate([p[key] for p in parts])[order] for key in parts[0]}

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self._vectors("state = 'indexed'"))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def indexed_after(self, last_id: int, width: int) -> tuple[dict[str, np.ndarray], int]:
        """(the indexed cases with an id above ``last_id``: the columns of :meth:`columns`, their
        ``embedding`` and the first ``width`` values of their ``fingerprint`` (NaN rows: none kept),
        how many indexed cases have an id up to ``last_id``), read in one snapshot: what `add`
        committed since a view loaded, and whether any case of that view was removed meanwhile."""
        with self._lock:
            self.db.execute("BEGIN")
            try:
                rows = self.db.execute(
                    "SELECT id, label, patient_key, plane, area_mm2, embedding, fingerprint FROM cases "
                    "WHERE state = 'indexed' AND id > ? ORDER BY id",
                    (int(last_id),),
                ).fetchall()
                kept = self.db.execute(
                    "SELECT COUNT(*) FROM cases WHERE state = 'indexed' AND id <= ?", (int(last_id),)
                ).fetchone()[0]
            finally:
                self.db.execute("COMMIT")
        no_print = np.full(width, np.nan, np.float32)
        return {
            **_columns(rows),
            "embedding": np.stack([np.frombuffer(r[5], np.float32) for r in rows]) if rows else np.zeros((0, self.dim)),
            "fingerprint": np.stack(
                [no_print if r[6] is None else np.frombuffer(r[6], np.float16)[:width].astype(np.float32) for r in rows]
            )
            if rows
            else np.zeros((0, width), np.float32),
        }, int(kept)
