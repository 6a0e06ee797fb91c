"""Redis down, hung, and back empty, against a redis-server of each test's own.

* Killed: warm users are served from memory at memory speed, a cold user gets one OBO
  per burst (single flight per process), /readyz says ``degraded`` within a second.
* Restarted empty: what was acquired meanwhile reaches Redis by itself, and entries Redis
  lost are put back from memory on their user's next request: no new OBO for anyone.
* Hung (SIGSTOP): the circuit breaker opens after a few socket timeouts, so requests that
  would read Redis skip it instead of each waiting REDIS_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import responses

from flask_obo.breaker import State
from flask_obo.extension import services_of
from flask_obo.settings import Settings
from flask_obo.token_cache import partition_key
from tests.integration.test_memory_tier import CAROL, RecordingEntra, Worker, wait_for
from tests.support.fake_entra import ADELE, BOB, TENANT_ID, settings_env
from tests.support.faults import pause_redis, wait_redis_answers
from tests.support.servers import RedisProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REDIS_TIMEOUT = 0.5  # REDIS_TIMEOUT_SECONDS (the default, set explicitly: the assertions rely on it)
ENTRA_LATENCY = 0.15  # an OBO takes this long, so a burst's requests overlap
LOAD_SECONDS = 3.0
READY_BOUND = 1.0
FAST = 0.1  # a median request served from memory, far from REDIS_TIMEOUT even on 2 busy cores
BURST = 4


@dataclass
class SlowEntra(RecordingEntra):
    def _token(self, request: Any) -> tuple[int, dict[str, str], str]:
        time.sleep(ENTRA_LATENCY)  # simulated latency of Entra ID, not synchronisation
        return super()._token(request)


@dataclass
class Sample:
    at: float  # time.monotonic() when the request started
    status: int
    latency: float


def load(app: Worker, users: list[str], seconds: float, threads: int = 2,
         interval: float = 0.005) -> list[Sample]:
    """/api/me from ``threads`` threads, each pausing ``interval`` between requests (pacing,
    so the load threads do not starve each other of the two cores), cycling through ``users``."""
    samples: list[Sample] = []
    end = time.monotonic() + seconds

    def run(offset: int) -> None:
        n = offset
        while time.monotonic() < end:
            at = time.monotonic()
            status, latency = app.timed_me(users[n % len(users)])
            samples.append(Sample(at, status, latency))
            n += 1
            time.sleep(interval)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(threads)))
    return samples


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def figures(samples: list[Sample]) -> str:
    latencies = [s.latency for s in samples]
    return (f"{len(samples)} requests, p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms, max {max(latencies) * 1000:.0f} ms")


def burst(app: Worker, oid: str, n: int) -> list[int]:
    """``n`` concurrent /api/me of one user, each with its own SPA token, released together."""
    tokens = [app.entra.api_token(oid) for _ in range(n)]
    start = threading.Barrier(n)

    def call(token: str) -> int:
        start.wait()
        return app.client.get("/api/me", headers={"Authorization": f"Bearer {token}"}).status_code

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, tokens))


def readyz_degraded_within(app: Worker, since: float, bound: float) -> float:
    """Poll /readyz until it answers 200 with redis ``degraded``; seconds from ``since``."""
    def degraded() -> bool:
        response = app.client.get("/readyz")
        assert response.status_code == 200
        return response.json["checks"]["redis"] == "degraded"

    wait_for(degraded, bound, "/readyz to report redis degraded")
    return time.monotonic() - since


def key_of(app: Worker, oid: str) -> str:
    return app.store.key(partition_key(oid, TENANT_ID))


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def settings(server: RedisProcess, fernet_key: str) -> Settings:
    return Settings.from_env(settings_env(REDIS_URL=server.url, TOKEN_CACHE_KEYS=fernet_key,
                                          REDIS_TIMEOUT_SECONDS=str(REDIS_TIMEOUT),
                                          ENTRA_MAX_WAITING_THREADS=str(2 * BURST)))


@pytest.fixture
def entra() -> Iterator[SlowEntra]:
    fake = SlowEntra()
    fake.add_user(CAROL, "Carol Crane", manager=None)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        fake.register(rsps)
        yield fake


@pytest.fixture
def worker(settings: Settings, entra: SlowEntra) -> Iterator[Callable[[], Worker]]:
    built: list[Worker] = []

    def build() -> Worker:
        built.append(Worker(settings, entra))
        return built[-1]

    yield build
    for each in built:
        each.stop()


# --- Redis killed, then restarted empty -------------------------------------------------------------


def test_redis_killed_warm_users_served_from_memory_and_nobody_reexchanged_after_restart(
    worker, entra: SlowEntra, server: RedisProcess
) -> None:
    app = worker()
    for oid in (ADELE, CAROL):
        assert app.me(oid) == 200
        app.settle(oid)
    assert entra.obo_calls() == 2

    server.kill()
    killed_at = time.monotonic()
    ready_after = readyz_degraded_within(app, killed_at, READY_BOUND)

    cold: list[int] = []
    bursting = threading.Thread(target=lambda: cold.extend(burst(app, BOB, BURST)))
    bursting.start()  # a cold user, while the warm ones keep coming
    samples = load(app, [ADELE, CAROL], LOAD_SECONDS)
    bursting.join()

    ok = [s for s in samples if s.status == 200]
    steady = [s.latency for s in samples if s.at >= killed_at + 1.0]
    steady_p50, steady_p99 = percentile(steady, 0.5), percentile(steady, 0.99)
    print(f"/readyz degraded {ready_after * 1000:.0f} ms after the kill; warm during the outage: "
          f"{figures(samples)}; after its first second: p50 {steady_p50 * 1000:.1f} ms, "
          f"p99 {steady_p99 * 1000:.1f} ms")
    assert len(ok) >= 0.99 * len(samples)
    assert app.store.breaker.state is State.OPEN  # requests go on without Redis
    assert steady_p50 < FAST
    assert steady_p99 < REDIS_TIMEOUT  # nobody waits a socket timeout (the box's noise aside)
    assert cold == [200] * BURST
    assert entra.obo_calls() == 3  # Bob's burst: one OBO, without the shared lock

    server.start()  # empty: it persists nothing
    app.wait_connected()
    fresh = server.client()
    for oid in (ADELE, CAROL, BOB):  # each user's next request puts their entry back
        wait_for(lambda oid=oid: app.me(oid) == 200 and fresh.exists(key_of(app, oid)) == 1, 5.0,
                 f"{oid}'s entry back")
    fresh.close()
    assert entra.obo_calls() == 3, "an entry Redis lost was exchanged again instead of put back"

    other = worker()  # a worker started after the outage reads what was put back
    assert [other.me(oid) for oid in (ADELE, CAROL, BOB)] == [200] * 3
    assert entra.obo_calls() == 3


def test_an_entry_acquired_during_an_outage_reaches_redis_by_itself(
    worker, entra: SlowEntra, server: RedisProcess, control: redis.Redis
) -> None:
    """Bob is served once during a short outage, while warm users' requests have opened
    the breaker, and never comes back: once Redis is, the listener writes his entry."""
    app = worker()
    assert app.me(ADELE) == 200
    app.settle(ADELE)

    server.kill()
    assert app.me(BOB) == 200  # OBO without Redis: kept in memory, to be written later
    wait_for(lambda: app.me(ADELE) == 200 and app.store.breaker.state is State.OPEN, 2.0,
             "the breaker to open")
    assert entra.obo_calls() == 2

    server.start()  # empty
    app.wait_connected()
    took = wait_for(lambda: control.exists(key_of(app, BOB)) == 1, 5.0, "Bob's entry in Redis")
    print(f"Bob's entry written {took * 1000:.0f} ms after the listener reconnected")
    assert worker().me(BOB) == 200  # another worker reads it: no second OBO
    assert entra.obo_calls() == 2


# --- Redis hung -------------------------------------------------------------------------------------


def test_a_hung_redis_opens_the_breaker_instead_of_a_timeout_per_request(
    worker, entra: SlowEntra, server: RedisProcess, control: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Adele's copy is unverified (her entry was rewritten just before Redis hung), so each
    of her requests would read Redis: the first one's timeout opens the circuit, and the
    probes that find out whether Redis is back run off the requests, so no other request
    waits a socket timeout however long Redis hangs."""
    app = worker()
    assert app.me(ADELE) == 200
    app.settle(ADELE)
    key = key_of(app, ADELE)
    control.set(key, control.get(key), keepttl=True)  # same blob: only the copy's trust changes
    wait_for(lambda: not app.is_current(ADELE), 1.0, "the invalidation to arrive")

    caplog.clear()
    with server.frozen():
        samples = load(app, [ADELE], LOAD_SECONDS, threads=1)
    breaker = app.store.breaker

    slow = [s for s in samples if s.latency >= REDIS_TIMEOUT * 0.8]
    waited = [r for r in caplog.records if r.name == "flask_obo.cache_store"
              and r.getMessage().startswith("redis ") and " failed" in r.getMessage()
              and not r.getMessage().startswith("redis probe")]
    print(f"hung Redis for {LOAD_SECONDS} s ({LOAD_SECONDS / breaker.reset_timeout:.1f} reset timeouts): "
          f"{figures(samples)}; {len(waited)} request(s) waited on Redis, {len(slow)} slow")
    assert all(s.status == 200 for s in samples)
    assert len(waited) == 1  # the first: its timeout opened the circuit; the probes ran off the requests
    assert len(slow) <= 2  # that one, and room for one stall of a busy box (seen once: 0.41 s, no Redis call)
    assert len(samples) >= 20
    assert percentile([s.latency for s in samples], 0.5) < FAST
    assert entra.obo_calls() == 1


# --- more users than the memory tier's cap during an outage -------------------------------------------

CAP = 2
OUTAGE_USERS = [ADELE, BOB, CAROL, "e5e5e5e5-0000-4000-8000-000000000005",
                "f6f6f6f6-0000-4000-8000-000000000006", "a7a7a7a7-0000-4000-8000-000000000007"]
WRITE_BACK_BOUND = 5.0  # seconds from Redis answering again to every entry in Redis


def test_tokens_of_more_users_than_the_cap_acquired_during_an_outage_all_reach_redis(
    entra: SlowEntra, server: RedisProcess, settings: Settings
) -> None:
    """TOKEN_MEMORY_CACHE_USERS=2, Redis killed, 6 users served (6 exchanges): none of their
    tokens may be dropped from memory before it is in Redis. Once Redis is back (empty, on
    the same address), all 6 entries arrive by themselves, and the 6 users are served
    again, by this worker and by a freshly started one, with no token request."""
    for oid in OUTAGE_USERS[3:]:
        entra.add_user(oid, f"User {oid[:4]}")
    assert settings.redis_url and settings.token_cache_keys
    capped = Settings.from_env(settings_env(
        REDIS_URL=settings.redis_url, TOKEN_CACHE_KEYS=",".join(settings.token_cache_keys),
        REDIS_TIMEOUT_SECONDS=str(REDIS_TIMEOUT), TOKEN_MEMORY_CACHE_USERS=str(CAP)))
    workers = [Worker(capped, entra)]
    try:
        app = workers[0]
        app.wait_connected()
        server.kill()
        assert [app.me(oid) for oid in OUTAGE_USERS] == [200] * len(OUTAGE_USERS)
        assert entra.obo_calls() == len(OUTAGE_USERS)

        server.start()  # empty, same port
        back_at = time.monotonic()
        fresh = server.client()
        keys = [key_of(app, oid) for oid in OUTAGE_USERS]
        deadline = back_at + WRITE_BACK_BOUND
        while (stored := sum(fresh.exists(key) for key in keys)) < len(keys) and time.monotonic() < deadline:
            time.sleep(0.05)  # a poll interval
        took = time.monotonic() - back_at
        fresh.close()
        print(f"{stored} of {len(keys)} entries in Redis {took * 1000:.0f} ms after it came back "
              f"(cap {CAP} users)")
        assert stored == len(keys), f"only {stored} of {len(keys)} entries reached Redis"

        token_requests = len(entra.token_requests)
        assert [app.me(oid) for oid in OUTAGE_USERS] == [200] * len(OUTAGE_USERS)
        workers.append(Worker(capped, entra))  # a freshly started API
        assert [workers[1].me(oid) for oid in OUTAGE_USERS] == [200] * len(OUTAGE_USERS)
        assert len(entra.token_requests) == token_requests, "a user was exchanged again"
    finally:
        for each in workers:
            each.stop()


# --- Redis paused: a fresh worker waits for it once ----------------------------------------------------

PAUSE_SECONDS = 3.0


def test_a_fresh_worker_waits_for_a_paused_redis_once_per_request(
    worker, entra: SlowEntra, server: RedisProcess
) -> None:
    """A worker just started (recycled) has nothing in memory; Redis is paused (``CLIENT
    PAUSE``): a warm user's request waits REDIS_TIMEOUT_SECONDS for the load, then goes on
    without Redis (no second wait for the user's Redis lock, nor for the write): it takes
    one timeout more than an exchange with Redis answering, measured here the same way."""
    first = worker()
    assert first.me(ADELE) == 200  # Adele's entry is in Redis
    baseline_app = worker()  # a fresh worker with Redis answering: Bob's exchange, timed
    status, baseline = baseline_app.timed_me(BOB)
    assert status == 200

    fresh = worker()
    fresh.wait_connected()  # forked just before the pause: its listener notices it only later
    window = pause_redis(server.url, PAUSE_SECONDS)
    try:
        status, took = fresh.timed_me(ADELE)
        errors = {op: metric(fresh, "flask_obo_cache_errors_total", operation=op)
                  for op in ("load", "lock", "save")}
    finally:
        wait_redis_answers(server.url, timeout=max(0.0, window.end - time.monotonic()) + 5)
    print(f"fresh worker, Redis paused: {status} in {took * 1000:.0f} ms (an exchange with Redis "
          f"answering: {baseline * 1000:.0f} ms); failed Redis calls {errors}")
    assert status == 200
    assert (errors["load"], errors["lock"]) == (1, 0), "the request called Redis again after a timeout"
    assert took < baseline + 2 * REDIS_TIMEOUT, "the request waited for Redis more than once"
    assert entra.obo_calls() == 3


def metric(app: Worker, name: str, **labels: str) -> float:
    value = services_of(app.app).metrics.registry.get_sample_value(name, labels)
    return value or 0.0
