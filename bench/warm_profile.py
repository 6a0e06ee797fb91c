"""The warm path's CPU per request, in one process, and where it goes:

    python bench/warm_profile.py                 CPU ms per request, by series
    python bench/warm_profile.py --profile obo50 the same, then cProfile's top functions of a series

The serving benchmark (bench/serving_bench.py) measures whole gunicorn workers through
sockets: the right figure, but too coarse to say which function costs what. This driver
calls the WSGI applications themselves, as a gunicorn worker would (a fresh environ per
request, the body iterated and closed), with the same parts behind them: a real
redis-server, the dev tenant as Entra ID and Graph over keep-alive HTTPS
(bench/devtenant_users.py), flask-obo's ``wsgi:app`` with Redis and the memory tier,
prometheus_client in multiprocess mode (as config/gunicorn.conf.py sets it), and
``bench.bare_app:app`` with one fixed Graph token. gunicorn's own share (HTTP parsing,
the access log) is the same for every series and is left out here.

Series (interleaved round by round; CPU is ``time.process_time`` of this process, so the
invalidation listener's thread counts, as it does in a worker):

  * bare     bench/bare_app.py's /api/me
  * obo50    flask-obo's /api/me, 50 users, every one warm
  * obo4000  the same for ``--users`` users (4,000), shuffled
  * obo4000-unremembered  the same, every token validated in full (``Unremembered``): what
             a request costs whose token the worker has not validated yet (a new token, or
             one dropped past ``VALIDATION_MEMORY_TOKENS``)
  * healthz  flask-obo's /healthz
  * whoami   flask-obo's /api/whoami, 50 users

Also printed: the garbage collector's time per request (``gc.callbacks``) and the
collections by generation, per series.

Knobs: --users (4000), --requests (a round, 2000), --rounds (3), --profile SERIES
(repeatable), --top (25). Needs redis-server.
"""

from __future__ import annotations

import os
import tempfile

# prometheus_client picks multiprocess mode when first imported, as in a gunicorn worker.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="flask-obo-warm-profile-"))

import argparse
import cProfile
import gc
import io
import itertools
import pstats
import random
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.fernet import Fernet

from bench import devtenant_users
from bench.serving_bench import dev_tenant, obo_graph_token
from devtenant import DevTenant
from flask_obo.extension import services_of
from flask_obo.protector import ValidatedTokens
from tests.support.servers import redis_server

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
FEW_USERS = 50
THREADS = 8  # --threads: requests in flight at once, as a gthread worker's 8 threads


class GcClock:
    """The garbage collector's time and collections by generation, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self.gen2_ms: list[float] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            took = time.process_time() - self._started
            self.seconds += took
            self.collections[info["generation"]] += 1
            if info["generation"] == 2:
                self.gen2_ms.append(took * 1e3)

    def snapshot(self) -> tuple[float, list[int]]:
        return self.seconds, list(self.collections)


def environ(path: str, token: str | None, port: int = 8000) -> dict[str, Any]:
    """A WSGI environ as gunicorn builds one for ``GET path`` (over keep-alive HTTP/1.1)."""
    env: dict[str, Any] = {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "",
        "RAW_URI": path, "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": str(port), "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "50000",
        "HTTP_HOST": f"127.0.0.1:{port}", "HTTP_ACCEPT": "application/json",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": True,
        "wsgi.run_once": False, "wsgi.file_wrapper": None, "wsgi.input_terminated": True,
    }
    if token is not None:
        env["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return env


def call(app: WsgiApp, env: dict[str, Any]) -> str:
    """One request through ``app``; its status line."""
    status: list[str] = []

    def start_response(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        status.append(line)
        return None

    body = app(env, start_response)
    try:
        for _ in body:
            pass
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return status[0]


@dataclass
class Series:
    app: WsgiApp
    path: str
    tokens: list[str | None]
    cpu_ms: list[float] = field(default_factory=list)
    gc_ms: list[float] = field(default_factory=list)
    call_ms: list[float] = field(default_factory=list)  # median thread CPU of one call, by round
    around: Callable[[int], None] | None = None  # called with +1 before each round, -1 after
    collections: list[int] = field(default_factory=lambda: [0, 0, 0])


class Unremembered:
    """Swaps the validator's memo for one that keeps nothing while ``swap(+1)``, so every
    request of the round validates its token in full; ``swap(-1)`` puts the memo back."""

    def __init__(self, validator: Any) -> None:
        self._validator = validator
        self._kept = validator.validated

    def swap(self, sign: int) -> None:
        self._validator.validated = ValidatedTokens(0) if sign > 0 else self._kept


def drive(series: Series, count: int, seed: int) -> tuple[float, float, list[int], int]:
    """``count`` requests round-robin over the series' tokens (shuffled by ``seed``):
    CPU ms per request, GC ms per request, collections by generation, and non-200s."""
    tokens = list(series.tokens)
    random.Random(seed).shuffle(tokens)
    envs = [environ(series.path, tokens[i % len(tokens)]) for i in range(count)]
    errors = [0]
    counter = itertools.count()
    go = threading.Barrier(THREADS + 1)

    per_call: list[float] = []

    def serve() -> None:
        go.wait()
        failed = 0
        mine = []
        clock = time.thread_time
        while (i := next(counter)) < count:
            started = clock()
            failed += not call(series.app, envs[i]).startswith("200")
            mine.append(clock() - started)
        errors[0] += failed  # one += per thread, after its share
        per_call.extend(mine)
        go.wait()

    threads = [threading.Thread(target=serve) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    gc_before, collections_before = CLOCK.snapshot()
    started = time.process_time()
    go.wait()
    go.wait()
    cpu = time.process_time() - started
    for thread in threads:
        thread.join()
    gc_after, collections_after = CLOCK.snapshot()
    series.call_ms.append(statistics.median(per_call) * 1e3)
    return (cpu / count * 1e3, (gc_after - gc_before) / count * 1e3,
            [a - b for a, b in zip(collections_after, collections_before, strict=True)], errors[0])


def warm(app: WsgiApp, tokens: list[str]) -> float:
    """Each user's /api/me until it answers 200 (the first makes the OBO exchange), twice:
    the second pass re-reads what the first wrote (Redis reports a write to its writer too)."""
    started = time.monotonic()
    for _ in range(2):
        for token in tokens:
            for _attempt in range(50):
                status = call(app, environ("/api/me", token))
                if status.startswith("200"):
                    break
                if not status.startswith("503"):
                    raise RuntimeError(f"warming: {status}")
                time.sleep(0.05)
    return time.monotonic() - started


CLOCK = GcClock()


def main() -> int:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="append", default=[],
                        help="a series to profile with cProfile after the rounds (repeatable)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="threads sending requests at once (1: one after another)")
    parser.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumulative)")
    parser.add_argument("--pause", action="store_true",
                        help="before the rounds, print the pid and wait for Enter (to attach py-spy)")
    args = parser.parse_args()
    THREADS = args.threads
    users = max(args.users, FEW_USERS)
    devtenant_users.install(users)
    scratch = Path(tempfile.mkdtemp(prefix="flask-obo-warm-profile-"))
    gc.callbacks.append(CLOCK)
    try:
        with redis_server() as redis_url, dev_tenant(scratch, users) as (tenant, _pids):
            minter = DevTenant(scratch, tenant.authority_host)
            tokens = [minter.api_token(devtenant_users.short_name(i)) for i in range(users)]
            keep = {k: v for k, v in os.environ.items()
                    if not k.startswith(("AZURE_", "GRAPH_", "TOKEN_CACHE", "TOKEN_MEMORY", "REDIS_"))}
            os.environ.clear()
            os.environ.update(keep)
            os.environ.update(tenant.env(), LOG_LEVEL="warning", REDIS_URL=redis_url,
                              TOKEN_CACHE_KEYS=Fernet.generate_key().decode(),
                              AUTHORITY_CACHE_DIR=str(scratch / "authority"),
                              BENCH_GRAPH_TOKEN=obo_graph_token(tenant, tokens[0]))
            import wsgi
            from bench import bare_app

            obo: WsgiApp = wsgi.app
            bare: WsgiApp = bare_app.app
            print(f"warming {users} users: {warm(obo, tokens):.0f} s", flush=True)
            few: list[str | None] = list(tokens[:FEW_USERS])
            unremembered = Unremembered(services_of(wsgi.app).protector.get_token_validator("bearer"))
            series = {
                "bare": Series(bare, "/api/me", [None]),
                "obo50": Series(obo, "/api/me", few),
                f"obo{users}": Series(obo, "/api/me", list(tokens)),
                f"obo{users}-unremembered": Series(obo, "/api/me", list(tokens), around=unremembered.swap),
                "healthz": Series(obo, "/healthz", [None]),
                "whoami": Series(obo, "/api/whoami", few),
            }
            for one in series.values():  # settle: first calls, pools, the bare app's connection
                drive(one, min(args.requests, 500), seed=-1)
            if args.pause:
                input(f"pid {os.getpid()}: attach now, then press Enter ")
            names = list(series)
            for k in range(args.rounds):
                for name in names[k % len(names):] + names[:k % len(names)]:
                    one = series[name]
                    if one.around:
                        one.around(+1)
                    cpu, gc_ms, collections, errors = drive(one, args.requests, seed=k)
                    if one.around:
                        one.around(-1)
                    if errors:
                        raise RuntimeError(f"{name}: {errors} requests not answered 200")
                    one.cpu_ms.append(cpu)
                    one.gc_ms.append(gc_ms)
                    one.collections = [a + b for a, b in zip(one.collections, collections, strict=True)]
            report(series, args.rounds, args.requests)
            for name in args.profile:
                profile(name, series[name], args.requests, args.top, args.sort)
    finally:
        gc.callbacks.remove(CLOCK)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    return 0


def report(series: dict[str, Series], rounds: int, count: int) -> None:
    print(f"\nCPU ms per request, in-process, {THREADS} threads (median of {rounds} rounds of {count}; "
          f"each round's in brackets); per call: the median of one call's thread CPU (less noisy); "
          f"GC ms per request, collections gen0/1/2 in all rounds, the longest gen2 collection")
    bare = statistics.median(series["bare"].cpu_ms)
    bare_call = statistics.median(series["bare"].call_ms[-rounds:])
    for name, one in series.items():
        cpu = statistics.median(one.cpu_ms)
        rounds_ms = " ".join(f"{x:.3f}" for x in one.cpu_ms)
        call = statistics.median(one.call_ms[-rounds:])
        print(f"  {name:<20}{cpu:>7.3f}  [{rounds_ms}]  min {min(one.cpu_ms):.3f}  x bare {cpu / bare:5.2f}"
              f"  per call {call:.3f} (x bare {call / bare_call:4.2f})  gc {statistics.median(one.gc_ms):.4f}"
              f"  collections {'/'.join(map(str, one.collections))}")
    print(f"  the longest gen2 collection: {max(CLOCK.gen2_ms, default=0):.1f} ms "
          f"(the first: at start-up), {len(gc.get_objects())} objects tracked")


def profile(name: str, one: Series, count: int, top: int, sort: str) -> None:
    profiler = cProfile.Profile(time.process_time)  # CPU, not waiting on the dev tenant
    tokens = list(one.tokens)
    envs = [environ(one.path, tokens[i % len(tokens)]) for i in range(count)]
    profiler.enable()
    for env in envs:
        call(one.app, env)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats(sort).print_stats(top)
    print(f"\n--- cProfile (CPU time): {name}, {count} requests, by {sort} ---")
    print(out.getvalue())


if __name__ == "__main__":
    raise SystemExit(main())
