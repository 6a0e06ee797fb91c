"""The dev tenant as a test dependency: a served process, its settings, its tokens and sign-ins.

:mod:`devtenant.pytest_plugin` wraps these in fixtures; they work without pytest too::

    with DevTenantServer.start(tmp_dir) as tenant:
        settings = tenant.settings()            # for FlaskOBO.init_app(app, settings=...)
        token = tenant.user_token("adele")      # what the SPA sends the API
        signed_in = tenant.spa_sign_in("adele")  # the SPA's own code + PKCE sign-in

The server is ``python -m devtenant serve`` in a child process (real HTTPS, its own CA), on a
free loopback port, so the API under test runs its real, unpatched msal against it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

from devtenant import (
    API_APP_ID_URI,
    API_SCOPE,
    SPA_CLIENT_ID,
    TASKS_API_RESOURCE,
    TENANT_ID,
)
from devtenant.api import DevTenant

#: A redirect URI registered for the sample SPA (Entra's 'Single-Page Application' platform).
SPA_REDIRECT_URI = "http://localhost:5173/"
SPA_ORIGIN = "http://localhost:5173"
START_TIMEOUT = 30.0
READY = re.compile(r"devtenant ready at (\S+)")


class DevTenantError(RuntimeError):
    """The dev tenant did not start, or a sign-in did not end with tokens."""


@dataclass
class DevTenantServer:
    """A running dev tenant: where it answers, its state folder, and what tests need from it."""

    url: str
    state_dir: Path
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    # What tokens and discovery name when it differs from ``url`` (a proxy in front); None here.
    public_url: str | None = None

    # --- lifecycle -------------------------------------------------------------------------
    @classmethod
    @contextmanager
    def start(cls, state_dir: str | os.PathLike[str], *serve_args: str,
              timeout: float = START_TIMEOUT) -> Iterator[DevTenantServer]:
        """``python -m devtenant serve --port 0`` with its state in ``state_dir``; yields once
        it has printed its ready line (it listens by then), stops it (SIGTERM) afterwards."""
        state = Path(state_dir)
        state.mkdir(parents=True, exist_ok=True)
        log = state / "serve.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "devtenant", "serve", "--host", "127.0.0.1", "--port", "0",
                 "--state-dir", str(state), *serve_args],
                stdout=output, stderr=subprocess.STDOUT,
            )
        try:
            url = _wait_for_ready_line(process, log, timeout)
            yield cls(url, state, process, log)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    # --- the directory and its tokens --------------------------------------------------------
    @property
    def tenant(self) -> DevTenant:
        """The state's token minter (same keys and issuer as the server)."""
        return DevTenant(self.state_dir, self.public_url or self.url)

    @property
    def ca_bundle(self) -> Path:
        """Public CAs plus the dev tenant's CA: what clients verify its HTTPS with."""
        return self.tenant.ca_bundle_path

    def user_token(self, user: str = "adele", scopes: Sequence[str] = (API_SCOPE,), **options: Any) -> str:
        """The API's access token for ``user`` (short name, UPN or object id), as the SPA
        gets it; ``options`` are :meth:`DevTenant.api_token`'s (``mfa``, ``expired``, ``v1``,
        ``tenant``, ``lifetime``)."""
        return self.tenant.api_token(user, scopes=scopes, **options)

    def app_token(self, roles: Sequence[str] | None = None, **options: Any) -> str:
        """An app-only access token for the API (``roles``, no ``scp``), as a daemon gets it
        with client credentials; by default with the roles the client was granted."""
        return self.tenant.app_only_token(roles=roles, **options)

    def spa_sign_in(self, user: str = "adele", scopes: Sequence[str] = (f"{API_APP_ID_URI}/{API_SCOPE}",),
                    redirect_uri: str = SPA_REDIRECT_URI, origin: str = SPA_ORIGIN) -> dict[str, Any]:
        """The SPA's sign-in, over HTTP as a browser and msal-browser do it: ``/authorize``
        (authorization code + PKCE), pressing ``user``'s button (and "Approve" when MFA is
        asked), then redeeming the code cross-origin. Returns the token endpoint's answer
        (``access_token`` for the API, ``id_token``, ``refresh_token``, ``client_info``, ...)."""
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        scope = " ".join([*scopes, "openid", "profile", "offline_access"])
        state = secrets.token_urlsafe(8)
        request = {
            "client_id": SPA_CLIENT_ID, "response_type": "code", "redirect_uri": redirect_uri,
            "scope": scope, "response_mode": "fragment", "state": state,
            "nonce": secrets.token_urlsafe(8), "code_challenge": challenge,
            "code_challenge_method": "S256", "client_info": "1",
        }  # fmt: skip
        with self.session() as http:
            authorize = f"{self.url}/{TENANT_ID}/oauth2/v2.0/authorize"
            answer = http.post(authorize, data={**request, "user": user}, allow_redirects=False, timeout=30)
            if answer.status_code == 200:  # the MFA step-up page: approve
                answer = http.post(authorize, data={**request, "user": user, "step": "approve"},
                                   allow_redirects=False, timeout=30)
            location = answer.headers.get("Location", "")
            params = {k: v[0] for k, v in parse_qs(urlsplit(location).fragment).items()}
            if answer.status_code != 302 or params.get("state") != state or "code" not in params:
                raise DevTenantError(f"sign-in of {user!r} did not return a code: {answer.status_code} "
                                     f"{params.get('error', '')} {params.get('error_description', '')}")
            redeemed = http.post(
                f"{self.url}/{TENANT_ID}/oauth2/v2.0/token",
                data={"client_id": SPA_CLIENT_ID, "grant_type": "authorization_code", "code": params["code"],
                      "redirect_uri": redirect_uri, "code_verifier": verifier, "scope": scope,
                      "client_info": "1"},
                headers={"Origin": origin}, timeout=30,
            )
        if redeemed.status_code != 200:
            raise DevTenantError(f"code redemption failed: {redeemed.status_code} {redeemed.text[:300]}")
        tokens: dict[str, Any] = redeemed.json()
        return tokens

    # --- settings for the API under test ------------------------------------------------------
    def settings(self, authority_cache_dir: str | os.PathLike[str] | None = None,
                 redis_url: str | None = None, token_cache_keys: str | None = None,
                 **options: bool) -> dict[str, str]:
        """The settings that point an API at this dev tenant, for
        ``FlaskOBO.init_app(app, settings=...)``, ``app.config`` or the environment:
        tenant, client and its secret (``options``: :meth:`DevTenant.env`'s ``certificate``,
        ``federated``, ...), authority host, Graph's base URL, the CA bundle
        (``REQUESTS_CA_BUNDLE``, which must also be in the process environment when the app
        is created: flask-obo reads it there). With ``redis_url``, the token cache is in that
        Redis, sealed with ``token_cache_keys`` (a new Fernet key by default)."""
        values = self.tenant.env(**options)
        if self.public_url:  # Entra ID through the public URL, Graph straight to the process
            values["GRAPH_BASE_URL"] = f"{self.url}/v1.0"
        if authority_cache_dir is not None:
            values["AUTHORITY_CACHE_DIR"] = str(authority_cache_dir)
        if redis_url is not None:
            from cryptography.fernet import Fernet

            values["REDIS_URL"] = redis_url
            values["TOKEN_CACHE_KEYS"] = token_cache_keys or Fernet.generate_key().decode()
        return values

    def tasks_api_settings(self, name: str = "TASKS") -> dict[str, str]:
        """A second downstream API the dev tenant serves (``/tasks-api``, its own resource):
        ``DOWNSTREAM_APIS__<NAME>__BASE_URL`` and ``__SCOPES``."""
        return {
            f"DOWNSTREAM_APIS__{name}__BASE_URL": f"{self.url}/tasks-api/v1",
            f"DOWNSTREAM_APIS__{name}__SCOPES": f"{TASKS_API_RESOURCE}/.default",
        }

    # --- observing it ---------------------------------------------------------------------
    def session(self) -> requests.Session:
        """A requests session that trusts the dev tenant's CA."""
        session = requests.Session()
        session.verify = str(self.ca_bundle)
        session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would win over verify
        return session

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A request to the dev tenant (its hooks: ``/_devtenant/...``)."""
        with self.session() as http:
            return http.request(method, f"{self.url}{path}", timeout=kwargs.pop("timeout", 10), **kwargs)

    def counters(self) -> dict[str, Any]:
        """What it has served: ``{"token": {"on_behalf_of": n, "refresh_token": n, ...}, ...}``."""
        answer = self.request("GET", "/_devtenant/counters")
        answer.raise_for_status()
        counters: dict[str, Any] = answer.json()
        return counters

    def token_calls(self) -> dict[str, int]:
        """Token endpoint calls by grant, the grants called at least once."""
        return {grant: calls for grant, calls in self.counters()["token"].items() if calls}

    def reset_counters(self) -> None:
        self.request("POST", "/_devtenant/counters/reset").raise_for_status()


def _wait_for_ready_line(process: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    """The URL of the ready line ``serve`` prints once it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = READY.search(log.read_text(errors="replace"))
        if match:
            return match.group(1)
        if process.poll() is not None:
            raise DevTenantError(f"the dev tenant exited ({process.returncode}):\n{log.read_text()[-2000:]}")
        time.sleep(0.05)  # polling the log for the line, not waiting for a fixed time
    raise DevTenantError(f"the dev tenant did not start within {timeout}s:\n{log.read_text()[-2000:]}")


# --- a throw-away redis-server ------------------------------------------------------------------
def redis_server_binary() -> str | None:
    """redis-server's path (on PATH, or in /usr/sbin where Debian puts it), or None."""
    found = shutil.which("redis-server")
    return found or next((p for p in ("/usr/sbin/redis-server",) if os.access(p, os.X_OK)), None)


@contextmanager
def redis_server(workdir: str | os.PathLike[str], binary: str,
                 timeout: float = START_TIMEOUT) -> Iterator[str]:
    """A redis-server on a free loopback port, persisting nothing; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_pong(port, process, timeout)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_for_pong(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DevTenantError(f"redis-server exited ({process.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)  # not listening yet: poll again
    raise DevTenantError(f"redis-server did not answer within {timeout}s")
