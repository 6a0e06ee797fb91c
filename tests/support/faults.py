"""Fault injection on loopback: a TCP proxy that can refuse or hang, a Redis pause, and a
bounded load generator that records every request.

- :class:`FaultProxy` sits between the API and a dependency (here: the dev tenant's
  Entra ID endpoints). Modes switch at runtime: ``pass`` forwards bytes both ways (TLS
  goes through untouched), ``refuse`` is "Entra ID down" (connections refused, open ones
  reset), ``hang`` is "Entra ID hanging" (connections accepted, nothing forwarded nor
  answered; open ones frozen).
- :func:`redis_paused` pauses a redis-server (``CLIENT PAUSE <ms> ALL``) for a while.
- :class:`LoadGenerator` runs N threads issuing requests, bounded in count and time,
  and keeps one :class:`Sample` per request; :func:`percentile` and :func:`summary`
  read them. :func:`burst` fires N concurrent requests at once.

Everything listens and connects on 127.0.0.1 only. Threads are bounded and joined on
close; nothing here sleeps to synchronise (mode switches wait for acknowledgements,
readiness is polled with deadlines; only the load generator paces its requests).
"""

from __future__ import annotations

import math
import select
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis
import requests

LOOPBACK = "127.0.0.1"
_POLL = 0.05  # how often proxy threads look at the mode (also the most a switch takes)


class Mode(StrEnum):
    PASS = "pass"  # forward bytes both ways
    REFUSE = "refuse"  # nothing listens: connections are refused, open ones reset
    HANG = "hang"  # connections are accepted and never answered; open ones frozen


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target`` whose mode switches at runtime.

    ``refuse`` closes the listening socket but keeps the port bound (not listening), so
    connects get ECONNREFUSED and no other process can take the port meanwhile. Open
    connections are reset (RST) on ``refuse``, frozen on ``hang`` (their bytes stay
    unread in the kernel's buffers, as with a stuck server), and frozen ones are reset
    when the mode goes back to ``pass``. :meth:`set_mode` returns once the listener and
    every open connection apply the new mode.

    At most ``max_connections`` connections are handled at once (one thread each);
    further ones wait in the listen backlog until one closes.
    """

    def __init__(self, target: tuple[str, int], mode: Mode = Mode.PASS, max_connections: int = 128) -> None:
        self.target = target
        self._mode = Mode(mode)
        self._max_connections = max_connections
        self._cond = threading.Condition()
        self._generation = 0  # bumped on every mode switch; threads ack the one they applied
        self._acks: dict[threading.Thread, int] = {}  # thread -> the generation it applied
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self.accepted: Counter[Mode] = Counter()  # connections accepted, by mode at accept
        self._listener = _bound_socket(LOOPBACK, 0)
        self.port: int = self._listener.getsockname()[1]
        if self._mode is not Mode.REFUSE:
            self._listener.listen(128)
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"faultproxy-{self.port}",
                                          daemon=True)
        self._acceptor.start()

    # --- control ----------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        return LOOPBACK, self.port

    @property
    def url(self) -> str:
        """``https://127.0.0.1:<port>``: the URL a TLS client uses through this proxy."""
        return f"https://{LOOPBACK}:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def accepted_total(self) -> int:
        with self._cond:
            return sum(self.accepted.values())

    @property
    def open_connections(self) -> int:
        with self._cond:
            return sum(t.is_alive() for t in self._threads)

    def set_mode(self, mode: Mode | str, timeout: float = 5.0) -> None:
        """Switch mode; returns once the listener and all open connections applied it."""
        with self._cond:
            if self._closed:
                raise RuntimeError("proxy is closed")
            self._mode = Mode(mode)
            self._generation += 1
            generation = self._generation
            self._cond.notify_all()
            applied = self._cond.wait_for(
                lambda: all(self._acks.get(t, -1) >= generation for t in self._live_threads()),
                timeout=timeout,
            )
        if not applied:
            raise TimeoutError(f"proxy threads did not apply mode {mode} within {timeout}s")

    def refuse(self) -> None:
        self.set_mode(Mode.REFUSE)

    def hang(self) -> None:
        self.set_mode(Mode.HANG)

    def pass_through(self) -> None:
        self.set_mode(Mode.PASS)

    def close(self) -> None:
        """Reset every connection, stop listening and join all threads."""
        with self._cond:
            self._closed = True
            self._generation += 1
            self._cond.notify_all()
            threads = self._live_threads()
        for thread in threads:
            thread.join(timeout=5)
        self._acceptor.join(timeout=5)
        self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- threads ----------------------------------------------------------------------
    def _live_threads(self) -> list[threading.Thread]:
        return [self._acceptor, *(t for t in self._threads if t.is_alive())]

    def _ack(self, generation: int) -> None:
        with self._cond:
            self._acks[threading.current_thread()] = generation
            self._cond.notify_all()

    def _state(self) -> tuple[int, Mode, bool]:
        with self._cond:
            return self._generation, self._mode, self._closed

    def _accept_loop(self) -> None:
        """The only owner of the listening socket (closing a socket another thread
        selects on is unsafe: its descriptor may be reused)."""
        listening = self._mode is not Mode.REFUSE
        while True:
            generation, mode, closed = self._state()
            if closed:
                self._ack(generation)
                return
            if mode is Mode.REFUSE and listening:  # pending connections get RST on close
                self._listener.close()
                self._listener = _bound_socket(LOOPBACK, self.port)
                listening = False
            elif mode is not Mode.REFUSE and not listening:
                self._listener.listen(128)
                listening = True
            self._ack(generation)
            if not listening or not self._has_room():
                with self._cond:
                    self._cond.wait_for(lambda g=generation: self._generation != g, timeout=_POLL)
                continue
            readable, _, _ = select.select([self._listener], [], [], _POLL)
            if not readable:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            self._start_connection(client, mode)

    def _has_room(self) -> bool:
        with self._cond:
            return sum(t.is_alive() for t in self._threads) < self._max_connections

    def _start_connection(self, client: socket.socket, mode: Mode) -> None:
        thread = threading.Thread(target=self._connection, args=(client, mode), daemon=True,
                                  name=f"faultproxy-{self.port}-conn")
        with self._cond:
            self.accepted[mode] += 1
            self._threads = {t for t in self._threads if t.is_alive()}
            self._acks = {t: g for t, g in self._acks.items() if t.is_alive()}
            self._threads.add(thread)
        thread.start()

    def _connection(self, client: socket.socket, mode: Mode) -> None:
        """One connection: forwarding while the mode is ``pass``, frozen under ``hang``,
        reset under ``refuse``, on close, or when a frozen one sees ``pass`` again."""
        upstream: socket.socket | None = None
        frozen = mode is Mode.HANG
        try:
            if not frozen:
                try:
                    upstream = socket.create_connection(self.target, timeout=3)
                except OSError:
                    return  # the target is down: the client sees a reset
            while True:
                generation, mode, closed = self._state()
                if closed or mode is Mode.REFUSE or (frozen and mode is Mode.PASS):
                    return
                frozen = frozen or mode is Mode.HANG
                self._ack(generation)
                if frozen:
                    with self._cond:
                        self._cond.wait_for(lambda g=generation: self._generation != g, timeout=_POLL)
                    continue
                assert upstream is not None
                if not _forward(client, upstream):
                    _close(client, reset=False)
                    _close(upstream, reset=False)
                    return
        finally:
            _close(client, reset=True)
            if upstream is not None:
                _close(upstream, reset=True)
            self._ack(sys.maxsize)  # gone: it holds up no mode switch


def _bound_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _forward(client: socket.socket, upstream: socket.socket) -> bool:
    """Move what is readable within one poll interval; False once either side closed."""
    readable, _, _ = select.select([client, upstream], [], [], _POLL)
    for source in readable:
        sink = upstream if source is client else client
        try:
            data = source.recv(65536)
            if not data:
                return False
            sink.settimeout(5)
            sink.sendall(data)
        except OSError:
            return False
    return True


def _close(sock: socket.socket, reset: bool) -> None:
    """Close ``sock``; with ``reset``, abortively (RST), as a dead server's host would."""
    if sock.fileno() < 0:
        return
    with suppress(OSError):
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


# --- Redis ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PauseWindow:
    """A span (time.monotonic()) surely inside the pause: from its acknowledgement to
    the requested duration after the command was sent."""

    start: float
    end: float


def pause_redis(url: str, seconds: float) -> PauseWindow:
    """``CLIENT PAUSE <ms> ALL`` on a connection of its own; returns the pause window.

    Every client's commands (this one's, ``CLIENT UNPAUSE`` and ``PING`` included) wait
    until the pause ends: a pause cannot be cut short, only waited out.
    """
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        sent = time.monotonic()
        client.execute_command("CLIENT", "PAUSE", str(int(seconds * 1000)), "ALL")
        return PauseWindow(time.monotonic(), sent + seconds)  # surely inside the pause
    finally:
        client.close()


def wait_redis_answers(url: str, timeout: float) -> float:
    """Poll ``PING`` until Redis answers; returns when it did (monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        client = redis.Redis.from_url(url, socket_timeout=max(0.1, deadline - time.monotonic()))
        try:
            client.ping()
            return time.monotonic()
        except redis.RedisError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"redis did not answer within {timeout}s") from None
        finally:
            client.close()


@contextmanager
def redis_paused(url: str, seconds: float) -> Iterator[PauseWindow]:
    """Redis paused for ``seconds``; on exit, waits until it answers again."""
    window = pause_redis(url, seconds)
    try:
        yield window
    finally:
        wait_redis_answers(url, timeout=max(0.0, window.end - time.monotonic()) + 5)


# --- load -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One kind of request: a GET of ``path``, with ``token`` as bearer if given."""

    tag: str  # how samples are grouped: "warm", "cold", "whoami", "readyz", ...
    path: str
    token: str | None = None


@dataclass(frozen=True)
class Sample:
    tag: str
    start: float  # time.monotonic() before sending
    latency: float  # seconds until the whole answer was read, or the client gave up
    status: int  # 0 when no HTTP answer came (timeout, connection error)
    headers: dict[str, str] = field(default_factory=dict)  # the recorded ones present
    error: str | None = None  # the exception's class name when status is 0

    @property
    def end(self) -> float:
        return self.start + self.latency


class LoadGenerator:
    """``threads`` threads GET-ing ``calls`` round robin against ``base_url``.

    Bounded: it stops by itself after ``duration`` seconds or ``max_requests`` requests
    in all, whichever comes first (or on :meth:`stop`). Each thread has its own
    ``requests.Session``; with ``interval`` a thread starts a request at most every
    ``interval`` seconds (a steady load instead of a saturating one).

    ``keep_alive=False`` sends ``Connection: close``: a gunicorn worker that recycles
    (max_requests) closes its idle keep-alive connections, and a request racing that
    close fails in the client, not in the app (nginx would retry it on another worker).
    """

    def __init__(
        self,
        base_url: str,
        calls: Sequence[Call],
        threads: int = 4,
        duration: float = 30.0,
        max_requests: int = 100_000,
        interval: float = 0.0,
        timeout: float = 15.0,
        keep_alive: bool = False,
        record_headers: Iterable[str] = ("Retry-After",),
    ) -> None:
        if not calls:
            raise ValueError("no calls")
        self.base_url = base_url.rstrip("/")
        self.calls = list(calls)
        self.threads = threads
        self.duration = duration
        self.max_requests = max_requests
        self.interval = interval
        self.timeout = timeout
        self.keep_alive = keep_alive
        self.record_headers = tuple(record_headers)
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._issued = 0
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self.started_at = 0.0

    def start(self) -> LoadGenerator:
        self.started_at = time.monotonic()
        self._workers = [threading.Thread(target=self._run, args=(n,), daemon=True, name=f"load-{n}")
                         for n in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def stop(self, timeout: float | None = None) -> list[Sample]:
        """Stop issuing, wait for requests in flight (at most ``timeout``); the samples."""
        self._stop.set()
        return self.join(timeout)

    def join(self, timeout: float | None = None) -> list[Sample]:
        deadline = time.monotonic() + (self.timeout + 5 if timeout is None else timeout)
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(worker.is_alive() for worker in self._workers):
            raise TimeoutError("load generator threads did not finish")
        return self.samples

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def window(self, start: float, end: float, tag: str | None = None) -> list[Sample]:
        """Samples of requests started in [start, end), optionally of one tag."""
        return [s for s in self.samples if start <= s.start < end and (tag is None or s.tag == tag)]

    def _claim(self) -> int | None:
        """The next request's number, or None once a bound is reached."""
        with self._lock:
            if (self._stop.is_set() or self._issued >= self.max_requests
                    or time.monotonic() - self.started_at >= self.duration):
                return None
            self._issued += 1
            return self._issued

    def _run(self, n: int) -> None:
        with requests.Session() as session:
            if not self.keep_alive:
                session.headers["Connection"] = "close"
            index = n
            next_start = time.monotonic()
            while self._claim() is not None:
                call = self.calls[index % len(self.calls)]
                index += 1
                sample = request_sample(session, self.base_url, call, self.timeout, self.record_headers)
                with self._lock:
                    self._samples.append(sample)
                next_start += self.interval
                if self.interval and self._stop.wait(max(0.0, next_start - time.monotonic())):
                    return


def request_sample(session: requests.Session, base_url: str, call: Call, timeout: float,
                   record_headers: Iterable[str] = ("Retry-After",)) -> Sample:
    """GET ``call`` once and describe how it went."""
    headers = {"Authorization": f"Bearer {call.token}"} if call.token else {}
    start = time.monotonic()
    try:
        response = session.get(base_url + call.path, headers=headers, timeout=timeout)
        response.content  # noqa: B018 - read the whole body inside the measured time
    except requests.RequestException as exc:
        return Sample(call.tag, start, time.monotonic() - start, 0, error=type(exc).__name__)
    latency = time.monotonic() - start
    kept = {name: response.headers[name] for name in record_headers if name in response.headers}
    return Sample(call.tag, start, latency, response.status_code, kept)


def burst(base_url: str, call: Call, n: int, timeout: float = 30.0,
          record_headers: Iterable[str] = ("Retry-After",)) -> list[Sample]:
    """``n`` concurrent requests released together (one thread and session each)."""
    barrier = threading.Barrier(n)
    results: list[Sample | None] = [None] * n

    def one(i: int) -> None:
        with requests.Session() as session:
            barrier.wait(timeout=10)
            results[i] = request_sample(session, base_url.rstrip("/"), call, timeout, record_headers)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout + 15)
    if any(r is None for r in results):
        raise TimeoutError("burst requests did not finish")
    return [r for r in results if r is not None]


# --- statistics -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def p50(samples: Sequence[Sample]) -> float:
    return percentile([s.latency for s in samples], 50)


def p99(samples: Sequence[Sample]) -> float:
    return percentile([s.latency for s in samples], 99)


def summary(samples: Sequence[Sample]) -> dict[str, Any]:
    """Count, statuses, p50/p99/max latency (ms) of ``samples``: for messages and logs."""
    latencies = [s.latency for s in samples]
    return {
        "count": len(samples),
        "statuses": dict(Counter(s.status for s in samples)),
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "max_ms": round(max(latencies, default=math.nan) * 1000, 1),
    }
