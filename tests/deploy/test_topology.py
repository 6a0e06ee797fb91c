"""The docker-compose topology as real processes on loopback.

One password-protected redis-server, the dev tenant (Entra ID + Graph over HTTPS), two
gunicorn instances of the API (two workers each, one shared TOKEN_CACHE_KEYS, as the
compose file gives them), and nginx running the shipped config/nginx.conf (rendered
for loopback: upstreams, ports, certificate and file paths only) in front of them.
"""

from __future__ import annotations

import http.client
import re
import secrets
import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.deploy.conftest import ROOT, NginxProcess, run_nginx
from tests.support.servers import redis_server, require_binary, wait_until
from tests.support.stack import DevTenantProcess, GunicornProcess, api_env, devtenant, gunicorn

pytestmark = [pytest.mark.nginx, pytest.mark.e2e]

TIMEOUT = 30
UPSTREAM = re.compile(r"upstream=(.*)$")
SPA_BUNDLE = "node_modules/@azure/msal-browser/lib/msal-browser.min.js"


@dataclass
class Api:
    process: GunicornProcess
    access_log: Path

    @property
    def addr(self) -> str:
        return self.process.url.removeprefix("http://")

    def access_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []


def start_api(exit_stack: ExitStack, env: dict[str, str], tmp: Path, name: str, workers: int = 2) -> Api:
    """One API instance under gunicorn (shipped config), its access log in ``tmp``."""
    access_log = tmp / f"{name}.access.log"
    env = {**env, "GUNICORN_ACCESS_LOG": str(access_log)}
    process = exit_stack.enter_context(gunicorn(env, workers=workers))
    return Api(process, access_log)


@dataclass
class Stack:
    tenant: DevTenantProcess
    env: dict[str, str]  # the API's environment: shared Redis (with password) and cache keys
    apis: list[Api]
    nginx: NginxProcess
    nginx_binary: str
    tmp: Path

    def token(self, user: str) -> str:
        return self.tenant.tenant.api_token(user)

    def tls_files(self) -> tuple[Path, Path]:
        return tls_files(self.tenant)


def tls_files(tenant: DevTenantProcess) -> tuple[Path, Path]:
    """The dev tenant's server certificate and key (server.pem, server-key.pem)."""
    paths = tenant.tenant.paths
    return paths.server_cert, paths.server_key


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    nginx_binary = require_binary("nginx")
    tmp = tmp_path_factory.mktemp("deploy-topology")
    with ExitStack() as exit_stack:
        redis_url = exit_stack.enter_context(redis_server(password=secrets.token_urlsafe(16)))
        tenant = exit_stack.enter_context(devtenant(tmp / "state"))
        env = api_env(tenant, redis_url)  # one TOKEN_CACHE_KEYS for both instances, as in compose
        apis = [start_api(exit_stack, env, tmp, f"api-{n}") for n in (1, 2)]
        nginx = exit_stack.enter_context(
            run_nginx(nginx_binary, tmp, [api.addr for api in apis], *tls_files(tenant))
        )
        yield Stack(tenant, env, apis, nginx, nginx_binary, tmp)


def get(url: str, token: str | None = None, user_agent: str | None = None, **kwargs) -> requests.Response:
    headers = kwargs.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if user_agent:
        headers["User-Agent"] = user_agent
    return requests.get(url, headers=headers, timeout=TIMEOUT, **kwargs)


def marker() -> str:
    """A unique user agent to find one test's requests in the access logs."""
    return f"deploy-test-{uuid.uuid4().hex}"


def lines_with(read: Callable[[], list[str]], needle: str, count: int) -> list[str]:
    """Access log lines containing ``needle``, once ``count`` are there (written after the response)."""
    wait_until(lambda: sum(needle in line for line in read()) >= count, timeout=10, what=f"{count} log lines")
    return [line for line in read() if needle in line]


def upstreams(line: str) -> list[str]:
    match = UPSTREAM.search(line)
    assert match, line
    return [addr.strip() for addr in match.group(1).split(",")]


# --- through nginx -----------------------------------------------------------------------


def test_nginx_health_and_api_probes(stack: Stack) -> None:
    response = get(f"{stack.nginx.http_url}/nginx-healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert get(f"{stack.nginx.http_url}/healthz").json() == {"status": "ok"}
    ready = get(f"{stack.nginx.http_url}/readyz")
    assert ready.status_code == 200, ready.text  # redis (with its password) and the authority answer
    assert ready.json()["status"] == "ready"


def test_manager_through_nginx(stack: Stack) -> None:
    response = get(f"{stack.nginx.http_url}/api/me/manager", stack.token("adele"))
    assert response.status_code == 200, response.text
    nestor = stack.tenant.tenant.directory().require_user("nestor")
    assert response.json()["displayName"] == nestor.display_name == "Nestor Wilke"


def test_no_token_is_rejected_through_nginx(stack: Stack) -> None:
    response = get(f"{stack.nginx.http_url}/api/me/manager")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_requests_are_balanced_over_both_instances(stack: Stack) -> None:
    agent, token = marker(), stack.token("patti")
    for _ in range(20):
        assert get(f"{stack.nginx.http_url}/api/whoami", token, agent).status_code == 200
    served = [upstreams(line) for line in lines_with(stack.nginx.access_lines, agent, 20)]
    assert {addr for attempt in served for addr in attempt} == {api.addr for api in stack.apis}
    # and each instance logged its share (so nginx's log is not lying)
    wait_until(lambda: sum(len([ln for ln in api.access_lines() if agent in ln]) for api in stack.apis) == 20,
               timeout=10, what="gunicorn access lines")
    counts = [len([line for line in api.access_lines() if agent in line]) for api in stack.apis]
    assert all(counts) and sum(counts) == 20, counts


def test_token_cached_by_one_instance_is_a_hit_on_the_other(stack: Stack) -> None:
    api1, api2 = stack.apis
    stack.tenant.reset_counters()
    first = get(f"{api1.process.url}/api/me", stack.token("nestor"))
    assert first.status_code == 200, first.text
    assert stack.tenant.obo_calls() == 1
    second = get(f"{api2.process.url}/api/me", stack.token("nestor"))  # a new SPA token, other instance
    assert second.status_code == 200, second.text
    assert second.json() == first.json()
    assert stack.tenant.obo_calls() == 1
    assert stack.tenant.counters()["graph"]["/v1.0/me"] == 2


def test_cold_burst_across_instances_makes_one_obo_call(stack: Stack) -> None:
    n, agent = 32, marker()
    tokens = [stack.token("megan") for _ in range(n)]
    assert len(set(tokens)) == n
    stack.tenant.reset_counters()
    barrier = threading.Barrier(n)

    def call(token: str) -> requests.Response:
        barrier.wait(timeout=TIMEOUT)
        return get(f"{stack.nginx.http_url}/api/me", token, agent)

    with ThreadPoolExecutor(max_workers=n) as pool:
        responses = list(pool.map(call, tokens))
    assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses if not r.ok][:3]
    assert {r.json()["userPrincipalName"] for r in responses} == {"megan@flaskobodev.onmicrosoft.com"}
    assert stack.tenant.obo_calls() == 1
    served = {upstreams(line)[-1] for line in lines_with(stack.nginx.access_lines, agent, n)}
    assert served == {api.addr for api in stack.apis}  # the burst did reach both instances


def test_spoofed_forwarded_for_is_not_trusted_beyond_one_hop(stack: Stack) -> None:
    """gunicorn's %(h)s is REMOTE_ADDR after ProxyFix rewrote it, so the access log shows
    the client address the app believes."""
    api1 = stack.apis[0]
    spoof = {"X-Forwarded-For": "6.6.6.6"}
    direct = f"/xff-direct-{uuid.uuid4().hex}"
    assert get(f"{api1.process.url}{direct}", headers=dict(spoof)).status_code == 404
    # control: straight to gunicorn (as if it were nginx), the one trusted hop is believed
    (line,) = lines_with(api1.access_lines, direct, 1)
    assert line.split()[0] == "6.6.6.6", line

    proxied = f"/xff-nginx-{uuid.uuid4().hex}"
    assert get(f"{stack.nginx.http_url}{proxied}", headers=dict(spoof)).status_code == 404
    (line,) = lines_with(lambda: stack.apis[0].access_lines() + stack.apis[1].access_lines(), proxied, 1)
    assert line.split()[0] == "127.0.0.1", line  # nginx appended the real peer; only that one counts


def test_tls_server_block(stack: Stack) -> None:
    ca = str(stack.tenant.state_dir / "ca-bundle.pem")
    response = get(f"{stack.nginx.https_url}/api/whoami", stack.token("adele"), verify=ca)
    assert response.status_code == 200, response.text
    assert response.json()["preferred_username"] == "adele@flaskobodev.onmicrosoft.com"
    assert response.headers.get("Strict-Transport-Security") == "max-age=31536000"
    # 'always': error responses carry it too
    unauthenticated = get(f"{stack.nginx.https_url}/api/whoami", verify=ca)
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers.get("Strict-Transport-Security") == "max-age=31536000"
    assert "Strict-Transport-Security" not in get(f"{stack.nginx.http_url}/nginx-healthz").headers


def test_nginx_serves_the_sample_spa_beside_the_api(stack: Stack) -> None:
    """The SPA's page at /, its script, its compose config and msal-browser's bundle are
    files; nothing else of spa/ is, and every other path stays the API's."""
    ca = str(stack.tenant.state_dir / "ca-bundle.pem")
    base = stack.nginx.https_url
    page = get(f"{base}/", verify=ca)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert ">Sign in</button>" in page.text
    script = get(f"{base}/app.js", verify=ca)
    assert script.status_code == 200 and script.headers["Content-Type"].startswith("text/javascript")
    config = get(f"{base}/config.json", verify=ca)
    assert config.json()["redirectUri"] == "https://localhost:8444/"
    if (ROOT / "spa" / SPA_BUNDLE).is_file():  # npm ci in spa/ (make test does it)
        bundle = get(f"{base}/{SPA_BUNDLE}", verify=ca)
        assert bundle.status_code == 200 and "msal" in bundle.text[:200]
    for other in ("/package.json", "/config.compose.json", "/node_modules/@azure/msal-common/package.json"):
        response = get(f"{base}{other}", verify=ca)
        assert response.status_code == 404 and response.json()["error"], other  # the API's 404
    assert get(f"{base}/api/whoami", stack.token("adele"), verify=ca).status_code == 200


def test_access_logs_hold_no_token_or_query_string(stack: Stack) -> None:
    agent, token = marker(), stack.token("alex")
    for base in (stack.nginx.http_url, *(api.process.url for api in stack.apis)):
        response = get(f"{base}/api/whoami?access_token={token}&secret=query-marker", token, agent)
        assert response.status_code == 200, response.text
    nginx_lines = lines_with(stack.nginx.access_lines, agent, 1)
    api_lines = lines_with(lambda: stack.apis[0].access_lines() + stack.apis[1].access_lines(), agent, 3)
    assert any("/api/whoami" in line for line in nginx_lines + api_lines)  # the requests are logged ...
    logs = [stack.nginx.access_log, stack.nginx.error_log]
    logs += [p for api in stack.apis for p in (api.access_log, api.process.log)]
    signature = token.rsplit(".", 1)[1]
    for path in logs:
        text = path.read_text() if path.exists() else ""
        assert signature not in text, path  # ... but neither the token
        assert "query-marker" not in text, path  # nor the query string


def get_from(base_url: str, path: str, source: str) -> tuple[int, str]:
    """GET ``path`` with the connection's source address ``source`` (any 127/8 address
    reaches loopback), as a client on another network would."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT,
                                            source_address=(source, 0))
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_metrics_are_refused_through_nginx_except_from_the_scrape_network(stack: Stack) -> None:
    """gunicorn serves /metrics without a token; through nginx only the allowed network
    (loopback by default) reaches it, however the path is spelled."""
    outside = "127.0.0.2"  # loopback, but not 127.0.0.1: not in nginx.conf's allow list
    for path in ("/metrics", "/metrics?format=x", "/%6detrics", "//metrics", "/./metrics"):
        status, body = get_from(stack.nginx.http_url, path, outside)
        assert status == 403, (path, status)
        assert "flask_obo" not in body
    status, body = get_from(stack.nginx.http_url, "/metrics/", outside)  # not the route: Flask's 404
    assert status == 404 and "flask_obo" not in body
    status, body = get_from(stack.nginx.http_url, "/metrics", "127.0.0.1")  # the default scrape network
    assert status == 200 and "flask_obo_requests_total" in body
    for api in stack.apis:  # each instance, directly: what Prometheus scrapes
        direct = get(f"{api.process.url}/metrics")
        assert direct.status_code == 200
        assert "flask_obo_token_acquisitions_total" in direct.text


# --- hosts, forwarded headers, access logs -------------------------------------------------

# The shipped formats (config/gunicorn.conf.py, config/nginx.conf): a quoted field holds
# anything but an unescaped quote; the others hold no space.
QUOTED = r'"(?:[^"\\]|\\.)*"'
GUNICORN_LINE = re.compile(
    rf"\S+ {QUOTED} \d{{3}} \S+ \d+ms {QUOTED} request_id=[A-Za-z0-9._:-]{{1,64}} pid=<\d+>")
NGINX_LINE = re.compile(
    rf"\S+ {QUOTED} \d{{3}} \d+ [\d.]+ {QUOTED} request_id=[A-Za-z0-9._-]{{1,64}} upstream=\S.*")
FIELDS = re.compile(rf"{QUOTED}|\S+")


def bare_fields(line: str) -> dict[str, str]:
    """A line's ``key=value`` fields outside quotes."""
    fields = [field for field in FIELDS.findall(line) if not field.startswith('"') and "=" in field]
    return dict(field.split("=", 1) for field in fields)


def raw_http(url: str, request: bytes, sni: str | None = None) -> bytes:
    """Send ``request`` as is (requests refuses forged lines) and read until the server closes.

    For https URLs the certificate is not checked, so only the server can refuse the
    handshake; ``sni`` is the name sent (None: none, as for an IP address)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT) as sock:
        conn = sock
        if parts.scheme == "https":
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            conn = context.wrap_socket(sock, server_hostname=sni)
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer


def get_request(path: str, host: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode()


FORGED_FORWARDING = {
    "X-Forwarded-Host": "evil.example", "X-Forwarded-Port": "666", "X-Forwarded-Proto": "gopher",
}


def test_a_forged_forwarded_host_never_reaches_a_location(stack: Stack) -> None:
    """``/api//me``: werkzeug redirects to ``/api/me`` with an absolute Location built from
    the host, port and scheme ProxyFix takes from the one proxy it trusts."""
    # Why gunicorn must not be reachable: straight to it, the client picks the host.
    direct = get(f"{stack.apis[0].process.url}/api//me", headers=dict(FORGED_FORWARDING),
                 allow_redirects=False)
    assert direct.status_code == 308
    assert urlsplit(direct.headers["Location"]).hostname == "evil.example"

    nginx_http_port = urlsplit(stack.nginx.http_url).port
    tls = urlsplit(stack.nginx.https_url)
    ca = str(stack.tenant.state_dir / "ca-bundle.pem")
    cases = [  # (url, Host header, expected Location prefix)
        (f"{stack.nginx.http_url}/api//me", None, f"http://127.0.0.1:{nginx_http_port}/api/me"),
        (f"{stack.nginx.http_url}/api//me", f"localhost:{nginx_http_port}", f"http://localhost:{nginx_http_port}/"),
        (f"{stack.nginx.https_url}/api//me", None, f"https://localhost:{tls.port}/api/me"),
    ]
    for url, host, expected in cases:
        headers = {**FORGED_FORWARDING, **({"Host": host} if host else {})}
        response = get(url, headers=headers, allow_redirects=False, verify=ca)
        assert response.status_code == 308, (url, response.text)
        assert response.headers["Location"].startswith(expected), (url, response.headers["Location"])


def test_unknown_hosts_get_no_answer(stack: Stack) -> None:
    """The default server: 444 (the connection closes without a byte) on http; on TLS the
    handshake fails unless SNI names a known host, and a known SNI with an unknown Host
    gets 444 too. None of these requests reaches gunicorn."""
    path = f"/unknown-host-{uuid.uuid4().hex}"
    https, http = stack.nginx.https_url, stack.nginx.http_url
    forged = get_request(path, "evil.example", "X-Forwarded-Host: localhost")
    assert raw_http(http, forged) == b""
    assert raw_http(https, forged, sni="localhost") == b""
    for sni in ("evil.example", None):
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            raw_http(https, get_request(path, "localhost"), sni=sni)
    # controls: the same requests for a known host are answered
    assert raw_http(http, get_request(path, "localhost")).startswith(b"HTTP/1.1 404 ")
    assert raw_http(https, get_request(path, "localhost"), sni="localhost").startswith(b"HTTP/1.1 404 ")

    logged = lines_with(stack.nginx.access_lines, path, 4)  # the 444s are logged, after the close
    assert sorted(line.split('"')[2].split()[0] for line in logged) == ["404", "404", "444", "444"], logged
    proxied = lines_with(lambda: stack.apis[0].access_lines() + stack.apis[1].access_lines(), path, 2)
    assert len(proxied) == 2  # the controls only


def test_forged_request_id_and_user_agent_create_no_log_field(stack: Stack) -> None:
    """Spaces, quotes, backslashes, ``key=value`` pairs and an encoded newline (in the path:
    ``PATH_INFO`` is decoded) from a client, straight to gunicorn and through nginx. (A raw
    newline in a header never gets through: both answer 400.) Every access log line keeps
    the shipped format, and only the server's own fields appear outside quotes."""
    mark = uuid.uuid4().hex[:12]
    path = f"/forge-{mark}%0A6.6.6.6%20%22GET%20/%20HTTP/1.1%22%20200%20status=200"
    headers = (f'X-Request-Id: {mark} status=200 user=admin "quoted" \\" end',
               'User-Agent: ua\\" status=200 user=admin "')
    api1 = stack.apis[0]
    for base in (api1.process.url, stack.nginx.http_url):
        assert raw_http(base, get_request(path, "localhost", *headers)).startswith(b"HTTP/1.1 404 ")

    api_lines = lambda: stack.apis[0].access_lines() + stack.apis[1].access_lines()  # noqa: E731
    logged = lines_with(api_lines, f"/forge-{mark}", 2)
    (nginx_line,) = lines_with(stack.nginx.access_lines, f"/forge-{mark}", 1)
    for line in api_lines():
        assert GUNICORN_LINE.fullmatch(line), line
    for line in stack.nginx.access_lines():
        assert NGINX_LINE.fullmatch(line), line
    assert all(set(bare_fields(line)) == {"request_id", "pid"} for line in logged)
    assert set(bare_fields(nginx_line)) == {"request_id", "upstream"}
    # The malformed id is replaced: through nginx by nginx's own (which gunicorn logs too,
    # never the client's), straight to gunicorn by one the API makes.
    nginx_id = bare_fields(nginx_line)["request_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", nginx_id)
    (direct,) = [line for line in logged if bare_fields(line)["request_id"] != nginx_id]
    assert re.fullmatch(r"[0-9a-f]{32}", bare_fields(direct)["request_id"])
    # and the app's own log lines never carry them
    for api in stack.apis:
        assert mark not in api.process.log.read_text()


def test_a_request_id_follows_the_request_through_nginx(stack: Stack) -> None:
    """A well-formed client id is kept end to end; without one, nginx's is the API's too."""
    mark = f"trace-{uuid.uuid4().hex[:12]}"
    kept = get(f"{stack.nginx.http_url}/api/me", stack.token("adele"), headers={"X-Request-ID": mark})
    assert kept.status_code == 200, kept.text
    assert kept.headers["X-Request-ID"] == mark
    (nginx_line,) = lines_with(stack.nginx.access_lines, f"request_id={mark} ", 1)
    api_lines = lambda: stack.apis[0].access_lines() + stack.apis[1].access_lines()  # noqa: E731
    (api_line,) = lines_with(api_lines, f"request_id={mark} ", 1)
    assert '"GET /api/me ' in nginx_line and '"GET /api/me ' in api_line

    made = get(f"{stack.nginx.http_url}/api/whoami", user_agent=(agent := marker()))
    assert made.status_code == 401  # errors carry the id too
    (nginx_line,) = lines_with(stack.nginx.access_lines, agent, 1)
    assert bare_fields(nginx_line)["request_id"] == made.headers["X-Request-ID"]


# --- failover ------------------------------------------------------------------------------


def test_a_stopped_instance_is_routed_around(stack: Stack, tmp_path: Path) -> None:
    """Its own nginx over a throw-away instance and api-2; the throw-away one is stopped."""
    with ExitStack() as exit_stack:
        doomed = start_api(exit_stack, stack.env, tmp_path, "doomed", workers=1)
        survivor = stack.apis[1]
        nginx = exit_stack.enter_context(run_nginx(
            stack.nginx_binary, tmp_path, [doomed.addr, survivor.addr], *stack.tls_files()
        ))
        token, before = stack.token("lynne"), marker()
        for _ in range(4):  # warm: nginx keeps connections to both
            assert get(f"{nginx.http_url}/api/whoami", token, before).status_code == 200
        served = {upstreams(line)[-1] for line in lines_with(nginx.access_lines, before, 4)}
        assert served == {doomed.addr, survivor.addr}

        doomed.process.process.terminate()
        doomed.process.process.wait(timeout=TIMEOUT)

        after = marker()
        statuses = [get(f"{nginx.http_url}/api/whoami", token, after).status_code for _ in range(10)]
        assert statuses == [200] * 10
        attempts = [upstreams(line) for line in lines_with(nginx.access_lines, after, 10)]
        assert all(attempt[-1] == survivor.addr for attempt in attempts), attempts
        # proxy_next_upstream did the work: some request tried the dead instance first
        assert any(attempt == [doomed.addr, survivor.addr] for attempt in attempts), attempts
