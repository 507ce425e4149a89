"""A small OpenID issuer for tests: real HTTP (discovery and JWKS on a loopback port), real RSA
keys and PyJWT-signed tokens, whose keys can be rotated while it runs. The browser test uses a
real OpenID provider instead (tests/oidc/); this one lets a test mint expired tokens, tokens of
another issuer, and tokens signed by a key the issuer does not publish."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


class Issuer:
    def __init__(self):
        self.keys: list[tuple[str, object]] = []
        self.rotate()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path == "/.well-known/openid-configuration":
                    body = {
                        "issuer": issuer.url,
                        "jwks_uri": f"{issuer.url}/jwks",
                        "authorization_endpoint": f"{issuer.url}/auth",
                        "token_endpoint": f"{issuer.url}/token",
                    }
                elif self.path == "/jwks":
                    body = {"keys": [issuer.public_jwk(kid, key) for kid, key in issuer.keys]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def rotate(self) -> None:
        """A new signing key replaces the old one in the published JWKS."""
        self.keys = [(uuid.uuid4().hex, rsa.generate_private_key(public_exponent=65537, key_size=2048))]

    @staticmethod
    def public_jwk(kid: str, key) -> dict:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}

    def token(
        self, sub: str, roles: list[str], audience: str = "neurocbir-api", expires_in: float = 300, **extra
    ) -> str:
        kid, key = self.keys[0]
        now = time.time()
        claims = {"iss": self.url, "sub": sub, "aud": audience, "iat": int(now), "exp": int(now + expires_in)}
        claims.update({"preferred_username": sub, "roles": roles, **extra})
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})

    def close(self) -> None:
        self.server.shutdown()
