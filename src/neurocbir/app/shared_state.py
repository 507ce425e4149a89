"""Short-lived state that every worker process of one server shares: sign-in sessions, failed
sign-ins (the throttle's counts) and the identity provider's sign-ins in progress.

With several workers (``neurocbir serve --workers N``) a browser's requests reach any of them: a
session made by one must be known to the others, and failed sign-ins must be counted across them
(else N workers allow N times the guesses). One SQLite file (WAL, ``access.db`` beside the users)
holds them; without one (a server nobody signs in to, or tests) the same tables live in memory.
Session ids are stored only as hashes.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

FILE = "access.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (key TEXT PRIMARY KEY, name TEXT, role TEXT, via TEXT, expires REAL);
CREATE TABLE IF NOT EXISTS failures (key TEXT NOT NULL, t REAL NOT NULL);
CREATE INDEX IF NOT EXISTS failures_key ON failures(key, t);
CREATE TABLE IF NOT EXISTS pending (state TEXT PRIMARY KEY, verifier TEXT, nonce TEXT, started REAL);
"""


class SharedState:
    """The tables, one connection per process, guarded by a lock (the app's threads share it)."""

    def __init__(self, path: Path | str | None = None):
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch(mode=0o600, exist_ok=True)
        self.db = sqlite3.connect(
            ":memory:" if self.path is None else self.path, isolation_level=None, timeout=30, check_same_thread=False
        )
        if self.path is not None:
            self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)
        self.lock = threading.Lock()

    def run(self, sql: str, args=()) -> list[tuple]:
        """One statement, its rows (autocommitted)."""
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def transaction(self, statements: list[tuple[str, tuple]]) -> list[list[tuple]]:
        """Statements in one write transaction (other processes wait for it), each one's rows."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                out = [self.db.execute(sql, args).fetchall() for sql, args in statements]
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            return out
