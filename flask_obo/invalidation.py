"""Keeping each worker's memory tier coherent with Redis: server-assisted client-side
caching (``CLIENT TRACKING`` in broadcasting mode, Redis ≥ 6).

One connection per worker asks Redis to report every change to a key under the cache
prefix (a write by any client, a delete, a TTL expiry, an eviction, a flush) and
subscribes to ``__redis__:invalidate`` to hear it; RESP2 needs that redirect, and
redirecting a connection to itself keeps it to one socket whose loss ends both. redis-py's
own ``cache_config`` would do this with RESP3 but refuses servers older than 7.4
(Debian 12 ships 7.0), hence the small loop here.

What a memory copy may trust is summed up by ``connected`` and ``epoch``: a copy read
from Redis while connected, at the current epoch, and not invalidated since, is exact.
Every (re)connection starts a new epoch, because changes made while no one listened
were never reported.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from redis.connection import AbstractConnection
from redis.exceptions import ConnectionError, RedisError, TimeoutError

log = logging.getLogger(__name__)

CHANNEL = "__redis__:invalidate"
PING_EVERY = 1.0  # a silent server is noticed within PING_EVERY + the read timeout
RECONNECT_BACKOFF = (0.05, 1.0)

InvalidateKeys = Callable[[list[bytes] | None], None]  # None: everything (FLUSHDB/FLUSHALL)


class ThreadPerProcess:
    """Runs ``target`` on a daemon thread, started on first need in each process: a
    gunicorn worker forked from a parent that started one does not inherit the thread."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._target, self._name = target, name
        self._pid = 0
        self._lock = threading.Lock()

    def ensure_running(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._target, name=self._name, daemon=True).start()


class InvalidationListener:
    """A daemon thread per process that turns Redis's invalidation messages into calls.

    Started lazily by ``ensure_running()`` on the request path (never at import, and
    again in a gunicorn worker after fork, where the parent's thread does not exist).
    """

    def __init__(
        self,
        connect: Callable[[], AbstractConnection],
        prefix: str,
        on_keys: InvalidateKeys,
        on_resync: Callable[[], None],
        on_lost_data: Callable[[], None],
        on_unreachable: Callable[[], None],
        on_alive: Callable[[], None],
        pong_timeout: float,
    ) -> None:
        self._connect = connect
        self._prefix = prefix
        self._on_keys = on_keys
        self._on_resync = on_resync
        self._on_lost_data = on_lost_data
        self._on_unreachable = on_unreachable
        self._on_alive = on_alive
        self._reported_unreachable = False
        self._pong_timeout = pong_timeout
        self.connected = False
        self.epoch = 0
        self._run_id: bytes | None = None  # the server's; a new one means it restarted
        self._last_failure = ""
        self._stop = threading.Event()
        self._thread = ThreadPerProcess(self._run, "flask-obo-invalidation")

    def ensure_running(self) -> None:
        self._thread.ensure_running()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        self.connected = False  # in a forked child, the parent's connection is not ours
        backoff = RECONNECT_BACKOFF[0]
        while not self._stop.is_set():
            connection = None
            try:
                connection = self._subscribe()
                self.epoch += 1  # before connected: copies verified earlier are stale now
                self.connected = True
                self._reported_unreachable = False
                log.info("token cache invalidation channel connected")
                self._last_failure = ""
                backoff = RECONNECT_BACKOFF[0]
                # Off this thread: resync writes to Redis, and invalidations must keep flowing.
                threading.Thread(target=self._on_resync, name="flask-obo-resync", daemon=True).start()
                self._pump(connection)
            except Exception as exc:  # the thread must outlive any failure
                self._log_failure(exc)
                # Unreachable: it stopped answering PING, or cannot be connected to. Not a
                # dropped connection (a reconnect tells), nor a refusal (an ACL): it answered.
                # Said once per outage: retries must not keep pushing the breaker's probe back.
                if not self._reported_unreachable and (isinstance(exc, TimeoutError) or (
                        not self.connected and isinstance(exc, (ConnectionError, OSError)))):
                    self._reported_unreachable = True
                    self._on_unreachable()
            finally:
                self.connected = False
                if connection is not None:
                    connection.disconnect()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, RECONNECT_BACKOFF[1])

    def _log_failure(self, exc: Exception) -> None:
        """Once per kind of failure, so a Redis that refuses tracking (an ACL without
        CLIENT or SUBSCRIBE, a proxy) is visible, and an outage is not a log flood."""
        failure = type(exc).__name__ if isinstance(exc, (RedisError, OSError)) else repr(exc)[:200]
        if failure != self._last_failure:
            self._last_failure = failure
            log.warning("token cache invalidation channel down (%s): memory copies are re-read "
                        "before use", failure)

    def _subscribe(self) -> AbstractConnection:
        connection = self._connect()
        connection.connect()
        connection.send_command("INFO", "server")
        run_id = _run_id(connection.read_response())
        if self._run_id is not None and run_id != self._run_id:
            log.warning("redis restarted or failed over (new run id): entries it lost may be put back")
            self._on_lost_data()
        self._run_id = run_id
        connection.send_command("CLIENT", "ID")
        client_id = connection.read_response()
        connection.send_command("CLIENT", "TRACKING", "on", "REDIRECT", client_id,
                                "BCAST", "PREFIX", self._prefix)
        if connection.read_response() != b"OK":
            raise RedisError("CLIENT TRACKING refused")
        connection.send_command("SUBSCRIBE", CHANNEL)
        connection.read_response()
        return connection

    def _pump(self, connection: AbstractConnection) -> None:
        last_ping = time.monotonic()
        awaiting_pong_since: float | None = None
        while not self._stop.is_set():
            if connection.can_read(timeout=0.2):
                message = connection.read_response()
                if isinstance(message, list) and message and message[0] == b"message":
                    data = message[2]
                    self._on_keys(list(data) if isinstance(data, list) else None)
                elif isinstance(message, list) and message and message[0] == b"pong":
                    awaiting_pong_since = None
                    self._on_alive()  # Redis answers: a breaker opened by slow calls may close
            now = time.monotonic()
            if awaiting_pong_since is not None and now - awaiting_pong_since > self._pong_timeout:
                raise TimeoutError("no answer to PING")
            if awaiting_pong_since is None and now - last_ping >= PING_EVERY:
                connection.send_command("PING")
                last_ping = awaiting_pong_since = now


def _run_id(info: bytes | str) -> bytes:
    text = info.encode() if isinstance(info, str) else info
    for line in text.splitlines():
        if line.startswith(b"run_id:"):
            return line[7:].strip()
    return b""
