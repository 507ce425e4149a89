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

import threading
import time
from collections import OrderedDict, deque

LIMIT, WINDOW_S = 10, 60.0
MAX_KEYS = 10_000


def account_of(token: str) -> str | None:
    """The account an API token names (without checking it), or None."""
    parts = token.split("_") if token.startswith("ncb_") else []
    return f"user {parts[1]}" if len(parts) >= 3 and parts[1].isdigit() else None


class SignInThrottle:
    """``failed(client, account)`` after a failed sign-in; ``blocked(client, account)`` before one."""

    def __init__(self, limit: int = LIMIT, window_s: float = WINDOW_S, max_keys: int = MAX_KEYS, clock=time.monotonic):
        self.limit, self.window_s, self.max_keys, self.clock = limit, window_s, max_keys, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _keys(client: str | None, account: str | None) -> list[str]:
        return [k for k in (client and f"client {client}", account and f"account {account}") if k]

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        while times and now - times[0] >= self.window_s:
            times.popleft()
        if times is not None and not times:
            del self._failures[key]
            return None
        return times

    def blocked(self, client: str | None, account: str | None = None) -> bool:
        now = self.clock()
        with self._lock:
            return any(len(self._recent(k, now) or ()) >= self.limit for k in self._keys(client, account))

    def failed(self, client: str | None, account: str | None = None) -> None:
        now = self.clock()
        with self._lock:
            for key in self._keys(client, account):
                times = self._recent(key, now)
                if times is None:
                    times = self._failures[key] = deque(maxlen=self.limit)
                times.append(now)
                self._failures.move_to_end(key)
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._failures)

    def clear(self) -> None:
        with self._lock:
            self._failures.clear()
