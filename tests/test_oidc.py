"""Sign-in through a real OpenID provider (panva's certified oidc-provider, run with the machine's
Node.js from tests/oidc/): the web UI's authorization-code flow with PKCE in headless Chromium,
then a query as the signed-in user, who is named in the audit trail."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_browser import launch, serve_in_thread

OIDC_DIR = Path(__file__).resolve().parent / "oidc"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def provider_and_app(small_run, small_cases, tmp_path_factory):
    from neurocbir.app.access import AccessControl
    from neurocbir.app.api import create_app
    from neurocbir.app.audit import AuditLog
    from neurocbir.app.oidc import OIDC, OIDCSettings
    from neurocbir.serving.service import RetrievalService

    node = shutil.which("node")
    if node is None or not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
        msg = "the test OpenID provider is not installed: npm ci --prefix tests/oidc (.ci/run does it)"
        pytest.fail(msg)  # never a skip: `make test` installs it
    app_port, idp_port = _free_port(), _free_port()
    log = open(tmp_path_factory.mktemp("idp") / "provider.log", "w")  # noqa: SIM115 - closed below
    idp = subprocess.Popen(
        [node, str(OIDC_DIR / "provider.mjs"), str(idp_port), f"http://127.0.0.1:{app_port}/auth/callback"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    issuer = f"http://127.0.0.1:{idp_port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{issuer}/.well-known/openid-configuration", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        folder = tmp_path_factory.mktemp("oidc-app")
        oidc = OIDC(OIDCSettings(issuer, audience="urn:neurocbir:api", role_claim="roles", client_id="neurocbir"))
        control = AccessControl(oidc=oidc, audit=AuditLog(folder / "audit.db"))
        app = create_app(RetrievalService.from_run(small_run, table=small_cases), access=control)
        url, server = serve_in_thread(app, port=app_port)
        yield url, control, issuer
        server.should_exit = True
    finally:
        idp.terminate()
        idp.wait(10)
        log.close()


def test_sign_in_with_the_provider_then_query_in_a_browser(provider_and_app, small_cases):
    from playwright.sync_api import expect, sync_playwright

    from tests.test_browser import fold5_scan

    url, control, issuer = provider_and_app
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        expect(page.locator("#oidcLogin")).to_be_visible()
        expect(page.locator("#example")).to_be_hidden()  # nothing about cases before sign-in
        page.click("#oidcLogin")
        page.wait_for_url(f"{issuer}/**")  # the provider's own sign-in page
        page.fill("input[name=login]", "clinician-ann")
        page.fill("input[name=password]", "any")
        page.click("button[type=submit]")
        if page.locator("button[type=submit]").count() and "consent" in page.content().lower():
            page.click("button[type=submit]")  # the consent step
        page.wait_for_url(f"{url}/")
        expect(page.locator("#who")).to_contain_text("Signed in as clinician-ann (clinician)")
        cookies = {c["name"]: c for c in page.context.cookies()}
        assert cookies["neurocbir_session"]["httpOnly"] and cookies["neurocbir_session"]["sameSite"] == "Strict"
        page.set_input_files("#file", str(fold5_scan(small_cases)))
        page.click("#run")
        expect(page.locator(".retrieval")).to_have_count(5, timeout=30_000)
        page.locator(".retrieval").nth(0).get_by_role("button", name="Relevant", exact=True).click()
        expect(page.locator(".retrieval").nth(0)).to_contain_text("marked relevant")
        browser.close()
    rows = control.audit.export_csv().splitlines()
    assert any(",clinician-ann,clinician,POST,/query,200," in r for r in rows)
    assert any(",clinician-ann,clinician,POST,/feedback,200," in r for r in rows)
    assert control.audit.verify()[0]


def test_a_provider_token_for_another_client_or_a_forged_state_is_refused(provider_and_app):
    url, control, _ = provider_and_app
    req = urllib.request.Request(f"{url}/auth/callback?code=x&state=forged")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 401 and b"unknown or has expired" in err.value.read()
    control.throttle.clear()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{url}/examples")
    assert err.value.code == 401
