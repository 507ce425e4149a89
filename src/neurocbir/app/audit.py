"""The audit trail: who saw what. One row per request that reads or changes case data, and per
refused request: time (UTC), user, role, method, route, status, the case ids returned or touched,
and the query's pixel fingerprint; never image content, report text or patient data.

Append-only, in ``audit.db`` beside the served run or archive: each row carries the SHA-256 of the
previous row's hash and its own fields, so an edited, inserted or deleted row breaks the chain and
``neurocbir audit verify`` names the first row that does not follow. A row is committed before the
response leaves (WAL; synchronous=FULL: it survives a power cut), and a request whose row cannot be
written fails: no unaudited reads.
"""

from __future__ import annotations

import csv
import hashlib
import io
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

FILE = "audit.db"
GENESIS = "0" * 64
FIELDS = ("time", "user", "role", "method", "route", "status", "case_ids", "fingerprint")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    user TEXT NOT NULL,
    role TEXT NOT NULL,
    method TEXT NOT NULL,
    route TEXT NOT NULL,
    status INTEGER NOT NULL,
    case_ids TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
"""


class AuditError(RuntimeError):
    """The audit trail cannot be written (the request it records must fail)."""


@dataclass
class Entry:
    user: str
    role: str
    method: str
    route: str
    status: int
    case_ids: list[int] = field(default_factory=list)
    fingerprint: str = ""


def row_hash(prev: str, values: tuple) -> str:
    return hashlib.sha256("\x1f".join([prev, *map(str, values)]).encode()).hexdigest()


class AuditLog:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise AuditError(f"{self.path} is not a readable audit trail ({exc})") from None
        self._lock = threading.Lock()

    @classmethod
    def beside(cls, folder: Path | str) -> AuditLog:
        return cls(Path(folder) / FILE)

    def append(self, e: Entry) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        values = (now, e.user, e.role, e.method, e.route, int(e.status), ",".join(map(str, e.case_ids)), e.fingerprint)
        try:
            with self._lock:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    last = self.db.execute("SELECT hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
                    prev = last[0] if last else GENESIS
                    self.db.execute(
                        f"INSERT INTO audit ({', '.join(FIELDS)}, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (*values, prev, row_hash(prev, values)),
                    )
                    self.db.execute("COMMIT")
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise AuditError(f"the audit trail {self.path} cannot be written ({exc})") from None

    def verify(self) -> tuple[bool, int, int | None]:
        """(intact, rows, the id of the first row that breaks the chain or None)."""
        prev, n = GENESIS, 0
        with self._lock:
            rows = self.db.execute(f"SELECT id, {', '.join(FIELDS)}, prev_hash, hash FROM audit ORDER BY id").fetchall()
        for row in rows:
            n += 1
            rid, values, stored_prev, stored = row[0], row[1:-2], row[-2], row[-1]
            if stored_prev != prev or row_hash(prev, values) != stored:
                return False, n, rid
            prev = stored
        return True, n, None

    def export_csv(self, since: str | None = None) -> str:
        """Every row (from ``since``, an ISO date or time, UTC), oldest first, as CSV."""
        where, args = ("WHERE time >= ?", (since,)) if since else ("", ())
        with self._lock:
            rows = self.db.execute(
                f"SELECT id, {', '.join(FIELDS)}, hash FROM audit {where} ORDER BY id", args
            ).fetchall()
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["id", *FIELDS, "hash"])
        w.writerows(rows)
        return buf.getvalue()

    def close(self) -> None:
        self.db.close()
