"""Users and their API tokens, in ``auth.db`` beside the served run or archive (as ``feedback.db``).

A token is shown once, when a user is added or rotated (``neurocbir users add|rotate``); only its
argon2 hash is stored (argon2-cffi). A token names its user's row (``ncb_<id>_<secret>``), so a
sign-in verifies one hash, in constant time; a verified token is then remembered in memory (by its
SHA-256) until the user is removed or rotated, so the slow hash is paid once per token and process,
not per request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from neurocbir.errors import InvalidInput

FILE = "auth.db"
#: who may do what grows with the role (see neurocbir.app.access.RULES)
ROLES = ("reader", "clinician", "curator", "admin")
NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    created TEXT NOT NULL,
    rotated TEXT
);
"""


class UserError(InvalidInput):
    """A user cannot be added, found or changed as asked."""


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a name, a role, and how they signed in (token, oidc, session)."""

    name: str
    role: str
    via: str

    def may(self, role: str) -> bool:
        return self.role in ROLES and ROLES.index(self.role) >= ROLES.index(role)


class UserStore:
    """The users of one served run or archive (SQLite, WAL)."""

    def __init__(self, path: Path | str):
        from argon2 import PasswordHasher

        self.path = Path(path)
        self.hasher = PasswordHasher()
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path} is not a readable user database ({exc})") from None
        self._lock = threading.Lock()
        self._verified: dict[bytes, tuple[int, int]] = {}  # sha256(token) -> (user id, generation)

    @classmethod
    def beside(cls, folder: Path | str) -> UserStore:
        return cls(Path(folder) / FILE)

    def _new_token(self, user_id: int) -> tuple[str, str]:
        token = f"ncb_{user_id}_{secrets.token_urlsafe(32)}"
        return token, self.hasher.hash(token)

    def add(self, name: str, role: str) -> str:
        """Create a user; returns their token (shown once, never stored)."""
        if not NAME.match(name or ""):
            raise UserError(f"user name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-'")
        if role not in ROLES:
            raise UserError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._lock:
            try:
                cur = self.db.execute(
                    "INSERT INTO users (name, role, token_hash, created) VALUES (?, ?, '', ?)", (name, role, now)
                )
            except sqlite3.IntegrityError:
                raise UserError(f"user {name!r} exists: `neurocbir users rotate {name}` gives a new token") from None
            token, digest = self._new_token(int(cur.lastrowid))
            self.db.execute("UPDATE users SET token_hash = ? WHERE id = ?", (digest, cur.lastrowid))
        return token

    def rotate(self, name: str) -> str:
        """A new token for ``name``; the old one stops working at once (in every process)."""
        with self._lock:
            row = self.db.execute("SELECT id FROM users WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise UserError(f"no user {name!r}")
            token, digest = self._new_token(int(row[0]))
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.db.execute(
                "UPDATE users SET token_hash = ?, generation = generation + 1, rotated = ? WHERE id = ?",
                (digest, now, row[0]),
            )
        return token

    def remove(self, name: str) -> bool:
        with self._lock:
            return self.db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0

    def list(self) -> list[dict]:
        with self._lock:
            rows = self.db.execute("SELECT name, role, created, rotated FROM users ORDER BY name").fetchall()
        return [{"name": n, "role": r, "created": c, "rotated": rot} for n, r, c, rot in rows]

    def count(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM users").fetchone()[0])

    def verified_before(self, token: str) -> bool:
        """Whether this process has verified this token already (it may since have been revoked:
        :meth:`authenticate` still decides)."""
        return hashlib.sha256(token.encode()).digest() in self._verified

    def authenticate(self, token: str) -> Principal | None:
        """The user whose token this is, or None (unknown, malformed, rotated or removed)."""
        parts = token.split("_") if token.startswith("ncb_") else []
        if len(parts) < 3 or not parts[1].isdigit():
            return None
        user_id = int(parts[1])
        with self._lock:
            row = self.db.execute(
                "SELECT name, role, token_hash, generation FROM users WHERE id = ?", (user_id,)
            ).fetchone()
        if row is None:
            return None
        name, role, digest, generation = row
        key = hashlib.sha256(token.encode()).digest()
        known = self._verified.get(key)
        if known is not None and hmac.compare_digest(repr(known).encode(), repr((user_id, generation)).encode()):
            return Principal(name, role, "token")
        from argon2.exceptions import InvalidHashError, VerificationError

        try:
            self.hasher.verify(digest, token)
        except (VerificationError, InvalidHashError):
            return None
        self._verified[key] = (user_id, generation)
        return Principal(name, role, "token")

    def close(self) -> None:
        self.db.close()
