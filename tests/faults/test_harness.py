"""The fault-injection harness itself (tests/support/faults.py), against tiny loopback
servers: what each proxy mode does to new and open connections, the load generator's
bounds and records, and what a Redis pause does to other clients."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from tests.support.faults import (
    Call,
    FaultProxy,
    LoadGenerator,
    Mode,
    burst,
    percentile,
    redis_paused,
    summary,
)
from tests.support.servers import redis_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


@contextmanager
def echo_server() -> Iterator[tuple[tuple[str, int], list[bytes]]]:
    """A TCP echo server on loopback; yields its address and everything it received."""
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.2)
            while not stop.is_set():
                try:
                    data = conn.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                received.append(data)
                conn.sendall(data)

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname(), received
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(proxy.address, timeout=2)
    sock.settimeout(0.5)
    return sock


def echoes(sock: socket.socket, data: bytes) -> bool:
    """Whether ``data`` comes back through the proxy within the socket's timeout."""
    sock.sendall(data)
    try:
        return sock.recv(4096) == data
    except TimeoutError:
        return False


def is_reset(sock: socket.socket) -> bool:
    """Whether the proxy cut this connection (RST or EOF)."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_pass_forwards_both_ways_and_counts_connections() -> None:
    with echo_server() as (target, received), FaultProxy(target) as proxy:
        with closing(connect(proxy)) as a, closing(connect(proxy)) as b:
            assert echoes(a, b"hello") and echoes(b, b"world")
        assert proxy.accepted == {Mode.PASS: 2}
        assert b"".join(received) in (b"helloworld", b"worldhello")


def test_refuse_refuses_new_connections_resets_open_ones_and_keeps_the_port() -> None:
    with echo_server() as (target, _), FaultProxy(target) as proxy:
        with closing(connect(proxy)) as open_before:
            assert echoes(open_before, b"ping")
            proxy.refuse()
            assert is_reset(open_before)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(proxy.address, timeout=2)
        with socket.socket() as intruder, pytest.raises(OSError):
            intruder.bind(proxy.address)  # nobody else takes the port meanwhile
        proxy.pass_through()
        with closing(connect(proxy)) as after:
            assert echoes(after, b"back")
        assert proxy.accepted == {Mode.PASS: 2}


def test_hang_accepts_and_never_answers_freezes_open_ones_and_pass_cuts_them() -> None:
    with echo_server() as (target, received), FaultProxy(target) as proxy:
        with closing(connect(proxy)) as open_before:
            assert echoes(open_before, b"one")
            proxy.hang()
            assert not echoes(open_before, b"frozen")  # no answer, and not forwarded
            with closing(connect(proxy)) as new:  # the TCP connect succeeds ...
                assert not echoes(new, b"hung")  # ... and nothing ever comes back
                assert proxy.accepted[Mode.HANG] == 1
                proxy.pass_through()
                assert is_reset(new)
            assert is_reset(open_before)
        assert b"frozen" not in b"".join(received) and b"hung" not in b"".join(received)
        with closing(connect(proxy)) as after:
            assert echoes(after, b"again")


def test_close_resets_everything_and_joins_its_threads() -> None:
    with echo_server() as (target, _):
        proxy = FaultProxy(target)
        a, b = connect(proxy), connect(proxy)
        assert echoes(a, b"x")
        proxy.hang()
        proxy.close()
        assert proxy.open_connections == 0
        assert is_reset(a) and is_reset(b)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(proxy.address, timeout=2)
        a.close()
        b.close()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 503 if self.path == "/busy" else 200
        self.send_response(status)
        if status == 503:
            self.send_header("Retry-After", "5")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        return None


@contextmanager
def http_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_load_generator_is_bounded_in_count_and_time_and_records_each_request() -> None:
    calls = [Call("ok", "/"), Call("busy", "/busy")]
    with http_server() as url:
        by_count = LoadGenerator(url, calls, threads=3, max_requests=25, duration=30).start().join(timeout=20)
        assert len(by_count) == 25
        assert {s.tag: s.status for s in by_count} == {"ok": 200, "busy": 503}
        assert all(s.headers == {"Retry-After": "5"} for s in by_count if s.tag == "busy")

        started = time.monotonic()
        by_time = LoadGenerator(url, calls, threads=2, interval=0.05, duration=0.5).start().join(timeout=10)
        assert time.monotonic() - started < 2
        assert 10 <= len(by_time) <= 2 * (0.5 / 0.05 + 1)
        assert summary(by_time)["count"] == len(by_time)

        together = burst(url, Call("ok", "/"), 8)
        assert [s.status for s in together] == [200] * 8


def test_percentile_is_nearest_rank() -> None:
    values = [i / 100 for i in range(1, 101)]
    assert percentile(values, 50) == 0.50
    assert percentile(values, 99) == 0.99
    assert percentile([0.2], 99) == 0.2


def test_a_redis_pause_delays_every_client_until_it_ends() -> None:
    with redis_server() as url:
        client = redis.Redis.from_url(url, socket_timeout=5)
        with redis_paused(url, 1.0) as pause:
            client.ping()
            answered = time.monotonic()
        assert answered >= pause.end - 0.05
        assert client.ping()
        client.close()
