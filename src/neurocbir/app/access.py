"""Who may see what: every route's rule, sign-in (API tokens, the identity provider's JWTs, a
browser session), the audit trail of every data request, and the security headers, as one ASGI
middleware in front of the app.

Access control is on as soon as users (``neurocbir users add``) or an identity provider
(``serve --oidc-issuer``) are configured. Then every route but the public ones (the health check,
the page shell, its script, the API docs and the sign-in steps) answers 401 without valid
credentials and 403 for a role below the route's. Roles grow: reader (query, cases, images,
similarity, summary, ask, examples, the PACS proxy), clinician (+ feedback), curator (+ changing
the archive, were it exposed over HTTP), admin (+ feedback and audit export, users). A route with no
rule is refused to everyone but admins, and a test fails on it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field

from neurocbir.app.audit import AuditError, AuditLog, Entry
from neurocbir.app.shared_state import SharedState
from neurocbir.app.throttle import SignInThrottle, account_of
from neurocbir.app.users import Principal, UserStore

PUBLIC = "public"
#: (method, route path) -> the least role that may call it, or PUBLIC
RULES: dict[tuple[str, str], str] = {
    ("GET", "/health"): PUBLIC,
    ("GET", "/"): PUBLIC,
    ("GET", "/static"): PUBLIC,  # the page's script and styles (no data)
    ("GET", "/docs"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/static-offline-docs"): PUBLIC,
    ("GET", "/auth/config"): PUBLIC,
    ("GET", "/auth/login"): PUBLIC,
    ("GET", "/auth/callback"): PUBLIC,
    ("POST", "/auth/session"): PUBLIC,
    ("POST", "/auth/logout"): PUBLIC,
    ("GET", "/auth/me"): "reader",
    ("POST", "/query"): "reader",
    ("POST", "/query/study"): "reader",
    ("POST", "/similarity"): "reader",
    ("GET", "/pacs/image.png"): "reader",
    ("GET", "/cases/{case_id}"): "reader",
    ("GET", "/cases/{case_id}/image.png"): "reader",
    ("GET", "/cases/{case_id}/mask.png"): "reader",
    ("GET", "/examples"): "reader",
    ("POST", "/summary"): "reader",
    ("POST", "/ask"): "reader",
    ("POST", "/feedback"): "clinician",
    ("GET", "/feedback.csv"): "admin",
    ("GET", "/audit.csv"): "admin",
    ("GET", "/users"): "admin",
}
ANONYMOUS = Principal("anonymous", "admin", "none")  # access control off: the loopback default
SESSION_COOKIE = "neurocbir_session"
SESSION_TTL_S = 8 * 3600
#: no inline script and no other origin; styles may be inline (the page's <style>, Swagger UI's)
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


def rule_for(method: str, path: str) -> str | None:
    """The rule of a route template (mounted static files by their prefix); None if it has none."""
    if (method, path) in RULES:
        return RULES[(method, path)]
    if method == "HEAD":
        return rule_for("GET", path)
    for (m, p), rule in RULES.items():
        if m == method and p in ("/static", "/static-offline-docs") and path.startswith(p + "/"):
            return rule
    return None


@dataclass
class AccessControl:
    """Everything the middleware needs: the users, the provider, the audit trail, the sign-in
    throttle and the reverse proxies whose ``X-Forwarded-For`` names the client."""

    users: UserStore | None = None
    oidc: object | None = None  # neurocbir.app.oidc.OIDC
    audit: AuditLog | None = None
    #: sessions, failed sign-ins, pending provider sign-ins: shared by the server's worker processes
    state: SharedState = field(default_factory=SharedState)
    throttle: SignInThrottle | None = None  # default: counted in ``state``
    trusted_proxies: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.throttle is None:
            self.throttle = SignInThrottle(state=self.state)

    @property
    def enabled(self) -> bool:
        return self.oidc is not None or (self.users is not None and self.users.count() > 0)

    @property
    def mode(self) -> str:
        return "oidc" if self.oidc is not None else "token" if self.enabled else "none"

    # --- credentials ------------------------------------------------------------------------
    def from_bearer(self, token: str) -> Principal | None:
        if token.startswith("ncb_"):
            return self.users.authenticate(token) if self.users is not None else None
        if self.oidc is not None and token.count(".") == 2:
            from neurocbir.app.oidc import OIDCError

            try:
                return self.oidc.principal(token)
            except OIDCError:
                return None
        return None

    def new_session(self, who: Principal, expires: float | None = None) -> str:
        sid, now = secrets.token_urlsafe(32), time.time()
        key = hashlib.sha256(sid.encode()).hexdigest()
        until = min(expires or 1e18, now + SESSION_TTL_S)
        self.state.transaction(
            [
                ("DELETE FROM sessions WHERE expires <= ?", (now,)),
                ("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)", (key, who.name, who.role, who.via, until)),
            ]
        )
        return sid

    def from_session(self, sid: str) -> Principal | None:
        key = hashlib.sha256(sid.encode()).hexdigest()
        found = self.state.run("SELECT name, role, via, expires FROM sessions WHERE key = ?", (key,))
        if not found or found[0][3] < time.time():
            return None
        who = Principal(*found[0][:3])
        if who.via == "token" and self.users is not None and who.name not in {u["name"] for u in self.users.list()}:
            return None  # the user was removed meanwhile
        return Principal(who.name, who.role, "session")

    def end_session(self, sid: str) -> None:
        self.state.run("DELETE FROM sessions WHERE key = ?", (hashlib.sha256(sid.encode()).hexdigest(),))

    def bearer(self, token: str, client: str) -> tuple[Principal | None, bool]:
        """(who, throttled) for an ``Authorization: Bearer`` credential: a token seen before is
        checked as usual; a new one is a sign-in, refused while its client or account is throttled."""
        account = account_of(token)
        seen = self.users is not None and self.users.verified_before(token)
        if not seen and self.throttle.blocked(client, account):
            return None, True
        who = self.from_bearer(token)
        if who is None:
            self.throttle.failed(client, account)
        return who, False


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _cookie(headers: dict[str, str], name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


def route_path(routes, scope) -> str | None:
    """The template of the route a request reaches (``/cases/{case_id}``), the request's own path
    under a mount (``/static/app.js``), or None: ``routes`` are the app's routes and mounts, flat."""
    from starlette.routing import Match, Mount

    for route in routes:
        match, _ = route.matches(scope)
        if isinstance(route, Mount):
            if match == Match.FULL:
                return scope["path"]
        elif match in (Match.FULL, Match.PARTIAL):  # PARTIAL: the path, with another method (405)
            return route.path
    return None


class AccessMiddleware:
    """The rules, sign-in, audit and headers around every HTTP request (pure ASGI: no body copy)."""

    def __init__(self, app, control: AccessControl, routes_of):
        """``routes_of()``: the app's routes and mounts, flat (read when a request comes)."""
        self.app, self.control, self.routes_of = app, control, routes_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        control, method = self.control, scope["method"]
        template = route_path(self.routes_of(), scope)
        # no such route: the app answers 404, nothing to protect; a route with no rule: admins only
        rule = PUBLIC if template is None else rule_for(method, template) or "admin"
        headers = _headers(scope)
        client = (scope.get("client") or ("?", 0))[0]
        who, blocked = ANONYMOUS, False
        if control.enabled:
            who = None
            auth = headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                who, blocked = control.bearer(auth[7:].strip(), client)
            elif (sid := _cookie(headers, SESSION_COOKIE)) is not None:
                who = control.from_session(sid)  # a session id cannot be guessed: never throttled
        state = scope.setdefault("state", {})
        state["principal"], state["audit"] = who, {}
        refusal = None
        if rule != PUBLIC and control.enabled:
            if who is None:
                refusal = (
                    (429, "too many failed sign-ins: wait a minute")
                    if blocked
                    else (
                        401,
                        "sign in: send Authorization: Bearer TOKEN (an API token or the identity provider's JWT)",
                    )
                )
            elif not who.may(rule):
                refusal = (403, f"the role {who.role or '(none)'} may not do this: it needs {rule}")
        audited = control.audit is not None and (rule != PUBLIC or refusal is not None)

        def entry(status: int) -> Entry:
            note = state.get("audit", {})
            user = who or Principal("(not signed in)", "", "none")
            return Entry(
                user.name,
                user.role,
                method,
                template or scope["path"],
                status,
                [int(c) for c in note.get("case_ids", [])],
                str(note.get("fingerprint", "")),
            )

        async def respond(status: int, detail: str) -> None:
            if audited:
                try:
                    control.audit.append(entry(status))
                except AuditError:
                    status, detail = 503, "the audit trail cannot be written: nothing is served without it"
            body = json.dumps({"detail": detail}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                    + SECURITY_HEADERS
                    + ([(b"www-authenticate", b"Bearer")] if status == 401 else []),
                }
            )
            await send({"type": "http.response.body", "body": body})

        if refusal is not None:
            return await respond(*refusal)
        held: dict = {}

        async def send_with_audit(message):
            if message["type"] == "http.response.start":
                held["start"] = message
                return
            if "start" in held:
                start = held.pop("start")
                if audited:
                    try:
                        control.audit.append(entry(start["status"]))
                    except AuditError:  # no unaudited reads: the answer does not leave
                        held["failed"] = True
                        return await respond(503, "the audit trail cannot be written: nothing is served without it")
                start["headers"] = list(start.get("headers", [])) + SECURITY_HEADERS
                await send(start)
            if not held.get("failed"):
                await send(message)

        await self.app(scope, receive, send_with_audit)


def note(request, case_ids=None, fingerprint: str | None = None) -> None:
    """What a handler tells the audit trail about its answer: the case ids it returns or touches,
    the query's pixel fingerprint."""
    audit = request.scope.setdefault("state", {}).setdefault("audit", {})
    if case_ids is not None:
        audit["case_ids"] = [int(c) for c in case_ids]
    if fingerprint is not None:
        audit["fingerprint"] = fingerprint


def principal(request) -> Principal:
    return request.scope.get("state", {}).get("principal") or ANONYMOUS
