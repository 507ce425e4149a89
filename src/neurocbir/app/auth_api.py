"""The sign-in steps and the admin's exports: ``/auth/*`` (the page's sign-in: an API token, or
the identity provider's authorization-code flow with PKCE, each ending in an HttpOnly session
cookie), ``/audit.csv`` and ``/users``. The rules of :mod:`neurocbir.app.access` guard them."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, Field

from neurocbir.app.access import SESSION_COOKIE, SESSION_TTL_S, AccessControl, principal
from neurocbir.app.throttle import account_of

router = APIRouter(tags=["sign-in"])


class TokenSignIn(BaseModel):
    token: str = Field(..., min_length=1, max_length=200, description="an API token from `neurocbir users add`")


def _control(request: Request) -> AccessControl:
    return request.app.state.access


def _with_session(response: Response, request: Request, sid: str) -> Response:
    response.set_cookie(
        SESSION_COOKIE,
        sid,
        max_age=SESSION_TTL_S,
        httponly=True,
        samesite="strict",  # never sent by another site's page: no cross-site request forgery
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.get("/auth/config")
def auth_config(request: Request) -> dict:
    """How this server signs users in (``none``, ``token`` or ``oidc``) and who is signed in."""
    control, who = _control(request), principal(request)
    user = None if who is None or who.via == "none" else {"name": who.name, "role": who.role}
    return {"mode": control.mode, "user": user}


@router.get("/auth/me")
def me(request: Request) -> dict:
    who = principal(request)
    return {"name": who.name, "role": who.role, "via": who.via}


@router.post("/auth/session")
def token_session(body: TokenSignIn, request: Request) -> Response:
    """Sign the page in with an API token: an HttpOnly session cookie (8 hours)."""
    control, client = _control(request), (request.client.host if request.client else "?")
    if control.users is None or not control.enabled:
        raise HTTPException(404, "this server signs in with the identity provider, or not at all")
    token = body.token.strip()
    account = account_of(token)
    if control.throttle.blocked(client, account):
        raise HTTPException(429, "too many failed sign-ins from this computer or for this account: wait a minute")
    who = control.users.authenticate(token)
    if who is None:
        control.throttle.failed(client, account)
        raise HTTPException(401, "unknown token (ask an admin for a new one: `neurocbir users rotate NAME`)")
    out = Response(status_code=204)
    return _with_session(out, request, control.new_session(who))


@router.post("/auth/logout")
def logout(request: Request) -> Response:
    sid = request.cookies.get(SESSION_COOKIE)
    if sid:
        _control(request).end_session(sid)
    out = Response(status_code=204)
    out.delete_cookie(SESSION_COOKIE, path="/")
    return out


def _redirect_uri(request: Request) -> str:
    return str(request.url_for("oidc_callback"))


@router.get("/auth/login")
def oidc_login(request: Request) -> RedirectResponse:
    """Start the identity provider's sign-in (authorization code + PKCE)."""
    oidc = _control(request).oidc
    if oidc is None:
        raise HTTPException(404, "no identity provider is configured: sign in with an API token")
    return RedirectResponse(oidc.login_url(_redirect_uri(request)), status_code=302)


@router.get("/auth/callback", name="oidc_callback")
def oidc_callback(
    request: Request,
    code: str | None = Query(None, max_length=4096),
    state: str | None = Query(None, max_length=256),
    error: str | None = Query(None, max_length=200),
    error_description: str | None = Query(None, max_length=1000),
):
    """Where the provider sends the browser back: the code is exchanged here, by the server."""
    from neurocbir.app.oidc import OIDCError

    control = _control(request)
    if control.oidc is None:
        raise HTTPException(404, "no identity provider is configured")
    if error:
        raise HTTPException(401, f"the identity provider did not sign you in ({error}: {error_description})")
    if not code or not state:
        raise HTTPException(400, "the sign-in callback needs the provider's code and state")
    if control.throttle.blocked(request.client.host if request.client else "?"):
        raise HTTPException(429, "too many failed sign-ins from this computer: wait a minute")
    try:
        who, expires = control.oidc.finish_login(code, state, _redirect_uri(request))
    except OIDCError as exc:
        control.throttle.failed(request.client.host if request.client else "?")
        raise HTTPException(401, str(exc)) from None
    return _with_session(RedirectResponse("/", status_code=303), request, control.new_session(who, expires))


@router.get("/audit.csv", response_class=Response)
def audit_csv(request: Request, since: str | None = Query(None, description="from this UTC date or time")) -> Response:
    """The audit trail (admin), oldest first."""
    audit = _control(request).audit
    if audit is None:
        raise HTTPException(404, "access control is off: no audit trail is kept")
    return Response(
        audit.export_csv(since),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="audit.csv"'},
    )


@router.get("/users")
def users(request: Request) -> dict:
    """The users and their roles (admin); tokens are never shown again."""
    store = _control(request).users
    return {"users": store.list() if store is not None else []}
