"""The audit trail: who saw what. One row per request that reads or changes case data, and per
refused request: time (UTC), user, role, method, route, status, the case ids returned or touched,
and the query's pixel fingerprint; never image content, report text or patient data.

Append-only, in ``audit.db`` beside the served run or archive. Tampering is detectable without
trusting that file:

* every row carries an HMAC-SHA256, under a key kept outside the database (``audit.key``, created
  with mode 0600 the first time the trail is opened; a key readable by others is refused), of the
  previous row's MAC, its own id and its fields: an edited row, a deleted row and a chain rewritten
  without the key all fail;
* the newest row is anchored in ``audit.head`` beside the key (its id and MAC, itself MACed), so a
  deleted newest row or a truncated tail is named too. Put the key (and with it the anchor) on
  another volume than the database with ``serve --audit-key PATH``.

``neurocbir audit verify`` names each problem. A row is committed before the response leaves (WAL;
synchronous=FULL), and a request whose row cannot be written fails: no unaudited reads. Several
server processes may append to one trail (SQLite's write lock orders them; the anchor only moves
forward, under a file lock).
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import hmac
import io
import json
import os
import secrets
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from neurocbir.errors import Unavailable

FILE = "audit.db"
KEY_FILE = "audit.key"
HEAD_FILE = "audit.head"
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
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class AuditError(Unavailable):
    """The audit trail cannot be written or read (a request it would record must fail)."""


@dataclass
class Entry:
    user: str
    role: str
    method: str
    route: str
    status: int
    case_ids: list[int] = field(default_factory=list)
    fingerprint: str = ""


@dataclass
class Verdict:
    """What ``verify`` found: ``intact``, the rows read, and each problem (with the first bad row id)."""

    intact: bool
    rows: int
    problems: list[str]
    first_bad: int | None = None

    def __iter__(self):  # (intact, rows, first bad row): the older tuple form
        return iter((self.intact, self.rows, self.first_bad))

    def __getitem__(self, i):
        return tuple(self)[i]


def row_hash(prev: str, values: tuple) -> str:
    """The unkeyed SHA-256 chain of trails written before the key existed."""
    return hashlib.sha256("\x1f".join([prev, *map(str, values)]).encode()).hexdigest()


def row_mac(key: bytes, prev: str, row_id: int, values: tuple) -> str:
    return hmac.new(key, "\x1f".join([prev, str(row_id), *map(str, values)]).encode(), hashlib.sha256).hexdigest()


def load_key(path: Path, create: bool) -> bytes:
    """The trail's key (32 random bytes, hex): created with mode 0600 when ``create``; refused when
    others may read it."""
    path = Path(path)
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except FileExistsError:
            pass  # another process created it meanwhile
    if not path.is_file():
        raise AuditError(f"the audit key {path} is missing: without it the trail cannot be written or checked")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise AuditError(f"the audit key {path} may be read by others (mode {mode:o}): run `chmod 600 {path}`")
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        key = b""
    if len(key) < 16:
        raise AuditError(f"the audit key {path} is not a key written by neurocbir")
    return key


def _ranges(problems: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Consecutive edited rows as one range: a chain rewritten without the key fails on every row."""
    out: list[tuple[int, str]] = []
    run: list[int] = []

    def flush() -> None:
        if len(run) > 2:
            out.append(
                (run[0], f"rows {run[0]}..{run[-1]} fail their MAC (edited, or the chain rewritten without the key)")
            )
        else:
            out.extend((r, f"row {r} was edited (its MAC does not match its fields)") for r in run)
        run.clear()

    for rid, text in sorted(problems, key=lambda p: p[0]):
        if "was edited" in text and (not run or rid == run[-1] + 1):
            run.append(rid)
            continue
        flush()
        if "was edited" in text:
            run.append(rid)
        else:
            out.append((rid, text))
    flush()
    return out


class AuditLog:
    def __init__(self, path: Path | str, key_path: Path | str | None = None, create_key: bool = True):
        self.path = Path(path)
        self.key_path = Path(key_path) if key_path is not None else self.path.parent / KEY_FILE
        self.head_path = self.key_path.parent / HEAD_FILE
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise AuditError(f"{self.path} is not a readable audit trail ({exc})") from None
        self._lock = threading.Lock()
        keyed = self._meta("keyed_from")
        self.key = load_key(self.key_path, create=create_key and keyed is None)
        if keyed is None:
            self._start_keyed_chain()

    @classmethod
    def beside(cls, folder: Path | str, key_path: Path | str | None = None) -> AuditLog:
        return cls(Path(folder) / FILE, key_path)

    def _meta(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM audit_meta WHERE key = ?", (name,)).fetchone()
        return row[0] if row else None

    def _start_keyed_chain(self) -> None:
        """Rows written before the key (older versions) stay checkable as the unkeyed chain; the
        keyed chain starts after them, and where it starts is itself MACed."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if self._meta("keyed_from") is None:
                last = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM audit").fetchone()[0]
                start = str(int(last) + 1)
                self.db.execute("INSERT INTO audit_meta VALUES ('keyed_from', ?)", (start,))
                self.db.execute("INSERT INTO audit_meta VALUES ('keyed_from_mac', ?)", (self._mac_text("from", start),))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _mac_text(self, *parts: str) -> str:
        return hmac.new(self.key, "\x1f".join(parts).encode(), hashlib.sha256).hexdigest()

    # --- writing ------------------------------------------------------------------------------
    def append(self, e: Entry) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        values = (now, e.user, e.role, e.method, e.route, int(e.status), ",".join(map(str, e.case_ids)), e.fingerprint)
        try:
            with self._lock:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    last = self.db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
                    row_id, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
                    mac = row_mac(self.key, prev, row_id, values)
                    self.db.execute(
                        f"INSERT INTO audit (id, {', '.join(FIELDS)}, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (row_id, *values, prev, mac),
                    )
                    self.db.execute("COMMIT")
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                self._anchor(row_id, mac)
        except (sqlite3.Error, OSError) as exc:
            raise AuditError(f"the audit trail {self.path} cannot be written ({exc})") from None

    def _anchor(self, row_id: int, mac: str) -> None:
        """Move the anchor forward to this row (never back: another process may be ahead)."""
        with open(self.head_path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            head = self._read_head()
            if head is not None and head[0] >= row_id:
                return
            tmp = self.head_path.with_suffix(f".tmp{os.getpid()}")
            text = json.dumps({"id": row_id, "hash": mac, "mac": self._mac_text("head", str(row_id), mac)})
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self.head_path)

    def _read_head(self) -> tuple[int, str, str] | None:
        try:
            h = json.loads(self.head_path.read_text())
            return int(h["id"]), str(h["hash"]), str(h["mac"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return (-1, "", "")  # unreadable: verify says so

    # --- checking -----------------------------------------------------------------------------
    def verify(self) -> Verdict:
        """Every row against the key and the anchor: edited rows, deleted rows (the newest
        included), a truncated tail and a chain rewritten without the key are each named."""
        with self._lock:
            rows = self.db.execute(f"SELECT id, {', '.join(FIELDS)}, prev_hash, hash FROM audit ORDER BY id").fetchall()
            keyed_from, keyed_mac = self._meta("keyed_from"), self._meta("keyed_from_mac")
        problems: list[tuple[int, str]] = []
        if keyed_from is None or not hmac.compare_digest(keyed_mac or "", self._mac_text("from", keyed_from)):
            return Verdict(False, len(rows), ["where the keyed chain starts was edited (audit_meta)"], 1)
        start = int(keyed_from)
        prev, expected = GENESIS, 1
        for row in rows:
            rid, values, stored_prev, stored = row[0], row[1:-2], row[-2], row[-1]
            if rid > expected:
                problems.append(
                    (
                        expected,
                        f"rows {expected}..{rid - 1} were deleted"
                        if rid - 1 > expected
                        else f"row {expected} was deleted",
                    )
                )
            if rid < start:
                ok = row_hash(prev, values) == stored  # written before the key: edits show, a rewrite does not
            else:
                ok = hmac.compare_digest(row_mac(self.key, stored_prev, rid, values), stored)
            if not ok:
                problems.append((rid, f"row {rid} was edited (its MAC does not match its fields)"))
            elif stored_prev != prev and rid == expected:
                problems.append((rid, f"row {rid} does not follow row {rid - 1} (rows were replaced)"))
            prev, expected = stored, rid + 1
        if any(r[0] >= start for r in rows):
            problems += [(expected, p) for p in self._check_head(rows, expected)]
        problems = _ranges(problems)
        if problems:
            problems.sort(key=lambda p: p[0])
            return Verdict(False, len(rows), [p for _, p in problems], problems[0][0])
        return Verdict(True, len(rows), [])

    def _check_head(self, rows, expected: int) -> list[str]:
        head = self._read_head()
        if head is None:
            return [f"the anchor of the newest row ({self.head_path}) is missing"]
        hid, hhash, hmac_ = head
        if hid < 0 or not hmac.compare_digest(hmac_, self._mac_text("head", str(hid), hhash)):
            return [f"the anchor {self.head_path} was edited"]
        if hid >= expected:
            return [
                f"the newest rows {expected}..{hid} were deleted (the trail was truncated)"
                if hid > expected
                else f"the newest row {hid} was deleted"
            ]
        by_id = {r[0]: r[-1] for r in rows}
        if by_id.get(hid) != hhash:
            return [f"row {hid}, the anchored newest row, was replaced"]
        return []

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
