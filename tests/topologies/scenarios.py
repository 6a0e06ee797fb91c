"""The API on the Redis topologies of issue 6, as real processes on loopback.

::

    2 API instances (gunicorn, 2 workers x 8 threads each) ──> dev tenant (Entra ID, Graph)
                  └──────────> Redis Cluster (3 primaries + 3 replicas) or
                               Sentinel (primary, replica, 3 sentinels)

Each test module starts its topology, the dev tenant and both API instances once
(module-scoped fixtures, :func:`api_stack`); the instances share ``TOKEN_CACHE_KEYS``.
The checks both topologies run live here; each module supplies a :class:`Topology`.

Users (devtenant/directory.json) are split so that no test sees another's users warm:
``patti`` bursts cold, ``nestor`` goes from one instance to the other, ``adele`` and
``megan`` are the warm load through the failover, ``alex`` is the cold user after it.
On the cluster, ``adele``, ``megan`` and ``alex`` hash to one primary: the one killed.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import requests

from flask_obo.token_cache import partition_key
from tests.support.faults import Call, LoadGenerator, Sample, request_sample, summary
from tests.support.stack import DevTenantProcess, GunicornProcess, api_env, devtenant, gunicorn

WORKERS, THREADS = 2, 8
BURST_SIZE = 32
BURST_USER = "patti"
CROSS_USER = "nestor"
WARM_USERS = ("adele", "megan")
COLD_USERS = ("alex",)  # candidates for the cold user after the failover
MFA_USERS = frozenset({"alex"})  # their tokens need amr=mfa for Graph
CACHE_PREFIX = "flask-obo"

LOAD_THREADS_PER_API = 2
LOAD_INTERVAL = 0.05  # each load thread starts a request at most this often
BASELINE_SAMPLES = 20  # per instance, before the kill
AFTER_FAILOVER_SAMPLES = 40  # per instance, after the failover
MIN_SUCCESS_RATE = 0.99
WRITE_RESUMES_WITHIN = 20.0  # seconds from the failover to the cold user's entry in Redis


class Topology(Protocol):
    """What the shared checks need from a Redis topology (see the test modules)."""

    name: str

    def primary_of(self, key: str) -> str:
        """The address of the primary that serves ``key`` now."""

    def on_replica(self, key: str) -> bool:
        """Has ``key`` reached the replica of its primary?"""

    def stored(self, key: str) -> bool:
        """Does the primary that serves ``key`` now hold it (asked directly)?"""

    def kill_primary_of(self, key: str) -> None:
        """SIGKILL the primary that serves ``key``."""

    def wait_failover(self) -> str:
        """Wait until a replica replaced the killed primary; its address."""


@dataclass
class Stack:
    """The dev tenant and the API instances, with tokens minted once per user."""

    tenant: DevTenantProcess
    apis: list[GunicornProcess]
    _tokens: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._minter = self.tenant.tenant  # one DevTenant: its token minter is built once

    def token(self, user: str, fresh: bool = False) -> str:
        """An API token of ``user`` (``fresh``: a new one, not the one kept for the run)."""
        if fresh or user not in self._tokens:
            token = self._minter.api_token(user, mfa=user in MFA_USERS)
            if fresh:
                return token
            self._tokens[user] = token
        return self._tokens[user]

    def cache_key(self, user: str) -> str:
        """``<prefix>:cache:{<partition>}`` of ``user`` (the API's logs never show it)."""
        claims = _claims(self.token(user))
        return f"{CACHE_PREFIX}:cache:{{{partition_key(claims['oid'], claims['tid'])}}}"

    def me(self, api: GunicornProcess, user: str, token: str | None = None) -> Sample:
        """One GET /api/me of ``user`` on a connection of its own."""
        with requests.Session() as session:
            session.headers["Connection"] = "close"  # the next request may land on another worker
            return request_sample(session, api.url, Call(user, "/api/me", token or self.token(user)), 20)

    def obo_calls(self) -> int:
        return self.tenant.obo_calls()

    def log_tails(self, chars: int = 1500, users: tuple[str, ...] = ()) -> str:
        """Each instance's log tail, after its lines about ``users``' partitions."""
        partitions = [self.cache_key(user).rsplit("{", 1)[1].rstrip("}") for user in users]
        parts = []
        for n, api in enumerate(self.apis):
            text = api.log.read_text(errors="replace")
            if partitions:
                about = [line for line in text.splitlines() if any(p in line for p in partitions)]
                parts.append(f"--- API {n} lines about {', '.join(users)}:\n" + "\n".join(about[-30:]))
            parts.append(f"--- API {n} log tail:\n{text[-chars:]}")
        return "\n".join(parts)


def _claims(token: str) -> dict[str, str]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@contextmanager
def api_stack(tmp: Path, **redis_settings: str) -> Iterator[Stack]:
    """The dev tenant and two API instances on the Redis that ``redis_settings`` name
    (``REDIS_URL`` and ``REDIS_CLUSTER`` or ``REDIS_SENTINELS``), sharing cache keys."""
    started = time.monotonic()
    with ExitStack() as stack:
        tenant = stack.enter_context(devtenant(tmp / "devtenant"))
        env = api_env(tenant, redis_settings["REDIS_URL"], **redis_settings,
                      ENTRA_MAX_WAITING_THREADS=str(THREADS),  # a burst tests single flight, not the cap
                      GUNICORN_WORKERS=str(WORKERS), GUNICORN_THREADS=str(THREADS))
        apis = []
        for n in range(2):
            run_dir = tmp / f"api-{n}"
            run_dir.mkdir()
            instance_env = {**env, "AUTHORITY_CACHE_DIR": str(run_dir / "authority"),
                            "GUNICORN_ACCESS_LOG": str(run_dir / "access.log")}
            apis.append(stack.enter_context(gunicorn(instance_env, workers=WORKERS, threads=THREADS)))
        print(f"[{tmp.name}] dev tenant and 2 API instances up in {time.monotonic() - started:.2f}s")
        yield Stack(tenant, apis)


def poll(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``check`` until true or ``timeout``; whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return True
        except Exception:  # a topology mid-failover may refuse; that is "not yet"
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class Checks:
    """Collects failed expectations and the figures measured, to report them all at once."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.failures: list[str] = []

    def expect(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
        return ok

    def figure(self, line: str) -> None:
        print(f"[{self.title}] {line}")

    def verify(self, stack: Stack, users: tuple[str, ...] = ()) -> None:
        """Raise if any expectation failed, with the API logs (and their lines about ``users``)."""
        if self.failures:
            lines = [f"{self.title}: {len(self.failures)} expectation(s) failed:"]
            lines += [f"  - {failure}" for failure in self.failures]
            raise AssertionError("\n".join([*lines, stack.log_tails(users=users)]))


# --- the checks both topologies run ---------------------------------------------------------------


def check_cold_burst_makes_one_obo(stack: Stack, topology: Topology) -> None:
    """32 concurrent cold /api/me of one user (distinct tokens), spread over both
    instances and their workers: exactly one on-behalf-of exchange."""
    checks = Checks(f"{topology.name} cold burst")
    tokens = [stack.token(BURST_USER, fresh=True) for _ in range(BURST_SIZE)]
    barrier = threading.Barrier(BURST_SIZE)
    results: list[Sample | None] = [None] * BURST_SIZE

    def one(n: int) -> None:
        barrier.wait(timeout=10)
        results[n] = stack.me(stack.apis[n % len(stack.apis)], BURST_USER, tokens[n])

    before = stack.obo_calls()
    started = time.monotonic()
    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(BURST_SIZE)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=40)
    samples = [s for s in results if s is not None]
    obo = stack.obo_calls() - before
    checks.figure(f"{summary(samples)} in {time.monotonic() - started:.2f}s; OBO calls: {obo}")
    checks.expect(len(samples) == BURST_SIZE and all(s.status == 200 for s in samples),
                  f"every request answers 200: {summary(samples)}")
    checks.expect(obo == 1, f"exactly one OBO call for the burst, made {obo}")
    checks.expect(poll(lambda: topology.stored(stack.cache_key(BURST_USER)), 5),
                  "the user's entry is in Redis")
    checks.verify(stack, users=(BURST_USER,))


def check_cache_hit_across_instances(stack: Stack, topology: Topology) -> None:
    """A user warmed on instance A is served by instance B (both its workers) from Redis."""
    checks = Checks(f"{topology.name} cross-instance hit")
    first = stack.me(stack.apis[0], CROSS_USER)
    checks.expect(first.status == 200, f"warming on instance A answers 200, got {first.status}")
    checks.expect(poll(lambda: topology.stored(stack.cache_key(CROSS_USER)), 5), "the entry is in Redis")
    before = stack.obo_calls()
    on_b = [stack.me(stack.apis[1], CROSS_USER) for _ in range(6)]
    obo = stack.obo_calls() - before
    checks.figure(f"instance B: {summary(on_b)}; new OBO calls: {obo}")
    checks.expect(all(s.status == 200 for s in on_b), f"instance B answers 200: {summary(on_b)}")
    checks.expect(obo == 0, f"instance B makes no OBO call, made {obo}")
    checks.verify(stack, users=(CROSS_USER,))


def check_failover_under_load(stack: Stack, topology: Topology) -> None:
    """Kill the primary holding the warm users' entries while they keep calling.

    Warm users are served throughout (memory tier, then the new primary); once a replica
    took over, a new cold user's entry is written to it; and the warm users' entries,
    replicated before the kill, survive: their next requests make no OBO call.
    """
    checks = Checks(f"{topology.name} failover")
    warm_keys = {user: stack.cache_key(user) for user in WARM_USERS}
    victim_key = warm_keys[WARM_USERS[0]]
    victim = topology.primary_of(victim_key)
    cold = next((u for u in COLD_USERS if topology.primary_of(stack.cache_key(u)) == victim), COLD_USERS[0])
    cold_key = stack.cache_key(cold)
    cold_on_victim = topology.primary_of(cold_key) == victim
    checks.figure(f"victim primary {victim}; the cold user's entry hashes there too: {cold_on_victim}")

    # Warm: several requests per user and instance, so each worker is likely to hold them.
    for user in WARM_USERS:
        for api in stack.apis:
            statuses = [stack.me(api, user).status for _ in range(6)]
            assert statuses == [200] * 6, f"warming {user}: {statuses}\n{stack.log_tails()}"
    # What Redis keeps through the failover: entries that reached the replica.
    assert poll(lambda: all(topology.on_replica(k) for k in warm_keys.values()), 10), \
        "warm users' entries did not reach the replica"

    loads = [LoadGenerator(api.url, [Call(user, "/api/me", stack.token(user)) for user in WARM_USERS],
                           threads=LOAD_THREADS_PER_API, duration=60, interval=LOAD_INTERVAL, timeout=15)
             for api in stack.apis]
    with ExitStack() as running:
        for load in loads:
            running.enter_context(load)
        assert poll(lambda: all(len(load.samples) >= BASELINE_SAMPLES for load in loads), 20), \
            "no baseline load"
        obo_before_kill = stack.obo_calls()
        killed_at = time.monotonic()
        topology.kill_primary_of(victim_key)
        new_primary = topology.wait_failover()
        failed_over_at = time.monotonic()
        checks.figure(f"failover {victim} -> {new_primary} in {failed_over_at - killed_at:.2f}s")
        # Writes resume, load still running: a cold user's entry lands on the new primary.
        cold_answers = [stack.me(stack.apis[0], cold)]
        while cold_answers[-1].status != 200 and time.monotonic() - failed_over_at < WRITE_RESUMES_WITHIN:
            time.sleep(0.2)  # a poll interval
            cold_answers.append(stack.me(stack.apis[0], cold))
        answered_at = time.monotonic()
        checks.expect(cold_answers[-1].status == 200,
                      f"the cold user gets 200: {[s.status for s in cold_answers]}")
        remaining = max(1.0, WRITE_RESUMES_WITHIN - (answered_at - failed_over_at))
        stored = checks.expect(poll(lambda: topology.stored(cold_key), remaining, interval=0.05),
                               f"the cold user's entry is in Redis within {WRITE_RESUMES_WITHIN:.0f}s "
                               "of the failover")
        where = "in Redis" if stored else "still not in Redis"
        checks.figure(f"cold user {cold}: {cold_answers[-1].status} {answered_at - failed_over_at:.2f}s "
                      f"after the failover ({len(cold_answers)} attempt(s)); its entry {where} "
                      f"{time.monotonic() - answered_at:.2f}s later")

        def enough_after_failover() -> bool:
            return all(len(load.window(failed_over_at, float("inf"))) >= AFTER_FAILOVER_SAMPLES
                       for load in loads)

        checks.expect(poll(enough_after_failover, 30), "load after the failover")
    samples = [s for load in loads for s in load.samples]
    obo_during = stack.obo_calls() - obo_before_kill
    ok = sum(s.status == 200 for s in samples)
    phases = (("before the kill", 0.0, killed_at), ("kill to failover", killed_at, failed_over_at),
              ("after the failover", failed_over_at, float("inf")))
    for name, start, end in phases:
        checks.figure(f"warm load {name}: {summary([s for s in samples if start <= s.start < end])}")
    checks.figure(f"warm load: {ok}/{len(samples)} answered 200; OBO calls from the kill on "
                  f"(the cold user's included): {obo_during}")
    checks.expect(samples and ok / len(samples) >= MIN_SUCCESS_RATE,
                  f"at least {MIN_SUCCESS_RATE:.0%} of warm requests answer 200: {ok}/{len(samples)}")
    if cold_on_victim:  # the victim's slots are the new primary's now
        checks.expect(topology.primary_of(cold_key) == new_primary,
                      f"the cold user's entry is on the new primary, not {topology.primary_of(cold_key)}")
    checks.expect(topology.primary_of(victim_key) == new_primary,
                  f"the new primary serves the warm users' entries, not {topology.primary_of(victim_key)}")

    # No warm user lost their entry (Redis lost none of them: they were on the replica).
    for user, key in warm_keys.items():
        checks.expect(poll(lambda k=key: topology.stored(k), 5), f"{user}'s entry survived the failover")
    before = stack.obo_calls()
    after = [stack.me(api, user) for user in WARM_USERS for api in stack.apis for _ in range(3)]
    obo = stack.obo_calls() - before
    checks.figure(f"warm users after the failover: {summary(after)}; new OBO calls: {obo}")
    checks.expect(all(s.status == 200 for s in after), f"warm users answer 200: {summary(after)}")
    checks.expect(obo == 0, f"warm users' next requests make no OBO call, made {obo}")
    checks.verify(stack, users=(*WARM_USERS, cold))
