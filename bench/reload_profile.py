"""CPU per request of the memory tier's re-load and of a user's first request, in-process.

    python bench/reload_profile.py                         the three series, CPU ms per request
    python bench/reload_profile.py --series cold           only some of them (warm, reload, cold)
    python bench/reload_profile.py --profile reload        cProfile (CPU time) around one series,
                                                           its busiest functions printed
    py-spy record --gil -- python bench/reload_profile.py --series cold    (a sampled profile)

Real processes on loopback: redis-server and the dev tenant as Entra ID and Graph (under
gunicorn with keep-alive: bench/serving_bench.py's), each in processes of its own, so
their CPU is not counted. The API runs in this process (Flask's test client, no gunicorn),
so ``time.process_time`` around a series is the API's CPU alone, every thread of it
included: the exchange's own thread, the invalidation listener, the write-back.

Series, each measured two ways: ``GET /api/me`` (validation, token, Graph call: what a
worker does) and ``acquire_token`` alone (no Flask, validation or Graph call):

  * warm      50 users, each warm in the memory tier
  * reload    4,000 users cycled through a 500-user tier (``TOKEN_MEMORY_CACHE_USERS=500``):
              every request re-loads an evicted user (Redis GET, decrypt, msal load, lookup)
              and evicts another
  * cold      users never seen: each request's On-Behalf-Of exchange, sealing, the Redis
              lock and compare-and-set write (the dev tenant's own work is in its processes)

Knobs (environment): BENCH_RELOAD_USERS (4000), BENCH_COLD_USERS (500 each way),
BENCH_RELOAD_ROUNDS (3; the figure printed first is the lowest round's). Needs redis-server.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import gc
import io
import json
import multiprocessing
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.fernet import Fernet
from flask import Flask

from app import create_app
from bench import devtenant_users
from bench.serving_bench import _mint, dev_tenant
from flask_obo.extension import services_of
from flask_obo.protector import EntraAccessToken
from flask_obo.token_acquisition import OnBehalfOfTokenProvider
from tests.support.servers import redis_server

USERS = int(os.environ.get("BENCH_RELOAD_USERS", 4000))
COLD = int(os.environ.get("BENCH_COLD_USERS", 500))
ROUNDS = int(os.environ.get("BENCH_RELOAD_ROUNDS", 3))
FEW = 50
TIER = 500
SERIES = ("warm", "reload", "cold")

Call = Callable[[], object]


def user_of(api_token: str) -> EntraAccessToken:
    """The token's user, unvalidated: validation is not what the acquire series measure."""
    payload = api_token.split(".")[1]
    return EntraAccessToken(json.loads(base64.urlsafe_b64decode(payload + "==")), api_token)


class GarbageCollections:
    """CPU time in the cyclic garbage collector, by generation (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self._started = 0.0
        gc.callbacks.append(self._event)

    def _event(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            self.seconds[info["generation"]] += time.process_time() - self._started


COLLECTIONS = GarbageCollections()
GC_MS: dict[str, list[float]] = {}  # per call, by generation, of each series' last round


def cpu_ms_per_call(calls: list[Call], profiler: cProfile.Profile | None = None, name: str = "") -> float:
    before = list(COLLECTIONS.seconds)
    started = time.process_time()
    if profiler:
        profiler.enable()
    for call in calls:
        call()
    if profiler:
        profiler.disable()
    took = (time.process_time() - started) / len(calls) * 1e3
    if name:
        GC_MS[name] = [(after - earlier) / len(calls) * 1e3
                       for after, earlier in zip(COLLECTIONS.seconds, before, strict=True)]
    return took


def request(app: Flask, token: str) -> Call:
    client, headers = app.test_client(), {"Authorization": f"Bearer {token}"}

    def call() -> None:
        response = client.get("/api/me", headers=headers)
        assert response.status_code == 200, response.get_data()[:300]
    return call


def acquire(app: Flask, token: str) -> Call:
    services = services_of(app)
    user, scopes = user_of(token), list(services.settings.graph_scopes)
    return lambda: services.tokens.acquire_token(user, scopes)


def profile_exchanges(provider: OnBehalfOfTokenProvider, profiler: cProfile.Profile) -> None:
    """Profile each exchange in its own thread too (here they run one at a time)."""
    exchange = provider._from_entra

    def profiled(*args: Any) -> Any:
        profiler.enable()
        try:
            return exchange(*args)
        finally:
            profiler.disable()
    provider._from_entra = profiled  # type: ignore[method-assign, assignment]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--series", default=",".join(SERIES), help="comma-separated: warm,reload,cold")
    parser.add_argument("--profile", choices=SERIES, help="cProfile this series (CPU time)")
    parser.add_argument("--top", type=int, default=40, help="functions printed by --profile")
    parser.add_argument("--callers", help="--profile also prints the callers of functions matching this")
    args = parser.parse_args()
    wanted = [s for s in SERIES if s in args.series.split(",")]

    reload_users = USERS if "reload" in wanted else FEW
    everyone = reload_users + 2 * COLD  # cold users: once as requests, once as acquire_token
    devtenant_users.install(everyone)
    scratch = Path(tempfile.mkdtemp(prefix="flask-obo-reload-"))
    results: dict[str, list[float]] = {}
    profiler = cProfile.Profile(time.process_time)  # CPU time, not waits
    exchanges = cProfile.Profile(time.process_time)
    with redis_server() as redis_url, dev_tenant(scratch, everyone) as (tenant, _pids):
        with multiprocessing.get_context("fork").Pool(2) as minting:
            tokens = minting.starmap(_mint, [(i, str(scratch), tenant.authority_host)
                                             for i in range(everyone)])
        os.environ.update(tenant.env())  # REQUESTS_CA_BUNDLE, as a deployment has it
        env = {**tenant.env(), "REDIS_URL": redis_url, "TOKEN_CACHE_KEYS": Fernet.generate_key().decode(),
               "LOG_LEVEL": "warning", "AUTHORITY_CACHE_DIR": str(scratch / "authority")}
        big = create_app(env)
        small = create_app({**env, "TOKEN_MEMORY_CACHE_USERS": str(TIER)})

        started = time.monotonic()
        fill = cpu_ms_per_call([request(big, tokens[u]) for u in range(reload_users)])
        print(f"{everyone} users minted; {reload_users} users' first requests: {fill:.2f} ms CPU each "
              f"({time.monotonic() - started:.0f} s)", flush=True)
        timed: dict[str, list[Call]] = {}
        if "warm" in wanted:
            timed["warm"] = [request(big, tokens[u]) for u in range(FEW)] * 10
            timed["warm acquire"] = [acquire(big, tokens[u]) for u in range(FEW)] * 10
        if "reload" in wanted:
            timed["reload"] = [request(small, tokens[u]) for u in range(USERS)]
            timed["reload acquire"] = [acquire(small, tokens[u]) for u in range(USERS)]
        for calls in timed.values():  # the small tier's first reads; imports, connections
            cpu_ms_per_call(calls)
        for _ in range(ROUNDS):
            for name, calls in timed.items():
                prof = profiler if args.profile == name.split()[0] and not name.endswith("acquire") else None
                results.setdefault(name, []).append(cpu_ms_per_call(calls, prof, name))
        if "cold" in wanted:
            if args.profile == "cold":
                profile_exchanges(services_of(big).tokens, exchanges)
            first = reload_users
            results["cold"] = [cpu_ms_per_call([request(big, tokens[u]) for u in range(first, first + COLD)],
                                               profiler if args.profile == "cold" else None, "cold")]
            second = range(first + COLD, first + 2 * COLD)
            results["cold acquire"] = [cpu_ms_per_call([acquire(big, tokens[u]) for u in second],
                                                       None, "cold acquire")]

    print("\nCPU ms per request of this process (lowest of the rounds; every round in brackets)")
    for name, values in results.items():
        gc_ms = " ".join(f"{ms:.3f}" for ms in GC_MS.get(name, ()))
        print(f"  {name:<16}{min(values):>8.3f}   [{' '.join(f'{v:.3f}' for v in values)}]   "
              f"of which garbage collection, generations 0 1 2 (last round): {gc_ms}")
    if args.profile:
        out = io.StringIO()
        for title, prof in (("the request's thread", profiler), ("the exchange's thread", exchanges)):
            if not prof.getstats():
                continue
            print(f"\n--- {args.profile}: {title} ---", file=out)
            stats = pstats.Stats(prof, stream=out)
            stats.sort_stats("tottime").print_stats(args.top)
            stats.sort_stats("cumulative").print_stats(args.top)
            if args.callers:
                stats.print_callers(args.callers)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
