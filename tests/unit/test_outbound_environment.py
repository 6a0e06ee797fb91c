"""The outbound environment (``REQUESTS_CA_BUNDLE``, ``HTTPS_PROXY``/``HTTP_PROXY``,
``NO_PROXY``, ``.netrc``) means what it means to requests, but is read at start-up, not
on every request: real sockets on loopback, a real TLS server and a recording proxy."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import trustme
from requests.utils import DEFAULT_CA_BUNDLE_PATH

from flask_obo.http import build_session


class _Recorder(BaseHTTPRequestHandler):
    """Answers 200 and remembers each request line and its Authorization header."""

    seen: list[tuple[str, str | None]]

    def do_GET(self) -> None:
        self.seen.append((self.requestline, self.headers.get("Authorization")))
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_CONNECT(self) -> None:
        self.seen.append((self.requestline, None))
        self.send_response(502)  # a proxy that tunnels nowhere: enough to see it was asked
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


def _serve(tls: ssl.SSLContext | None = None) -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    seen: list[tuple[str, str | None]] = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme = "https" if tls else "http"
    yield f"{scheme}://localhost:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def plain() -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    yield from _serve()


@pytest.fixture
def proxy() -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    yield from _serve()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls(ca: trustme.CA) -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    yield from _serve(context)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY",
                 "NO_PROXY", "https_proxy", "http_proxy", "all_proxy", "no_proxy", "NETRC"):
        monkeypatch.delenv(name, raising=False)


def test_requests_ca_bundle_is_trusted(tls, ca: trustme.CA, tmp_path: Path, monkeypatch) -> None:
    url, seen = tls
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with pytest.raises(requests.exceptions.SSLError):
        build_session([]).get(url + "/untrusted", timeout=5)  # without it, the private CA is unknown

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    session = build_session([url])
    assert session.get(url + "/me", timeout=5).status_code == 200

    monkeypatch.delenv("REQUESTS_CA_BUNDLE")  # read at start-up: the session keeps trusting it
    assert session.get(url + "/again", timeout=5).status_code == 200
    assert [line for line, _ in seen] == ["GET /me HTTP/1.1", "GET /again HTTP/1.1"]


def test_curl_ca_bundle_is_the_fallback(tls, ca: trustme.CA, tmp_path: Path, monkeypatch) -> None:
    url, _ = tls
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(bundle))
    assert build_session([url]).get(url + "/me", timeout=5).status_code == 200


def test_https_proxy_carries_https_requests(proxy, monkeypatch) -> None:
    proxy_url, through_proxy = proxy
    monkeypatch.setenv("HTTPS_PROXY", proxy_url)
    target = f"https://localhost:{_unused_port()}"
    session = build_session([], [target])  # the authority: no retries
    with pytest.raises(requests.exceptions.ProxyError):
        session.get(target + "/me", timeout=5)
    assert through_proxy[0][0].startswith(f"CONNECT localhost:{target.rsplit(':', 1)[1]} ")

    monkeypatch.delenv("HTTPS_PROXY")  # read at start-up: still the proxy
    with pytest.raises(requests.exceptions.ProxyError):
        session.get(target + "/again", timeout=5)
    assert len(through_proxy) == 2


def test_http_proxy_and_no_proxy(proxy, plain, monkeypatch) -> None:
    proxy_url, through_proxy = proxy
    url, direct = plain
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    assert build_session([url]).get(url + "/via-proxy", timeout=5).status_code == 200
    assert through_proxy[-1][0] == f"GET {url}/via-proxy HTTP/1.1" and direct == []

    monkeypatch.setenv("NO_PROXY", "example.org,localhost")
    session = build_session([url])
    assert session.get(url + "/direct", timeout=5).status_code == 200
    assert direct[-1][0] == "GET /direct HTTP/1.1" and len(through_proxy) == 1

    monkeypatch.delenv("NO_PROXY")  # read at start-up: still direct
    assert session.get(url + "/still-direct", timeout=5).status_code == 200
    assert direct[-1][0] == "GET /still-direct HTTP/1.1" and len(through_proxy) == 1


def test_an_origin_first_met_later_is_resolved_then_and_kept(proxy, plain, monkeypatch) -> None:
    proxy_url, through_proxy = proxy
    url, direct = plain
    session = build_session([])  # this origin is not known at start-up
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    assert session.get(url + "/first", timeout=5).status_code == 200
    monkeypatch.delenv("HTTP_PROXY")
    assert session.get(url + "/second", timeout=5).status_code == 200
    assert [line for line, _ in through_proxy] == [f"GET {url}/first HTTP/1.1", f"GET {url}/second HTTP/1.1"]
    assert direct == []


def test_netrc_logins_apply_unless_the_request_has_its_own(plain, tmp_path: Path, monkeypatch) -> None:
    url, seen = plain
    netrc = tmp_path / "netrc"
    netrc.write_text("machine localhost login robot password hunter2\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    session = build_session([url])
    session.get(url + "/netrc", timeout=5)
    session.get(url + "/bearer", headers={"Authorization": "Bearer t"}, auth=lambda r: r, timeout=5)
    assert seen[0][1] is not None and seen[0][1].startswith("Basic ")
    assert seen[1][1] == "Bearer t"


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Redirector(BaseHTTPRequestHandler):
    """Answers every GET with a 302 to ``target`` (as Graph does for a file's content)."""

    target: str

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.mark.parametrize("make_session", [build_session, None], ids=["resolved", "requests"])
def test_a_redirect_to_another_origin_gets_that_origins_proxy(proxy, make_session, monkeypatch) -> None:
    proxy_url, through_proxy = proxy
    elsewhere = f"http://127.0.0.1:{_unused_port()}/content"  # not in NO_PROXY: via the proxy
    handler = type("Handler", (_Redirector,), {"target": elsewhere})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        monkeypatch.setenv("NO_PROXY", "localhost")  # the API itself is reached directly
        api = f"http://localhost:{server.server_address[1]}"
        session = make_session([api]) if make_session else requests.Session()
        assert session.get(api + "/me/drive/content", timeout=5).status_code == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert [line for line, _ in through_proxy] == [f"GET {elsewhere} HTTP/1.1"]


def test_origins_met_at_run_time_are_kept_within_a_bound(monkeypatch) -> None:
    """A downstream API's redirects (or an app's own calls) can name any number of hosts:
    the session keeps a bounded number of them, and past that still reads each correctly."""
    from flask_obo import http

    session = build_session([])
    for n in range(http.MAX_ORIGINS_KEPT + 100):
        session.resolve(f"https://host{n}.example/file")
    assert len(session._origins) <= http.MAX_ORIGINS_KEPT
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert session.resolve("https://one-more.example/x").proxies["https"] == "http://proxy.example:3128"


def test_a_calls_own_proxies_and_the_sessions_still_win_without_any_in_the_environment(
        proxy, plain) -> None:
    """The session skips requests' merge of two empty proxy mappings; a proxy given on either
    side is still merged and used."""
    proxy_url, through_proxy = proxy
    url, direct = plain
    session = build_session([url])  # no proxy variable set: the short cut applies
    assert session.get(url + "/direct", timeout=5).status_code == 200
    assert session.get(url + "/per-call", proxies={"http": proxy_url}, timeout=5).status_code == 200
    session.proxies = {"http": proxy_url}
    assert session.get(url + "/per-session", timeout=5).status_code == 200
    assert [line for line, _ in through_proxy] == [f"GET {url}/per-call HTTP/1.1",
                                                    f"GET {url}/per-session HTTP/1.1"]
    assert [line for line, _ in direct] == ["GET /direct HTTP/1.1"]


def _stat_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths requests asks ``os.path.exists``/``isdir`` about from now on."""
    import os.path

    asked: list[str] = []
    for name in ("exists", "isdir"):
        real = getattr(os.path, name)

        def recording(path, _real=real):  # type: ignore[no-untyped-def]
            asked.append(os.fspath(path))
            return _real(path)

        monkeypatch.setattr(os.path, name, recording)
    return asked


def test_the_ca_bundle_is_looked_at_at_start_up_only(tls, ca: trustme.CA, tmp_path: Path,
                                                      monkeypatch) -> None:
    """requests stats the CA bundle three times per request; the session's adapters know
    at start-up whether it is a file, and it is still what decides trust."""
    url, seen = tls
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    session = build_session([url])
    asked = _stat_calls(monkeypatch)
    for n in range(3):
        assert session.get(f"{url}/again-{n}", timeout=5).status_code == 200
    assert str(bundle) not in asked and len(seen) == 3

    # the same for requests' default bundle (certifi's), which does not know this CA
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    default = build_session([], [url])  # no retries
    asked.clear()
    with pytest.raises(requests.exceptions.SSLError):
        default.get(url + "/untrusted", timeout=5)
    assert DEFAULT_CA_BUNDLE_PATH not in asked and len(seen) == 3


def test_a_ca_directory_is_trusted(tls, ca: trustme.CA, tmp_path: Path, monkeypatch) -> None:
    """REQUESTS_CA_BUNDLE may name a directory of hashed certificates (c_rehash), as with
    requests: it reaches urllib3 as a directory."""
    import subprocess

    url, _ = tls
    directory = tmp_path / "certs"
    directory.mkdir()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    subject_hash = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", str(directory / "ca.pem")],
                                  capture_output=True, text=True, check=True).stdout.strip()
    (directory / f"{subject_hash}.0").symlink_to(directory / "ca.pem")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(directory))
    session = build_session([url])
    asked = _stat_calls(monkeypatch)
    assert session.get(url + "/me", timeout=5).status_code == 200
    assert asked == []


def test_a_ca_bundle_missing_at_start_up_is_named_as_requests_names_it(tls, tmp_path: Path,
                                                                         monkeypatch) -> None:
    url, seen = tls
    missing = tmp_path / "no-such-ca.pem"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(missing))
    with pytest.raises(OSError, match="Could not find a suitable TLS CA certificate bundle"):
        build_session([url]).get(url + "/me", timeout=5)
    assert seen == []


def test_a_calls_own_verify_still_decides(tls, ca: trustme.CA, tmp_path: Path) -> None:
    url, seen = tls
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    session = build_session([url])  # the default bundle: this CA is unknown to it
    assert session.get(url + "/own-bundle", verify=str(bundle), timeout=5).status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        session.get(url + "/default", timeout=5)
    assert [line for line, _ in seen] == ["GET /own-bundle HTTP/1.1"]


class _CookieSetter(_Recorder):
    def do_GET(self) -> None:
        self.seen.append((self.requestline, self.headers.get("Cookie")))
        self.send_response(200)
        self.send_header("Set-Cookie", "session=alice-session; Path=/")
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_the_session_keeps_no_cookie_yet_each_answer_shows_its_own() -> None:
    seen: list[tuple[str, str | None]] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_CookieSetter,), {"seen": seen}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://localhost:{server.server_address[1]}"
        session = build_session([url])
        first = session.get(url + "/alice", timeout=5)
        session.get(url + "/bob", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert first.cookies.get("session") == "alice-session"  # the answer's own, as requests shows it
    assert len(session.cookies) == 0
    assert seen == [("GET /alice HTTP/1.1", None), ("GET /bob HTTP/1.1", None)]
