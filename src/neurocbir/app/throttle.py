"""Failed sign-ins, counted per client and per account, so that guessing is slow and one mistyped
token never locks anybody else out.

A *client* is the peer's address, or, when the peer is a reverse proxy the operator named
(``serve --trusted-proxy``), the address it forwards in ``X-Forwarded-For`` (uvicorn's
:class:`~uvicorn.middleware.proxy_headers.ProxyHeadersMiddleware` does this; a header from any
other peer is ignored). An *account* is the user an API token names (``ncb_<id>_...``).

After :data:`LIMIT` failures within :data:`WINDOW_S` seconds a client or account gets 429 on
sign-in, until its failures age out. Only sign-in is throttled: a browser session and an API
token this server has already verified are never refused. The table forgets old failures and
holds at most :data:`MAX_KEYS` clients and accounts (the least recently failing go first).
"""

from __future__ import annotations

import time

from neurocbir.app.shared_state import SharedState

LIMIT, WINDOW_S = 10, 60.0
MAX_KEYS = 10_000


def account_of(token: str) -> str | None:
    """The account an API token names (without checking it), or None."""
    parts = token.split("_") if token.startswith("ncb_") else []
    return f"user {parts[1]}" if len(parts) >= 3 and parts[1].isdigit() else None


class SignInThrottle:
    """``failed(client, account)`` after a failed sign-in; ``blocked(client, account)`` before one.
    Counted in ``state`` (:class:`~neurocbir.app.shared_state.SharedState`), which every worker
    process of a server shares; in memory by default."""

    def __init__(
        self,
        limit: int = LIMIT,
        window_s: float = WINDOW_S,
        max_keys: int = MAX_KEYS,
        clock=time.time,
        state: SharedState | None = None,
    ):
        self.limit, self.window_s, self.max_keys, self.clock = limit, window_s, max_keys, clock
        self.state = state or SharedState()

    @staticmethod
    def _keys(client: str | None, account: str | None) -> list[str]:
        return [k for k in (client and f"client {client}", account and f"account {account}") if k]

    def blocked(self, client: str | None, account: str | None = None) -> bool:
        keys = self._keys(client, account)
        if not keys:
            return False
        rows = self.state.run(
            f"SELECT COUNT(*) FROM failures WHERE t > ? AND key IN ({','.join('?' * len(keys))}) GROUP BY key",
            (self.clock() - self.window_s, *keys),
        )
        return any(n >= self.limit for (n,) in rows)

    def failed(self, client: str | None, account: str | None = None) -> None:
        now = self.clock()
        self.state.transaction(
            [("INSERT INTO failures VALUES (?, ?)", (key, now)) for key in self._keys(client, account)]
            + [
                ("DELETE FROM failures WHERE t <= ?", (now - self.window_s,)),
                (  # the least recently failing clients and accounts go first
                    "DELETE FROM failures WHERE key IN (SELECT key FROM failures GROUP BY key ORDER BY MAX(t) "
                    "LIMIT max(0, (SELECT COUNT(DISTINCT key) FROM failures) - ?))",
                    (self.max_keys,),
                ),
            ]
        )

    def __len__(self) -> int:
        return int(self.state.run("SELECT COUNT(DISTINCT key) FROM failures")[0][0])

    def clear(self) -> None:
        self.state.run("DELETE FROM failures")
