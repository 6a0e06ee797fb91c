"""Issue 19: how long a downstream call waits is a setting, ``GRAPH_TIMEOUT_SECONDS`` and
``DOWNSTREAM_APIS__<NAME>__TIMEOUT_SECONDS``. A slow loopback API (TLS, trusted through
``REQUESTS_CA_BUNDLE``) that answers after a delay: an API whose timeout is shorter than the
delay ends at its timeout with 504; the same server, the same delay, a longer timeout: 200."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import responses
import trustme
from flask import Flask

from flask_obo import FlaskOBO
from flask_obo.extension import services_of
from flask_obo.settings import DEFAULT_DOWNSTREAM_TIMEOUT, Settings
from tests.support.fake_entra import ADELE, FakeEntra, settings_env

SHORT, LONG = 0.4, 5.0  # the two APIs' timeouts (seconds)
DELAY = 1.0  # how long the slow API takes to answer: between the two


class _Slow(BaseHTTPRequestHandler):
    """Answers 200 after ``?delay=`` seconds (cut short when the test ends)."""

    released: threading.Event

    def do_GET(self) -> None:
        delay = float(parse_qs(urlsplit(self.path).query).get("delay", ["0"])[0])
        self.released.wait(min(delay, 10.0))
        body = b'{"ok": true}'
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (its timeout): nothing to answer
            pass

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def slow_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    released = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Slow,), {"released": released}))
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    for name in ("CURL_CA_BUNDLE", "HTTPS_PROXY", "ALL_PROXY", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    try:
        yield f"https://localhost:{server.server_address[1]}"
    finally:
        released.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def adopters_app(base: str, **config: str) -> Flask:
    app = Flask(__name__)
    app.config.update(settings_env(
        GRAPH_BASE_URL=f"{base}/graph", GRAPH_TIMEOUT_SECONDS=str(SHORT),
        DOWNSTREAM_APIS__HASTY__BASE_URL=f"{base}/hasty", DOWNSTREAM_APIS__HASTY__SCOPES="api://x/.default",
        DOWNSTREAM_APIS__HASTY__TIMEOUT_SECONDS=str(SHORT),
        DOWNSTREAM_APIS__PATIENT__BASE_URL=f"{base}/patient", DOWNSTREAM_APIS__PATIENT__SCOPES="api://x/.default",
        DOWNSTREAM_APIS__PATIENT__TIMEOUT_SECONDS=str(LONG), **config))
    obo = FlaskOBO(app)

    @app.get("/call/<name>")
    @obo.require_scope("user_impersonation")
    def call(name: str) -> dict[str, bool]:
        return obo.downstream(name).get(f"/item?delay={DELAY}").json()

    return app


def timed_get(client, path: str, token: str) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    status = client.get(path, headers={"Authorization": f"Bearer {token}"}).status_code
    return status, time.perf_counter() - started


def test_each_apis_timeout_setting_takes_effect(slow_api: str) -> None:
    entra = FakeEntra()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        entra.register(rsps)
        rsps.add_passthru(slow_api)
        client = adopters_app(slow_api).test_client()
        token = entra.api_token(ADELE)
        timed_get(client, "/call/patient", token)  # tokens fetched and the TLS connection pooled

        patient_status, patient = timed_get(client, "/call/patient", token)
        hasty_status, hasty = timed_get(client, "/call/hasty", token)
        graph_status, graph = timed_get(client, "/call/graph", token)

    assert patient_status == 200 and patient >= DELAY  # the server's delay, measured: the baseline
    assert hasty_status == 504 and graph_status == 504
    for elapsed in (hasty, graph):
        assert SHORT <= elapsed < patient, "the call ends at its own timeout, before the answer"
    as_app = services_of(client.application).downstream_app_apis  # downstream(name, as_app=True)
    assert as_app["hasty"].timeout == (SHORT, SHORT) and as_app["patient"].timeout[1] == LONG


def test_the_timeouts_are_settings_with_one_default() -> None:
    settings = Settings.from_env(settings_env(
        DOWNSTREAM_APIS__TASKS__BASE_URL="https://tasks.example", DOWNSTREAM_APIS__TASKS__SCOPES="api://t/.default"))
    assert settings.downstream_apis["graph"].timeout == (3.05, DEFAULT_DOWNSTREAM_TIMEOUT)
    assert settings.downstream_apis["tasks"].timeout_seconds == DEFAULT_DOWNSTREAM_TIMEOUT
    quick = Settings.from_env(settings_env(GRAPH_TIMEOUT_SECONDS="1.5", OBO_ENTRA_READ_TIMEOUT_SECONDS="4"))
    assert quick.downstream_apis["graph"].timeout == (1.5, 1.5)  # connecting waits no longer either
    assert quick.entra_timeout == (3.05, 4.0)
    with pytest.raises(ValueError, match="DOWNSTREAM_APIS__TASKS__TIMEOUT_SECONDS: must be a number"):
        Settings.from_env(settings_env(
            DOWNSTREAM_APIS__TASKS__BASE_URL="https://tasks.example", DOWNSTREAM_APIS__TASKS__SCOPES="api://t/.default",
            DOWNSTREAM_APIS__TASKS__TIMEOUT_SECONDS="soon"))
