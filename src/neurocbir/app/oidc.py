"""Sign-in with the hospital's identity provider (OpenID Connect: Keycloak, Azure AD, ...).

* Bearer JWTs from the provider are validated by PyJWT, never by hand: signature against the
  issuer's JWKS (``PyJWKClient``: keys cached, fetched again when a token names an unknown key, so
  the provider can rotate its keys), issuer, audience and expiry. The role comes from a claim
  (``--oidc-role-claim``, a dotted path such as ``realm_access.roles``): the highest of the
  neurocbir roles it lists.
* The web UI signs in with the authorization-code flow and PKCE (S256), run by the server: it
  keeps the verifier, exchanges the code at the token endpoint itself and gives the browser an
  HttpOnly session cookie, so no token is handled by page script and no other origin is contacted
  from the page.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

from neurocbir.app.shared_state import SharedState
from neurocbir.app.users import ROLES, Principal
from neurocbir.errors import NeurocbirError

ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]
LOGIN_TTL_S = 600
TIMEOUT_S = 10


class OIDCError(NeurocbirError, ValueError):
    """A token or a sign-in the provider does not vouch for (or a provider that cannot be reached)."""


def _get_json(url: str, data: dict | None = None) -> dict:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            return json.loads(r.read())
    except (OSError, ValueError) as exc:
        raise OIDCError(f"the identity provider at {url} did not answer ({type(exc).__name__}: {exc})") from None


@dataclass
class OIDCSettings:
    issuer: str
    audience: str
    role_claim: str = "roles"
    client_id: str | None = None  # the web UI's client (default: the audience)
    #: at most one forced JWKS fetch per this many seconds (a token naming an unknown key), so
    #: forged tokens cannot hammer the provider; a rotated key is picked up within it
    jwks_refresh_cooldown_s: float = 30.0


class OIDC:
    """One issuer: its discovery document, its keys, and the UI's pending sign-ins."""

    def __init__(self, settings: OIDCSettings, state: SharedState | None = None):
        """``state``: where sign-ins in progress are kept (shared by the server's worker processes)."""
        import jwt

        self.settings = settings
        self.issuer = settings.issuer.rstrip("/")
        self.meta = _get_json(f"{self.issuer}/.well-known/openid-configuration")
        if self.meta.get("issuer", "").rstrip("/") != self.issuer:
            raise OIDCError(f"the provider's discovery names issuer {self.meta.get('issuer')!r}, not {self.issuer!r}")
        self.keys = jwt.PyJWKClient(
            self.meta["jwks_uri"],
            cache_keys=True,
            lifespan=300,
            timeout=TIMEOUT_S,
            cooldown_duration=settings.jwks_refresh_cooldown_s,
        )
        self.state = state or SharedState()  # its pending table: state -> (PKCE verifier, nonce, started)

    @property
    def client_id(self) -> str:
        return self.settings.client_id or self.settings.audience

    def principal(self, token: str, audience: str | None = None, nonce: str | None = None) -> Principal:
        """The signed-in user a JWT stands for, or :class:`OIDCError` (bad signature, issuer,
        audience, expiry, or a key the provider does not publish)."""
        import jwt

        try:
            key = self.keys.get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=ALGORITHMS,
                audience=audience or self.settings.audience,
                issuer=self.meta["issuer"],
                options={"require": ["exp", "iss", "aud", "sub"]},
                leeway=30,
            )
        except (jwt.PyJWTError, jwt.PyJWKClientError) as exc:
            raise OIDCError(f"token refused: {exc}") from None
        if nonce is not None and claims.get("nonce") != nonce:
            raise OIDCError("token refused: the sign-in's nonce does not match")
        name = str(claims.get("preferred_username") or claims.get("email") or claims["sub"])
        return Principal(name, role_of(claims, self.settings.role_claim), "oidc")

    # --- the web UI's authorization-code flow with PKCE ---------------------------------------
    def login_url(self, redirect_uri: str) -> str:
        verifier, state, nonce = secrets.token_urlsafe(48), secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        now = time.time()
        _, (n,) = self.state.transaction(
            [("DELETE FROM pending WHERE started < ?", (now - LOGIN_TTL_S,)), ("SELECT COUNT(*) FROM pending", ())]
        )
        if n[0] > 10_000:
            raise OIDCError("too many sign-ins in progress; try again in a few minutes")
        self.state.run("INSERT INTO pending VALUES (?, ?, ?, ?)", (state, verifier, nonce, now))
        query = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": redirect_uri,
            "scope": "openid profile",
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        return f"{self.meta['authorization_endpoint']}?{urllib.parse.urlencode(query)}"

    def finish_login(self, code: str, state: str, redirect_uri: str) -> tuple[Principal, float]:
        """Exchange the provider's code (with the PKCE verifier) for tokens: (the user, when their
        sign-in expires)."""
        import jwt

        found, _ = self.state.transaction(  # taken once: a state cannot be replayed
            [
                ("SELECT verifier, nonce, started FROM pending WHERE state = ?", (state,)),
                ("DELETE FROM pending WHERE state = ?", (state,)),
            ]
        )
        if not found or time.time() - found[0][2] > LOGIN_TTL_S:
            raise OIDCError("this sign-in is unknown or has expired: sign in again")
        verifier, nonce, _ = found[0]
        tokens = _get_json(
            self.meta["token_endpoint"],
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "client_id": self.client_id,
                "code_verifier": verifier,
            },
        )
        if "id_token" not in tokens:
            raise OIDCError(f"the provider gave no ID token ({tokens.get('error', 'no error given')})")
        user = self.principal(tokens["id_token"], audience=self.client_id, nonce=nonce)
        access = tokens.get("access_token", "")
        if access.count(".") == 2:  # a JWT access token carries the roles the API checks
            with contextlib.suppress(OIDCError):
                user = Principal(user.name, self.principal(access).role, "oidc")
        expires = jwt.decode(tokens["id_token"], options={"verify_signature": False})["exp"]
        return user, float(expires)


def role_of(claims: dict, claim: str) -> str:
    """The highest neurocbir role a claim (dotted path; a list or a space-separated string) names."""
    value: object = claims
    for part in claim.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    names = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
    found = [r for r in ROLES if r in {str(n) for n in names}]
    return found[-1] if found else ""
