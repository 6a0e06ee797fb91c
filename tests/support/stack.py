"""The whole stack as real processes on loopback: dev tenant, gunicorn, nginx.

Each starter yields once the process answers (polling its health endpoint), and
stops it afterwards. Nothing here sleeps to wait for readiness.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.support.log_secrets import find_secret
from tests.support.servers import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DevTenantProcess:
    url: str  # where the process itself answers (counters, Graph)
    state_dir: Path
    process: subprocess.Popen[bytes]
    # What tokens and discovery name, when it differs from ``url`` (e.g. a proxy in front).
    public_url: str | None = None

    @property
    def tenant(self):  # -> devtenant.DevTenant
        from devtenant import DevTenant

        return DevTenant(self.state_dir, self.public_url or self.url)

    def session(self) -> requests.Session:
        session = requests.Session()
        session.verify = str(self.state_dir / "ca-bundle.pem")
        return session

    def counters(self) -> dict:
        with _trusting(self.state_dir):
            return requests.get(f"{self.url}/_devtenant/counters", timeout=5).json()

    def reset_counters(self) -> None:
        with _trusting(self.state_dir):
            requests.post(f"{self.url}/_devtenant/counters/reset", timeout=5).raise_for_status()

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        """A request to the dev tenant's own hooks (``/_devtenant/...``)."""
        with _trusting(self.state_dir):
            return requests.request(method, f"{self.url}{path}", timeout=5, **kwargs)

    def obo_calls(self) -> int:
        return int(self.counters()["token"].get("on_behalf_of", 0))


@contextmanager
def _trusting(state_dir: Path) -> Iterator[None]:
    """REQUESTS_CA_BUNDLE wins over a Session's verify, so point it at the dev CA."""
    previous = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = str(state_dir / "ca-bundle.pem")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("REQUESTS_CA_BUNDLE", None)
        else:
            os.environ["REQUESTS_CA_BUNDLE"] = previous


@contextmanager
def devtenant(state_dir: Path, *extra: str, public_url: str | None = None) -> Iterator[DevTenantProcess]:
    """The dev tenant on a free port: started as the flask-obo-devtenant pytest plugin starts
    it (``DevTenantServer.start``), in a state folder of the test's own.

    With ``public_url`` (e.g. a proxy in front of it), issuers and discovery name that URL
    while ``url`` stays the process's own ``https://127.0.0.1:<port>`` (its certificate
    covers 127.0.0.1). Its ready line then shows the public URL, so the port is chosen
    here and the start retried if another process took it meanwhile.
    """
    if not public_url:
        from devtenant.testing import DevTenantServer

        with DevTenantServer.start(state_dir, *extra) as server:
            assert server.process is not None
            yield DevTenantProcess(server.url, state_dir, server.process)
        return
    for _attempt in range(3):
        port = free_port()
        args = ["--port", str(port), "--public-url", public_url]
        process = subprocess.Popen(
            [sys.executable, "-m", "devtenant", "serve", *args, "--state-dir", str(state_dir), *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        try:
            line = process.stdout.readline().decode()  # the one "ready at <url>" line
            match = re.search(r"ready at (\S+)", line)
            if not match and process.wait(timeout=15) == 1:
                continue  # "cannot listen": the chosen port was taken meanwhile
            assert match, f"dev tenant did not start: {line!r}"
            yield DevTenantProcess(f"https://127.0.0.1:{port}", state_dir, process, match.group(1))
            return
        finally:
            if process.poll() is None:
                process.terminate()
            process.wait(timeout=15)
    raise AssertionError("dev tenant did not start: no free port after 3 attempts")


def api_env(tenant: DevTenantProcess, redis_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment for the API to run against the dev tenant."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "GRAPH_", "TOKEN_CACHE"))}
    env.pop("REDIS_URL", None)
    env.update(tenant.tenant.env())
    if tenant.public_url:  # Entra ID through the public URL, Graph straight to the process
        env["GRAPH_BASE_URL"] = f"{tenant.url}/v1.0"
    if redis_url:
        from cryptography.fernet import Fernet

        env.update(REDIS_URL=redis_url, TOKEN_CACHE_KEYS=Fernet.generate_key().decode())
    env.update(extra)
    return env


@dataclass
class GunicornProcess:
    url: str
    log: Path  # gunicorn's and the app's stderr
    process: subprocess.Popen[bytes]


@contextmanager
def gunicorn(env: dict[str, str], workers: int = 2, threads: int = 4,
             target: str = "wsgi:app") -> Iterator[GunicornProcess]:
    """The API under gunicorn with the shipped config on a free port (``target``: the WSGI
    application, the reference API by default)."""
    port = free_port()
    cwd = Path(tempfile.mkdtemp(prefix="flask-obo-api-"))  # no stray .env is picked up
    log = cwd / "gunicorn.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", str(ROOT / "config/gunicorn.conf.py"),
             "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--threads", str(threads),
             target],
            # Its own disk copies of the authority's documents unless the test shares some: the
            # default directory is per uid, and a dev tenant of another test that got the
            # same port would hand this one its keys (then a key rotation's refetch is
            # throttled away as a second unknown kid).
            cwd=cwd, env={"AUTHORITY_CACHE_DIR": str(cwd / "authority"), **env,
                          "PYTHONPATH": str(ROOT), "GUNICORN_WORKER_TMP_DIR": str(cwd)},
            stdout=subprocess.DEVNULL, stderr=stderr,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is not None or requests.get(f"{base}/healthz", timeout=1).ok,
                   what="gunicorn")
        assert process.poll() is None, log.read_text()[-3000:]
        yield GunicornProcess(base, log, process)
    finally:
        process.terminate()
        process.wait(timeout=30)
        leaked = find_secret(log.read_text(errors="replace"))
        shutil.rmtree(cwd, ignore_errors=True)
    assert leaked is None, f"a secret reached gunicorn's log: {leaked}"
