"""Fixtures for the dev tenant's own tests.

Most tests drive the Flask app in-process (fast); the msal end-to-end modules
(``test_msal_e2e.py``, ``test_identity_breadth.py``) start one real
``python -m devtenant serve`` per module (``dt_server``). Fixture names are prefixed (``dt_``) so
they never shadow the API's fixtures in tests/conftest.py.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msal
import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from devtenant import API_CLIENT_ID, API_CLIENT_SECRET, TENANT_ID
from devtenant.api import DevTenant
from devtenant.server import create_app

REPO = Path(__file__).resolve().parents[2]
BASE = "https://localhost:8443"
TOKEN_PATH = f"/{TENANT_ID}/oauth2/v2.0/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MSAL_SCOPE = "https://graph.microsoft.com/.default openid profile offline_access"


def claims_of(token: str) -> dict[str, Any]:
    """Decode a JWT payload without verifying (assertions about content only)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def header_of(token: str) -> dict[str, Any]:
    head = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))


@pytest.fixture(scope="session")
def dt_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One state folder for the in-process tests (CA and keys are generated once)."""
    path = tmp_path_factory.mktemp("devtenant-state")
    DevTenant(path).ensure_state()
    return path


@pytest.fixture
def dt_tenant(dt_state_dir: Path) -> DevTenant:
    return DevTenant(dt_state_dir, BASE)


@pytest.fixture
def dt_app(dt_state_dir: Path) -> Flask:
    """A fresh app per test: its counters, refresh tokens and switches start clean."""
    return create_app(dt_state_dir)


@pytest.fixture
def dt_client(dt_app: Flask) -> Iterator[FlaskClient]:
    with dt_app.test_client() as client:
        yield client


class TokenEndpoint:
    """Small helper to post to the token endpoint like msal does."""

    def __init__(self, client: FlaskClient, tenant: DevTenant) -> None:
        self.client = client
        self.tenant = tenant

    def post(self, data: dict[str, str], **kwargs: Any):
        return self.client.post(TOKEN_PATH, base_url=BASE, data=data, **kwargs)

    def obo(
        self,
        assertion: str,
        scope: str = MSAL_SCOPE,
        secret: str = API_CLIENT_SECRET,
        client_id: str = API_CLIENT_ID,
        headers: dict[str, str] | None = None,
        **extra: str,
    ):
        data = {
            "grant_type": JWT_BEARER,
            "requested_token_use": "on_behalf_of",
            "assertion": assertion,
            "scope": scope,
            "client_id": client_id,
            "client_secret": secret,
            "client_info": "1",
            **extra,
        }
        return self.post(data, headers=headers or {})

    def obo_for(self, user: str, **kwargs: Any):
        token_kwargs = {k: kwargs.pop(k) for k in ("mfa", "expired") if k in kwargs}
        return self.obo(self.tenant.api_token(user, **token_kwargs), **kwargs)

    def refresh(self, refresh_token: str, scope: str | None = MSAL_SCOPE):
        data = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": API_CLIENT_ID,
            "client_secret": API_CLIENT_SECRET,
        }
        if scope:
            data["scope"] = scope
        return self.post(data)


@pytest.fixture
def dt_token(dt_client: FlaskClient, dt_tenant: DevTenant) -> TokenEndpoint:
    return TokenEndpoint(dt_client, dt_tenant)


# --- a real served dev tenant (one per module) --------------------------------------


@dataclass
class Server:
    url: str
    tenant: DevTenant
    log: Path

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, verify=str(self.tenant.ca_bundle_path), **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, verify=str(self.tenant.ca_bundle_path), **kwargs)

    def delete(self, path: str, **kwargs) -> requests.Response:
        return requests.delete(self.url + path, verify=str(self.tenant.ca_bundle_path), **kwargs)

    def counters(self) -> dict:
        return self.get("/_devtenant/counters").json()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(server: Server, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"devtenant exited early:\n{server.log.read_text()}")
        try:
            if server.get("/healthz", timeout=1).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or slow to answer
            time.sleep(0.05)  # poll interval, not a fixed wait
    pytest.fail(f"devtenant not healthy after {timeout}s:\n{server.log.read_text()}")


@pytest.fixture(scope="module")
def dt_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    state = tmp_path_factory.mktemp("devtenant-serve")
    port = _free_port()
    url = f"https://localhost:{port}"
    DevTenant(state).ensure_state()  # the CA bundle must exist before the first poll
    log = state / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devtenant", "serve", "--port", str(port), "--state-dir", state],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        server = Server(url, DevTenant(state, url), log)
        try:
            _wait_healthy(server, proc)
            yield server
        finally:
            proc.send_signal(signal.SIGTERM)
            returncode = proc.wait(timeout=15)
    assert returncode == 0, log.read_text()


@pytest.fixture
def msal_app(dt_server: Server, monkeypatch: pytest.MonkeyPatch):
    """Factory for msal apps that trust the dev tenant's CA (via REQUESTS_CA_BUNDLE)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(dt_server.tenant.ca_bundle_path))

    def make(
        credential: object = API_CLIENT_SECRET, tenant: str = TENANT_ID, **kwargs: Any
    ) -> msal.ConfidentialClientApplication:
        return msal.ConfidentialClientApplication(
            API_CLIENT_ID,
            client_credential=credential,
            authority=f"{dt_server.url}/{tenant}",
            instance_discovery=False,
            **kwargs,
        )

    return make
