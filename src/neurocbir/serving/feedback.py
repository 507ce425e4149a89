"""Clinician feedback on retrievals (the paper's future work): "relevant" / "not relevant"
marks on retrieved cases, stored durably in SQLite with the time and a fingerprint of the query
scan (a hash of its pixels: no patient data), exportable as CSV, and usable to re-rank.

Re-ranking: a case's feedback score is (relevant - not relevant) / (marks + 1), in (-1, 1);
retrievals are re-ordered by ``distance x (1 - RERANK_WEIGHT x score)``, so cases clinicians
marked relevant move up and those marked not relevant move down. The weight was fixed before
any measurement (``benchmarks/feedback_rerank.py`` measures it with simulated raters).
"""

from __future__ import annotations

import csv
import hashlib
import io
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

from neurocbir.errors import ConfigurationError, InvalidInput

RERANK_WEIGHT = 0.5
FILE = "feedback.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    query_fingerprint TEXT NOT NULL,
    case_id INTEGER NOT NULL,
    relevant INTEGER NOT NULL CHECK (relevant IN (0, 1)),
    user TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS feedback_case ON feedback(case_id);
"""


def fingerprint(image: np.ndarray) -> str:
    """A scan's fingerprint: the SHA-256 of its pixels (first 32 hex digits); nothing else of it."""
    arr = np.ascontiguousarray(image, dtype=np.float32)
    return hashlib.sha256(str(arr.shape).encode() + arr.tobytes()).hexdigest()[:32]


class FeedbackStore:
    """One SQLite file (WAL, synchronous=FULL: a mark, once acknowledged, survives a crash)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(feedback)")}
            if "user" not in columns:  # a database made before marks named their user
                self.db.execute("ALTER TABLE feedback ADD COLUMN user TEXT NOT NULL DEFAULT ''")
        except sqlite3.DatabaseError as exc:
            raise ConfigurationError(f"{self.path} is not a readable feedback database ({exc})") from None
        self._lock = threading.Lock()

    def add(self, query_fingerprint: str, case_id: int, relevant: bool, user: str = "") -> int:
        if not (len(query_fingerprint) == 32 and all(c in "0123456789abcdef" for c in query_fingerprint)):
            raise InvalidInput("query_fingerprint must be the 32-hex-digit fingerprint that /query returned")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._lock:
            cur = self.db.execute(
                "INSERT INTO feedback (time, query_fingerprint, case_id, relevant, user) VALUES (?, ?, ?, ?, ?)",
                (now, query_fingerprint, int(case_id), int(bool(relevant)), user),
            )
            return int(cur.lastrowid)

    def scores(self, case_ids: list[int] | None = None) -> dict[int, float]:
        """Feedback score per case that has marks: (relevant - not relevant) / (marks + 1)."""
        with self._lock:
            rows = self.db.execute("SELECT case_id, SUM(relevant), COUNT(*) FROM feedback GROUP BY case_id").fetchall()
        wanted = None if case_ids is None else {int(c) for c in case_ids}
        return {int(c): (2 * int(r) - int(n)) / (int(n) + 1) for c, r, n in rows if wanted is None or int(c) in wanted}

    def rerank(self, case_ids: np.ndarray, distances: np.ndarray) -> np.ndarray:
        """The order (indices into ``case_ids``) after feedback; unmarked cases keep their distance."""
        s = self.scores([int(c) for c in case_ids])
        adjusted = np.array([d * (1 - RERANK_WEIGHT * s.get(int(c), 0.0)) for c, d in zip(case_ids, distances)])
        return np.argsort(adjusted, kind="stable")

    def export_csv(self) -> str:
        with self._lock:
            rows = self.db.execute(
                "SELECT id, time, query_fingerprint, case_id, relevant, user FROM feedback ORDER BY id"
            ).fetchall()
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["id", "time", "query_fingerprint", "case_id", "relevant", "user"])
        w.writerows(rows)
        return buf.getvalue()

    def count(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0])

    def close(self) -> None:
        self.db.close()
