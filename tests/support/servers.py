"""Real server processes for integration tests: free ports, readiness by polling."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

INSTALL_HINTS = {
    "redis-server": "apt-get install redis-server",
    "nginx": "apt-get install nginx",
}


def require_binary(name: str) -> str:
    """The binary's path; skip when missing locally, fail under CI=true."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path:
        return path
    reason = f"{name} is not installed (install it: {INSTALL_HINTS.get(name, name)})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true requires it")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout: float = 20.0, what: str = "server") -> None:
    """Poll ``check`` until it returns True (readiness, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not become ready within {timeout}s")


@contextmanager
def redis_server(password: str | None = None) -> Iterator[str]:
    """A throw-away redis-server on a free loopback port; yields its URL."""
    binary = require_binary("redis-server")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="flask-obo-redis-")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", workdir, "--daemonize", "no"]
    if password:
        args += ["--requirepass", password]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    auth = f":{password}@" if password else ""
    url = f"redis://{auth}127.0.0.1:{port}/0"
    try:
        wait_until(lambda: redis.Redis.from_url(url).ping(), what="redis-server")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
