"""Who may see what: every route of the app against every kind of credential and role (the matrix
is read from the app's own routes, so a new route without a rule fails here), the audit trail
and its hash chain, sign-in limits, security headers, the users CLI, HTTPS and the safe default."""

from __future__ import annotations

import json
import sqlite3
import ssl
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount
from typer.testing import CliRunner

from neurocbir.app.access import PUBLIC, SESSION_COOKIE, AccessControl, rule_for
from neurocbir.app.api import create_app
from neurocbir.app.audit import AuditLog, Entry
from neurocbir.app.oidc import OIDC, OIDCSettings
from neurocbir.app.users import ROLES, UserStore
from neurocbir.cli import app as cli
from neurocbir.serving.service import RetrievalService
from tests.jwks_issuer import Issuer

runner = CliRunner()


@pytest.fixture(scope="module")
def issuer():
    i = Issuer()
    yield i
    i.close()


@pytest.fixture(scope="module")
def secured(small_run, small_cases, tmp_path_factory, issuer):
    folder = tmp_path_factory.mktemp("secured")
    users = UserStore(folder / "auth.db")
    tokens = {role: users.add(f"{role}-user", role) for role in ROLES}
    control = AccessControl(
        users=users,
        oidc=OIDC(OIDCSettings(issuer.url, "neurocbir-api", jwks_refresh_cooldown_s=1.0)),
        audit=AuditLog(folder / "audit.db"),
    )
    app = create_app(RetrievalService.from_run(small_run, table=small_cases), access=control)
    case = int(small_cases.idx[np.flatnonzero(small_cases.fold != 5)[0]])
    return SimpleNamespace(app=app, client=TestClient(app), tokens=tokens, control=control, folder=folder, case=case)


#: a file of each mount, to request
MOUNT_FILES = {"/static": "/static/app.js", "/static-offline-docs": "/static-offline-docs/swagger-ui.css"}


def _routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route; a mount as its prefix and a file under it."""
    out = []
    for r in app.state.route_table:
        if isinstance(r, APIRoute):
            out += [(m, r.path) for m in sorted(r.methods) if m != "HEAD"]
        elif isinstance(r, Mount):
            out.append(("GET", MOUNT_FILES[r.path]))
    return out


def _url(path: str, case: int) -> str:
    return path.replace("{case_id}", str(case))


def test_every_route_has_a_rule(secured):
    openapi = {(m.upper(), p) for p, ops in secured.app.openapi()["paths"].items() for m in ops}
    assert openapi <= set(_routes(secured.app)), "the route table misses routes of the OpenAPI schema"
    missing = [(m, p) for m, p in _routes(secured.app) if rule_for(m, p) is None]
    assert not missing, f"routes without an access rule (add them to neurocbir.app.access.RULES): {missing}"


def test_the_route_role_matrix(secured, issuer):
    other = Issuer()  # another identity provider: its tokens must not pass
    try:
        bad = {
            "no credentials": {},
            "a wrong token": {"Authorization": "Bearer ncb_1_not-the-token"},
            "garbage": {"Authorization": "Bearer garbage"},
            "an expired JWT": {"Authorization": f"Bearer {issuer.token('eve', ['admin'], expires_in=-120)}"},
            "a JWT of another issuer": {"Authorization": f"Bearer {other.token('eve', ['admin'])}"},
            "a JWT for another audience": {"Authorization": f"Bearer {issuer.token('eve', ['admin'], audience='x')}"},
            "a bad session cookie": {"Cookie": "neurocbir_session=forged"},
        }
        good = {f"{role} token": (role, {"Authorization": f"Bearer {t}"}) for role, t in secured.tokens.items()}
        good |= {
            f"{role} JWT": (role, {"Authorization": f"Bearer {issuer.token('j-' + role, [role])}"}) for role in ROLES
        }
        wrong = []
        for method, path in _routes(secured.app):
            rule = rule_for(method, path)
            url = _url(path, secured.case)
            for name, headers in bad.items():
                secured.control.throttle.clear()
                status = secured.client.request(method, url, headers=headers).status_code
                if rule == PUBLIC and status in (401, 403) or rule != PUBLIC and status != 401:
                    wrong.append(f"{method} {path} with {name}: {status}")
            for name, (role, headers) in good.items():
                secured.control.throttle.clear()
                status = secured.client.request(method, url, headers=headers).status_code
                allowed = rule == PUBLIC or ROLES.index(role) >= ROLES.index(rule)
                if allowed and status in (401, 403) or not allowed and status != 403:
                    wrong.append(f"{method} {path} with a {name}: {status} (rule: {rule})")
        assert not wrong, "\n".join(wrong)
    finally:
        other.close()


def _audit_rows(path) -> list[dict]:
    import csv
    import io

    return list(csv.DictReader(io.StringIO(AuditLog(path).export_csv())))


def test_a_named_users_query_is_audited_and_an_edit_is_detected(secured):
    headers = {"Authorization": f"Bearer {secured.tokens['reader']}"}
    out = secured.client.post("/query", data={"case_id": str(secured.case)}, headers=headers).json()
    last = _audit_rows(secured.folder / "audit.db")[-1]
    assert (last["user"], last["role"], last["method"], last["route"], last["status"]) == (
        "reader-user",
        "reader",
        "POST",
        "/query",
        "200",
    )
    shown = {r["case_id"] for r in out["retrievals"]} | {secured.case}
    assert shown <= {int(c) for c in last["case_ids"].split(",")}
    assert last["fingerprint"] == out["query_fingerprint"]
    text = AuditLog(secured.folder / "audit.db").export_csv()
    assert not any(w in text for w in ("report", "meningioma", "glioma", "MR0"))  # no report text, no patient data
    ok, n, _ = AuditLog(secured.folder / "audit.db").verify()
    assert ok and n >= 1


def _tampered_copy(secured, name: str, *statements) -> str:
    """A copy of the trail (with its key and anchor) with ``statements`` run on its database;
    `neurocbir audit verify` on it: (exit code, output)."""
    import shutil

    copy = secured.folder / f"tampered-{name}"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    db = sqlite3.connect(secured.folder / "audit.db")
    db.execute("VACUUM INTO ?", (str(copy / "audit.db"),))
    db.close()
    for f in ("audit.key", "audit.head"):
        shutil.copy2(secured.folder / f, copy / f)
    (copy / "archive.db").touch()  # so that --archive names the folder
    db = sqlite3.connect(copy / "audit.db")
    for statement in statements:
        statement(db) if callable(statement) else db.execute(statement)
    db.commit()
    db.close()
    res = runner.invoke(cli, ["audit", "verify", "--archive", str(copy)])
    return res.exit_code, res.output


def _rewrite_from(row_id: int):
    """Edit a row and recompute every later hash with plain SHA-256 (what anyone can do without the key)."""
    from neurocbir.app.audit import row_hash

    def rewrite(db):
        db.execute("UPDATE audit SET user = 'someone-else' WHERE id = ?", (row_id,))
        prev = db.execute("SELECT hash FROM audit WHERE id = ?", (row_id - 1,)).fetchone()[0]
        for row in db.execute("SELECT * FROM audit WHERE id >= ? ORDER BY id", (row_id,)).fetchall():
            h = row_hash(prev, row[1:-2])
            db.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE id = ?", (prev, h, row[0]))
            prev = h

    return rewrite


def test_audit_verify_names_an_edited_a_deleted_a_truncated_and_a_rewritten_trail(secured):
    headers = {"Authorization": f"Bearer {secured.tokens['reader']}"}
    for _ in range(6):
        assert secured.client.get(f"/cases/{secured.case}", headers=headers).status_code == 200
    n = len(_audit_rows(secured.folder / "audit.db"))
    assert n >= 6
    assert _tampered_copy(secured, "none") == (0, f"the audit trail is intact: {n} rows\n")
    code, out = _tampered_copy(secured, "edited", "UPDATE audit SET user = 'someone-else' WHERE id = 2")
    assert code == 1 and "row 2 was edited" in out
    code, out = _tampered_copy(secured, "deleted", "DELETE FROM audit WHERE id = 3")
    assert code == 1 and "row 3 was deleted" in out
    code, out = _tampered_copy(secured, "newest", f"DELETE FROM audit WHERE id = {n}")
    assert code == 1 and f"the newest row {n} was deleted" in out
    code, out = _tampered_copy(secured, "truncated", f"DELETE FROM audit WHERE id > {n - 3}")
    assert code == 1 and f"rows {n - 2}..{n} were deleted" in out
    code, out = _tampered_copy(secured, "rewritten", _rewrite_from(2))
    assert code == 1 and f"rows 2..{n} fail their MAC" in out
    # the renumbered ids of a deleted row do not hide it either
    code, out = _tampered_copy(
        secured, "renumbered", "DELETE FROM audit WHERE id = 2", "UPDATE audit SET id = id - 1 WHERE id > 2"
    )
    assert code == 1 and f"rows 2..{n - 1} fail their MAC" in out


def test_an_audit_key_others_may_read_is_refused(secured, tmp_path):
    from neurocbir.app.audit import AuditError

    AuditLog(tmp_path / "audit.db").append(Entry("u", "reader", "GET", "/x", 200))
    (tmp_path / "audit.key").chmod(0o644)
    with pytest.raises(AuditError, match="chmod 600"):
        AuditLog(tmp_path / "audit.db")
    (tmp_path / "audit.key").unlink()
    with pytest.raises(AuditError, match="audit key .* is missing"):
        AuditLog(tmp_path / "audit.db")  # a new key would hide what came before: refused


def test_refusals_are_audited_and_feedback_names_its_user(secured):
    secured.client.get(f"/cases/{secured.case}")  # no credentials
    secured.control.throttle.clear()
    rows = secured.control.audit.export_csv().splitlines()
    assert rows[-1].split(",")[2:7] == ["(not signed in)", "", "GET", "/cases/{case_id}", "401"]
    headers = {"Authorization": f"Bearer {secured.tokens['clinician']}"}
    out = secured.client.post("/query", data={"case_id": str(secured.case)}, headers=headers).json()
    mark = {"query_fingerprint": out["query_fingerprint"], "case_id": out["retrievals"][0]["case_id"], "relevant": True}
    assert secured.client.post("/feedback", json=mark, headers=headers).status_code == 200
    admin = {"Authorization": f"Bearer {secured.tokens['admin']}"}
    exported = secured.client.get("/feedback.csv", headers=admin).text.splitlines()
    assert exported[0].endswith(",user") and exported[-1].endswith(",clinician-user")
    assert "clinician-user" in secured.client.get("/audit.csv", headers=admin).text


def test_an_audit_write_that_fails_fails_the_request(secured):
    headers = {"Authorization": f"Bearer {secured.tokens['reader']}"}
    real = secured.control.audit
    broken = AuditLog(secured.folder / "broken.db")
    broken.db.close()  # every write now fails
    secured.control.audit = broken
    try:
        res = secured.client.get(f"/cases/{secured.case}", headers=headers)
        assert res.status_code == 503 and "audit trail" in res.json()["detail"]
        assert "label" not in res.text  # the case was not served
    finally:
        secured.control.audit = real
    assert secured.client.get(f"/cases/{secured.case}", headers=headers).status_code == 200


def test_failed_sign_ins_are_throttled_per_client_and_never_a_signed_in_user(secured):
    secured.control.throttle.clear()
    good = {"Authorization": f"Bearer {secured.tokens['reader']}"}
    assert secured.client.get("/examples", headers=good).status_code == 200  # verified once: signed in
    codes = [
        secured.client.get("/examples", headers={"Authorization": "Bearer ncb_1_x"}).status_code for _ in range(12)
    ]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
    assert secured.client.post("/auth/session", json={"token": secured.tokens["clinician"]}).status_code == 429
    assert secured.client.get("/examples", headers=good).status_code == 200  # a signed-in user is never throttled
    secured.control.throttle.clear()


def test_behind_a_trusted_proxy_one_clients_failures_do_not_block_another(small_run, small_cases, tmp_path):
    users = UserStore(tmp_path / "auth.db")
    token = users.add("ann", "reader")
    users.add("bob", "reader")
    for proxies, blocks_everyone in ((["testclient"], False), ([], True)):
        control = AccessControl(users=users, audit=AuditLog(tmp_path / "audit.db"), trusted_proxies=proxies)
        client = TestClient(create_app(RetrievalService.from_run(small_run, table=small_cases), access=control))
        mistyped = {"X-Forwarded-For": "10.1.1.7"}  # one workstation behind the proxy
        for _ in range(10):
            assert client.post("/auth/session", json={"token": "ncb_9_typo"}, headers=mistyped).status_code == 401
        assert client.post("/auth/session", json={"token": token}, headers=mistyped).status_code == 429
        # another workstation behind the same proxy signs in, unless the header comes from a peer
        # that is not a trusted proxy (then it is ignored: everyone is the same client)
        other = client.post("/auth/session", json={"token": token}, headers={"X-Forwarded-For": "10.1.1.8"})
        assert other.status_code == (429 if blocks_everyone else 204)


def test_failed_sign_ins_for_one_account_throttle_that_account_only():
    from neurocbir.app.throttle import SignInThrottle

    now = [0.0]
    t = SignInThrottle(limit=10, window_s=60, max_keys=100, clock=lambda: now[0])
    for i in range(10):
        t.failed(f"10.0.0.{i}", "user 3")  # ten computers, one account
    assert t.blocked("10.0.0.99", "user 3") and not t.blocked("10.0.0.99", "user 4")
    now[0] = 61.0
    assert not t.blocked("10.0.0.99", "user 3")  # failures expire
    for i in range(500):
        t.failed(f"10.2.{i // 256}.{i % 256}")
    assert len(t) <= 100  # memory is bounded


def test_security_headers_on_every_response_and_no_inline_script(secured):
    for url in ("/", "/health", "/docs", "/static/app.js", f"/cases/{secured.case}", "/no-such-page"):
        h = secured.client.get(url).headers
        csp = h["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        assert "default-src 'self'" in csp and "connect-src 'self'" in csp
        assert h["x-content-type-options"] == "nosniff" and h["referrer-policy"] == "no-referrer"
        assert "access-control-allow-origin" not in h
    page = secured.client.get("/").text
    assert "<script>" not in page and '<script src="/static/app.js">' in page
    assert "<script>" not in secured.client.get("/docs").text


def test_sessions_and_the_page_sign_in(secured):
    client = TestClient(secured.app)
    assert client.get("/auth/config").json() == {"mode": "oidc", "user": None}
    assert client.post("/auth/session", json={"token": "ncb_9_nope"}).status_code == 401
    secured.control.throttle.clear()
    assert client.post("/auth/session", json={"token": secured.tokens["reader"]}).status_code == 204
    cookie = client.cookies.get("neurocbir_session")
    assert cookie and cookie not in secured.tokens.values()  # a session id, not the token
    assert client.get("/auth/config").json()["user"] == {"name": "reader-user", "role": "reader"}
    assert client.get("/examples").status_code == 200 and client.get("/feedback.csv").status_code == 403
    client.post("/auth/logout")
    assert client.get("/examples").status_code == 401


def test_users_cli_tokens_are_shown_once_and_rotation_revokes(small_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    res = runner.invoke(cli, ["users", "add", "ann", "--role", "clinician", "--run", str(run)])
    assert res.exit_code == 0, res.output
    token = res.output.strip().splitlines()[-1]
    assert token.startswith("ncb_") and token not in (run / "auth.db").read_bytes().decode("latin-1")
    store = UserStore(run / "auth.db")
    assert store.authenticate(token).name == "ann"
    res = runner.invoke(cli, ["users", "rotate", "ann", "--run", str(run)])
    new = res.output.strip().splitlines()[-1]
    assert store.authenticate(token) is None and store.authenticate(new).role == "clinician"
    assert "ann\tclinician" in runner.invoke(cli, ["users", "list", "--run", str(run)]).output
    assert runner.invoke(cli, ["users", "add", "ann", "--role", "reader", "--run", str(run)]).exit_code == 2
    assert runner.invoke(cli, ["users", "add", "bob", "--role", "boss", "--run", str(run)]).exit_code == 2
    assert runner.invoke(cli, ["users", "remove", "ann", "--run", str(run)]).exit_code == 0
    assert store.authenticate(new) is None


def test_serving_the_network_with_nobody_signing_in_is_refused(small_run, tmp_path):
    code = [sys.executable, "-m", "neurocbir.cli", "serve", "--run", str(small_run), "--host", "0.0.0.0", "--port", "1"]
    out = subprocess.run(code, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--allow-anonymous" in out.stderr and "users add" in out.stderr
    assert "Traceback" not in out.stderr


def test_https_with_a_certificate(secured, tmp_path):
    import datetime
    import threading
    import time
    import urllib.request

    import uvicorn
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            secured.app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            ssl_certfile=str(tmp_path / "cert.pem"),
            ssl_keyfile=str(tmp_path / "key.pem"),
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.1)
        ctx = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        body = json.loads(urllib.request.urlopen(f"https://localhost:{port}/health", context=ctx).read())
        assert body["status"] == "ok"
        with pytest.raises(Exception):  # noqa: B017 - plain HTTP to the TLS port gets no answer
            urllib.request.urlopen(f"http://localhost:{port}/health", timeout=5).read()
    finally:
        server.should_exit = True


def test_keys_the_provider_rotates_are_fetched_again(secured, issuer):
    first = issuer.token("rita", ["reader"])
    assert secured.client.get("/examples", headers={"Authorization": f"Bearer {first}"}).status_code == 200
    issuer.rotate()
    second = issuer.token("rita", ["reader"])  # signed by a key the app has not seen yet
    time.sleep(1.1)  # the cooldown between forced JWKS fetches (30 s by default)
    secured.control.throttle.clear()
    assert secured.client.get("/examples", headers={"Authorization": f"Bearer {second}"}).status_code == 200
    assert secured.client.get("/auth/me", headers={"Authorization": f"Bearer {second}"}).json()["name"] == "rita"


def test_two_worker_processes_share_sessions_the_throttle_and_the_audit_trail(small_run, tmp_path):
    """`neurocbir serve --workers 2`: a session made by one worker is known to the other, failed
    sign-ins are counted across both (per-process counts would allow twice the guesses), and the
    audit trail they both write verifies."""
    import shutil
    import socket

    import httpx

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    token = runner.invoke(cli, ["users", "add", "ann", "--role", "reader", "--run", str(run)]).output.split()[-1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = [sys.executable, "-m", "neurocbir.cli", "serve", "--run", str(run), "--port", str(port), "--workers", "2"]
    server = subprocess.Popen(code, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"

    def get(path: str, cookies=None, **kw) -> httpx.Response:  # a new connection each time: any worker may answer
        with httpx.Client(base_url=base, timeout=60, cookies=cookies) as c:
            return c.request(kw.pop("method", "GET"), path, **kw)

    try:
        workers: set[int] = set()
        for _ in range(600):  # until both workers have answered (each loads its own model first)
            try:
                workers.add(get("/health").json()["worker"])
            except httpx.TransportError:
                assert server.poll() is None, server.stdout.read()
            if len(workers) == 2:
                break
        assert len(workers) == 2, workers
        cookie = get("/auth/session", method="POST", json={"token": token}).cookies[SESSION_COOKIE]
        answered = set()
        for _ in range(30):
            r = get("/examples", cookies={SESSION_COOKIE: cookie})
            assert r.status_code == 200, r.text
            answered.add(get("/health").json()["worker"])
        assert answered == workers
        codes = [get("/examples", headers={"Authorization": f"Bearer ncb_9_guess{i}"}).status_code for i in range(12)]
        assert codes[:10] == [401] * 10 and codes[10:] == [429, 429], codes
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=60)
    assert "with 2 worker processes" in out and "Traceback" not in out, out
    verified = runner.invoke(cli, ["audit", "verify", "--run", str(run)])
    assert verified.exit_code == 0 and "intact" in verified.output, verified.output
