"""The sample SPA (``spa/``) in a real browser: headless Chromium driven by Playwright.

The stack runs as real processes on loopback, once for the module: the dev tenant (HTTPS,
its own CA), the API under gunicorn with ``CORS_ALLOWED_ORIGINS`` = the SPA's origin, and
``scripts/serve_spa.py`` serving ``spa/`` on another free port (the dev tenant accepts
``http://127.0.0.1`` redirect URIs on any port, as Entra ID does for loopback). The SPA
calls the API cross-origin, so CORS (and its preflight for ``Authorization``) is the
browser's, for real.

The browser is Debian's ``chromium`` (``executable_path``; Playwright downloads nothing).
It does not trust the dev tenant's CA: each context sets ``ignore_https_errors=True``
(a person's browser would trust the dev tenant's CA, ``<state dir>/ca.pem``, instead; see
docs/how-to/sample-spa.md).
Missing chromium or spa's npm packages skip locally and fail under CI=true.

Every wait is Playwright's auto-waiting ``expect`` or a bounded timeout; nothing sleeps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import pytest
import requests

from devtenant import SPA_CLIENT_ID, TENANT_ID
from tests.support.servers import free_port, require_binary
from tests.support.stack import ROOT, DevTenantProcess, api_env, devtenant, gunicorn

playwright_sync = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, BrowserContext, Page, expect  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

MSAL_BUNDLE = ROOT / "spa" / "node_modules" / "@azure" / "msal-browser" / "lib" / "msal-browser.min.js"
TIMEOUT_MS = 15_000  # any single wait: a page, a redirect, a locator
expect.set_options(timeout=TIMEOUT_MS)


@dataclass
class Stack:
    tenant: DevTenantProcess
    api: str  # the API's base URL
    spa: str  # the SPA's URL (its redirect URI), another origin


def _require_spa_packages() -> None:
    if MSAL_BUNDLE.is_file():
        return
    reason = "spa/node_modules is missing (install it: cd spa && npm ci)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true requires it")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    _require_spa_packages()
    state = tmp_path_factory.mktemp("devtenant")
    spa_port = free_port()
    spa_url = f"http://127.0.0.1:{spa_port}/"
    with devtenant(state) as tenant, \
            gunicorn(api_env(tenant, CORS_ALLOWED_ORIGINS=spa_url.rstrip("/"), GUNICORN_WORKERS="1"),
                     workers=1) as api:  # one worker: one in-process token cache
        process = subprocess.Popen(
            [sys.executable, "scripts/serve_spa.py", "--host", "127.0.0.1", "--port", str(spa_port),
             "--authority", f"{tenant.url}/{TENANT_ID}", "--api-base-url", api.url],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            line = process.stdout.readline()
            assert line.strip() == f"SPA ready at {spa_url}", line + process.stdout.read()
            yield Stack(tenant, api.url, spa_url)
        finally:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = require_binary("chromium")
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             timeout=TIMEOUT_MS)
        yield browser
        browser.close()


@dataclass
class Tab:
    page: Page
    console_errors: list[str]  # "<page url>: <text>", from every page the tab showed

    def spa_errors(self, stack: Stack) -> list[str]:
        """The errors logged while the SPA was shown (not the dev tenant's own pages, whose
        missing favicon.ico is a 404 in the console)."""
        return [e for e in self.console_errors if e.startswith(stack.spa)]


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    """A fresh context (no MSAL cache, no dev tenant session) that trusts the dev tenant's
    self-signed chain, and the errors its pages log."""
    context: BrowserContext = browser.new_context(ignore_https_errors=True)
    context.set_default_timeout(TIMEOUT_MS)
    context.set_default_navigation_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(f"{page.url}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"{page.url}: uncaught {exc}"))
    yield Tab(page, errors)
    context.close()


def to_devtenant(stack: Stack, path: str, **kwargs) -> requests.Response:
    """POST to the dev tenant, trusting its CA (per request: REQUESTS_CA_BUNDLE would win
    over a session's ``verify``)."""
    ca = str(stack.tenant.state_dir / "ca-bundle.pem")
    return requests.post(f"{stack.tenant.url}{path}", verify=ca, timeout=10, **kwargs)


def sign_in(page: Page, stack: Stack, name: str) -> None:
    """From the SPA: "Sign in", then the dev tenant's button for ``name``."""
    page.goto(stack.spa)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.get_by_role("button", name=re.compile(rf"^{name}\b")).click()


def expect_signed_in(page: Page, stack: Stack, me: str, manager: str) -> None:
    expect(page).to_have_url(re.compile(rf"^{re.escape(stack.spa)}"))
    expect(page.locator("#me")).to_have_text(me)
    expect(page.locator("#manager")).to_have_text(manager)


# --- who signs in, what they see ----------------------------------------------------------------


def test_adele_signs_in_and_sees_her_manager(stack: Stack, tab: Tab, tmp_path: Path) -> None:
    api_requests: list[tuple[str, str, dict[str, str]]] = []
    tab.page.on("request", lambda r: api_requests.append((r.method, r.url, r.headers))
                if r.url.startswith(stack.api) else None)
    sign_in(tab.page, stack, "Adele Vance")
    expect_signed_in(tab.page, stack, "Adele Vance", "Nestor Wilke")
    expect(tab.page.get_by_role("button", name="Sign out")).to_be_visible()
    screenshot = tmp_path / "spa-signed-in.png"
    tab.page.screenshot(path=screenshot, full_page=True)
    assert screenshot.stat().st_size > 0
    print(f"screenshot of the signed-in page: {screenshot}")
    # cross-origin with a bearer token: the browser preflighted Authorization, then sent it
    methods = [(method, url.removeprefix(stack.api)) for method, url, _ in api_requests]
    assert ("GET", "/api/me") in methods and ("GET", "/api/me/manager") in methods
    assert all(h.get("authorization", "").startswith("Bearer ") for m, _, h in api_requests if m == "GET")
    assert tab.spa_errors(stack) == []


def test_alex_meets_the_claims_challenge_approves_and_sees_his_manager(stack: Stack, tab: Tab) -> None:
    """Conditional Access on Graph only (the dev tenant's switch): alex signs in with a
    password, the API's OBO is challenged (401 insufficient_claims), the SPA acquires a
    token again with the claims, alex approves (MFA), and the retry succeeds."""
    to_devtenant(stack, "/_devtenant/mfa", json={"at_sign_in": False}).raise_for_status()
    challenges: list[str] = []
    tab.page.on("response", lambda r: challenges.append(r.headers.get("www-authenticate", ""))
                if r.url.startswith(stack.api) and r.status == 401 else None)
    try:
        sign_in(tab.page, stack, "Alex Wilber")
        expect(tab.page.get_by_text("claims challenge")).to_be_visible()
        tab.page.get_by_role("button", name="Approve").click()
        expect_signed_in(tab.page, stack, "Alex Wilber", "Patti Fernandez")
    finally:
        to_devtenant(stack, "/_devtenant/mfa", json={"at_sign_in": True}).raise_for_status()
    assert len(challenges) == 1 and 'error="insufficient_claims"' in challenges[0]
    # the browser logs the challenge's 401 itself; the SPA logs nothing
    assert [e.split(": ", 1)[1] for e in tab.spa_errors(stack)] == [
        "Failed to load resource: the server responded with a status of 401 (UNAUTHORIZED)"]


def test_alex_approves_at_sign_in_by_default(stack: Stack, tab: Tab) -> None:
    sign_in(tab.page, stack, "Alex Wilber")
    expect(tab.page.get_by_text("requires multi-factor authentication")).to_be_visible()
    tab.page.get_by_role("button", name="Approve").click()
    expect_signed_in(tab.page, stack, "Alex Wilber", "Patti Fernandez")


def test_lynne_sees_that_consent_is_missing(stack: Stack, tab: Tab) -> None:
    sign_in(tab.page, stack, "Lynne Robbins")
    expect(tab.page.locator("#message")).to_contain_text("consent")
    expect(tab.page.locator("#me")).to_have_text("—")


def test_patti_has_no_manager(stack: Stack, tab: Tab) -> None:
    sign_in(tab.page, stack, "Patti Fernandez")
    expect_signed_in(tab.page, stack, "Patti Fernandez", "No manager")


# --- sign-out -----------------------------------------------------------------------------------


def test_sign_out_returns_to_sign_in(stack: Stack, tab: Tab) -> None:
    sign_in(tab.page, stack, "Adele Vance")
    expect_signed_in(tab.page, stack, "Adele Vance", "Nestor Wilke")
    tab.page.get_by_role("button", name="Sign out").click()
    expect(tab.page).to_have_url(re.compile(rf"^{re.escape(stack.spa)}"))
    expect(tab.page.get_by_role("button", name="Sign in", exact=True)).to_be_visible()
    expect(tab.page.get_by_role("button", name="Sign out")).to_be_hidden()
    # the dev tenant's session is gone too: signing in shows the account picker again
    tab.page.get_by_role("button", name="Sign in", exact=True).click()
    expect(tab.page.get_by_role("heading", name="Pick an account")).to_be_visible()


def test_the_sign_in_after_sign_out_makes_a_new_obo(stack: Stack, tab: Tab) -> None:
    deletes: list[int] = []
    tab.page.on("response", lambda r: deletes.append(r.status)
                if r.request.method == "DELETE" and r.url.startswith(stack.api) else None)
    sign_in(tab.page, stack, "Megan Bowen")
    expect_signed_in(tab.page, stack, "Megan Bowen", "Patti Fernandez")
    before = stack.tenant.obo_calls()
    tab.page.get_by_role("button", name="Sign out").click()
    expect(tab.page.get_by_role("button", name="Sign in", exact=True)).to_be_visible()
    assert deletes == [204]
    sign_in(tab.page, stack, "Megan Bowen")
    expect_signed_in(tab.page, stack, "Megan Bowen", "Patti Fernandez")
    assert stack.tenant.obo_calls() > before  # the API's cache was emptied: a new OBO
    assert tab.spa_errors(stack) == []


# --- CORS and the token endpoint ----------------------------------------------------------------


def test_a_page_from_an_origin_not_allowed_cannot_read_the_api(stack: Stack, tab: Tab) -> None:
    from scripts.serve_spa import make_server

    token = stack.tenant.tenant.api_token("adele")
    fetch = """async ([url, token]) => {
        try {
            const r = await fetch(url, {headers: {Authorization: `Bearer ${token}`}});
            return `read ${r.status}`;
        } catch (e) { return `blocked: ${e}`; }
    }"""
    other = make_server("127.0.0.1", 0, {})  # the same files, from an origin the API does not allow
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        tab.page.goto(f"http://127.0.0.1:{other.server_address[1]}/config.json")
        blocked = tab.page.evaluate(fetch, [f"{stack.api}/api/me", token])
        assert blocked == "blocked: TypeError: Failed to fetch"
    finally:
        other.shutdown()
        other.server_close()
    # the control: from the SPA's origin, the same request is read
    tab.page.goto(f"{stack.spa}config.json")
    assert tab.page.evaluate(fetch, [f"{stack.api}/api/me", token]) == "read 200"


def test_the_token_endpoint_refuses_an_spa_code_redeemed_without_origin(stack: Stack, tab: Tab) -> None:
    """The browser's own code (PKCE): the SPA's token request is held back, and redeemed
    from here, first without ``Origin`` (refused), then with the SPA's (accepted)."""
    captured: list[dict[str, str]] = []

    def hold(route) -> None:
        if route.request.method == "POST":
            captured.append(dict(parse_qsl(route.request.post_data or "")))
            route.abort()
        else:
            route.continue_()

    token_path = re.compile(r".*/oauth2/v2\.0/token(\?.*)?$")  # msal adds a query
    tab.page.route(token_path, hold)
    with tab.page.expect_event("requestfailed", lambda r: bool(token_path.match(r.url))):
        sign_in(tab.page, stack, "Adele Vance")  # (handlers run while Playwright waits)
    form = captured[0]
    assert form["grant_type"] == "authorization_code" and form["client_id"] == SPA_CLIENT_ID
    token_url = f"/{TENANT_ID}/oauth2/v2.0/token"
    refused = to_devtenant(stack, token_url, data=form)
    assert refused.status_code == 400
    body = refused.json()
    assert body["error"] == "invalid_request" and "AADSTS9002327" in body["error_description"]
    accepted = to_devtenant(stack, token_url, data=form, headers={"Origin": stack.spa.rstrip("/")})
    assert accepted.status_code == 200, accepted.text
    assert json.loads(accepted.text)["token_type"] == "Bearer"
