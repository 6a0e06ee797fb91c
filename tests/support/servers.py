"""Real server processes for integration tests: free ports, readiness by polling."""

from __future__ import annotations

import os
import shutil
import signal
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
    "chromium": "apt-get install chromium",
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


class RedisProcess:
    """A redis-server of one test's own, on a port it keeps: killed, it is restarted on the
    same port (empty: it persists nothing), as clients see a Redis outage and recovery;
    frozen (SIGSTOP), it accepts connections and answers nothing, as a hung Redis."""

    def __init__(self, binary: str, port: int, workdir: str) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                      "--appendonly", "no", "--dir", workdir, "--daemonize", "no"]
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it (again) and wait until it answers."""
        assert self._process is None, "already running"
        self._process = subprocess.Popen(self._args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.client().ping(), what="redis-server")

    def kill(self) -> None:
        """SIGKILL: every connection is reset at once, nothing is saved."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            self._process = None

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP for the block: the kernel still accepts connections, no command is answered."""
        assert self._process is not None, "not running"
        self._process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._process.send_signal(signal.SIGCONT)

    def client(self, timeout: float = 5.0) -> redis.Redis:
        """A control connection of the test's (not the app's)."""
        return redis.Redis.from_url(self.url, socket_timeout=timeout, socket_connect_timeout=timeout)


@contextmanager
def redis_process() -> Iterator[RedisProcess]:
    """A started ``RedisProcess`` on a free loopback port, killed at the end."""
    binary = require_binary("redis-server")
    workdir = tempfile.mkdtemp(prefix="flask-obo-redis-")
    server = RedisProcess(binary, free_port(), workdir)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def command_calls(client: redis.Redis) -> dict[str, int]:
    """``INFO commandstats`` as calls per command (``get``, ``ping``, ``client|list``, ...)."""
    return {name.removeprefix("cmdstat_"): int(stats["calls"])
            for name, stats in client.info("commandstats").items()}
