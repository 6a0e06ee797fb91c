"""Outbound session benchmark: a plain ``requests.Session`` against flask-obo's
``ResolvedSession`` (the environment read once), the same GETs to one loopback keep-alive
server, interleaved round by round.

    python bench/session_bench.py     (make bench runs it)

A plain session reads the proxy variables, NO_PROXY, ~/.netrc and REQUESTS_CA_BUNDLE on
every request; this measures what that costs a request here. Knobs: BENCH_ROUNDS (7),
BENCH_SESSION_REQUESTS (a round, 1000).
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests

from flask_obo.http import build_session

ROUNDS = int(os.environ.get("BENCH_ROUNDS", 7))
REQUESTS = int(os.environ.get("BENCH_SESSION_REQUESTS", 1000))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Graph
    disable_nagle_algorithm = True  # headers and body go in two writes

    def do_GET(self) -> None:
        body = b'{"id": "x"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


def _cpu_per_request(session: requests.Session, url: str) -> float:
    started = time.process_time()
    for _ in range(REQUESTS):
        session.get(url, headers={"Authorization": "Bearer x"}, timeout=5).json()
    return (time.process_time() - started) / REQUESTS


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1.0/me"
    plain, resolved = requests.Session(), build_session([url.rsplit("/v1.0", 1)[0]])
    for session in (plain, resolved):
        _cpu_per_request(session, url)  # warm the connection pools
    ratios, plain_us, resolved_us = [], [], []
    for _ in range(ROUNDS):
        p = _cpu_per_request(plain, url)
        r = _cpu_per_request(resolved, url)
        plain_us.append(p * 1e6)
        resolved_us.append(r * 1e6)
        ratios.append(p / r)
    print(f"client CPU per request (this process, the server's thread included), {ROUNDS} rounds "
          f"x {REQUESTS} GETs:")
    print(f"  requests.Session   median {statistics.median(plain_us):7.1f} us  best {min(plain_us):7.1f} us")
    print(f"  ResolvedSession    median {statistics.median(resolved_us):7.1f} us  best "
          f"{min(resolved_us):7.1f} us")
    print(f"  speed-up (plain / resolved)  median {statistics.median(ratios):.2f}x  best {max(ratios):.2f}x")
    server.shutdown()


if __name__ == "__main__":
    main()
