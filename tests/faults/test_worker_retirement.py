"""Entra ID hangs while gunicorn recycles its workers every 40 requests (issue 15, item 3).

One cold user fires 16 concurrent /api/me while warm users keep a steady load. A worker
that reaches ``max_requests`` stops accepting and waits for its requests in flight; the
master forks its replacement only once it exited. The shipped config tells flask-obo
(``flask_obo.retire_worker``), which ends that worker's waits on Entra ID at once, so no
worker is held hostage by the hang: warm users' worst latency stays within
max(3 x their p99 before the fault, 1 s), /readyz answers within 1 s, and once Entra ID
answers again the cold user gets 200.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import (
    FAULT_COLD_USER,
    PID,
    READYZ_LIMIT,
    TOKEN_ACQUISITION_TIMEOUT,
    Checks,
    FaultStack,
    check_readyz,
    outcome,
    poll_until_ok,
    slowest,
    steady_calls,
    wait_for_samples,
    warm_up,
)
from tests.support.faults import Call, LoadGenerator, Sample, burst, p99, summary

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

MAX_REQUESTS = 40
COLD_BURST = 16
HANG_SECONDS = TOKEN_ACQUISITION_TIMEOUT + 3  # every cold request resolves well inside it
BASELINE_SAMPLES = 200
RECOVERY_TIMEOUT = 15.0


def worst(samples: list[Sample]) -> float:
    return max((s.latency for s in samples), default=float("nan"))


def test_recycling_workers_are_not_held_by_a_hanging_entra(stack: FaultStack) -> None:
    checks = Checks("hang while recycling")
    recycling = {"GUNICORN_MAX_REQUESTS": str(MAX_REQUESTS), "GUNICORN_MAX_REQUESTS_JITTER": "0"}
    with stack.api("retire", **recycling) as api:
        warm_up(stack, api)
        with LoadGenerator(api.url, steady_calls(stack), threads=4, interval=0.05, duration=60) as load:
            wait_for_samples(lambda: load.samples, BASELINE_SAMPLES, timeout=30)
            log_mark = len(api.access_lines())
            stack.proxy.hang()
            start = time.monotonic()
            probe = LoadGenerator(api.url, [Call("readyz", "/readyz")], threads=1, interval=0.25,
                                  duration=HANG_SECONDS, timeout=5).start()
            cold = burst(api.url, stack.call("cold", "/api/me", FAULT_COLD_USER), COLD_BURST,
                         timeout=TOKEN_ACQUISITION_TIMEOUT + 10)
            readyz = probe.join(timeout=HANG_SECONDS + 10)  # the hang lasts this long
            end = time.monotonic()
            log_end = len(api.access_lines())
            stack.proxy.pass_through()

        baseline = load.window(load.started_at, start, "warm") + load.window(load.started_at, start, "whoami")
        warm = load.window(start, end, "warm") + load.window(start, end, "whoami")
        bound = max(3 * p99(baseline), 1.0)
        checks.figure(f"baseline warm {summary(baseline)}; bound on the worst during the hang "
                      f"{bound * 1000:.0f} ms")
        checks.figure(f"during: warm {summary(warm)}; cold burst {summary(cold)}; /readyz {summary(readyz)}")
        checks.figure(f"during: slowest {slowest(warm + readyz, start)}")
        during = api.access_lines()[log_mark:log_end]
        before = api.access_lines()[:log_mark]
        pids_before = {m.group(1) for line in before if (m := PID.search(line))}
        new_pids = {m.group(1) for line in during if (m := PID.search(line))} - pids_before
        checks.figure(f"workers started during the hang: {len(new_pids)}")

        checks.expect(bool(warm) and worst(warm) <= bound,
                      f"warm worst latency {worst(warm) * 1000:.0f} ms > bound {bound * 1000:.0f} ms")
        failed = [s for s in warm if s.status != 200]
        checks.expect(not failed, f"warm users during the hang: {len(failed)} not 200: {failed[:3]}")
        check_readyz(checks, "hang", readyz)
        refused = [s for s in cold if s.status == 503]
        checks.expect(all("Retry-After" in s.headers for s in refused), "a 503 without Retry-After")
        checks.expect(len(new_pids) >= 2, f"only {len(new_pids)} workers started during the hang: "
                                          "the test did not recycle them")
        cold_after = poll_until_ok(api, stack.call("cold", "/api/me", FAULT_COLD_USER), RECOVERY_TIMEOUT)
        checks.figure(f"after: the cold user {outcome(cold_after[-1])} after {len(cold_after)} attempt(s)")
        checks.expect(cold_after[-1].status == 200,
                      f"once Entra answers again the cold user got {outcome(cold_after[-1])}")
        checks.expect(all(s.latency <= READYZ_LIMIT for s in readyz), "/readyz slower than 1 s")
        checks.verify(api)
