"""Entra ID hangs (the proxy accepts and never answers) while one cold user fires 16
concurrent /api/me and warm users keep a steady load.

The cold user's requests wait at most TOKEN_ACQUISITION_TIMEOUT_SECONDS in all (beyond
ENTRA_MAX_WAITING_THREADS per worker, not at all), so the workers' threads stay free for
everyone else: the warm users' p99 barely moves and /readyz answers at once.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import (
    ENTRA_MAX_WAITING_THREADS,
    FAULT_COLD_USER,
    TOKEN_ACQUISITION_TIMEOUT,
    WORKERS,
    Checks,
    FaultStack,
    answered_in_time,
    check_readyz,
    check_service_resumes,
    check_warm_p99,
    slowest,
    steady_calls,
    wait_for_samples,
    warm_up,
)
from tests.support.faults import Call, LoadGenerator, Mode, burst, summary

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

COLD_BURST = 16
HANG_SECONDS = TOKEN_ACQUISITION_TIMEOUT + 3  # every cold request resolves well inside it
COLD_ANSWER_LIMIT = TOKEN_ACQUISITION_TIMEOUT + 1
BASELINE_SAMPLES = 200  # both tags: about 100 warm /api/me, so p99 is not just the max


def test_a_hanging_entra_delays_only_the_cold_user_and_boundedly(stack: FaultStack) -> None:
    checks = Checks("entra hang")
    with stack.api("hang") as api:
        warm_up(stack, api)
        with LoadGenerator(api.url, steady_calls(stack), threads=4, interval=0.05, duration=60) as load:
            wait_for_samples(lambda: load.samples, BASELINE_SAMPLES, timeout=30)
            stack.tenant.reset_counters()
            hung_before = stack.proxy.accepted[Mode.HANG]
            stack.proxy.hang()
            start = time.monotonic()
            probe = LoadGenerator(api.url, [Call("readyz", "/readyz")], threads=1, interval=0.25,
                                  duration=HANG_SECONDS, timeout=5).start()
            cold = burst(api.url, stack.call("cold", "/api/me", FAULT_COLD_USER), COLD_BURST,
                         timeout=COLD_ANSWER_LIMIT + 10)
            readyz = probe.join(timeout=HANG_SECONDS + 10)  # the hang lasts this long
            end = time.monotonic()
            obo_during = stack.tenant.obo_calls()
            hung = stack.proxy.accepted[Mode.HANG] - hung_before
            stack.proxy.pass_through()

        baseline = load.window(load.started_at, start, "warm")
        warm, whoami = load.window(start, end, "warm"), load.window(start, end, "whoami")
        checks.figure(f"hang {end - start:.1f} s; baseline warm /api/me {summary(baseline)}")
        checks.figure(f"during: warm /api/me {summary(warm)}; /api/whoami {summary(whoami)}")
        checks.figure(f"during: cold burst {summary(cold)}; /readyz {summary(readyz)}")
        checks.figure(f"during: slowest {slowest(warm + whoami + readyz, start)}")
        at_once = sum(s.latency < 1.0 for s in cold)
        checks.figure(f"cold burst: {at_once} of {len(cold)} answered within 1 s "
                      f"(at most {WORKERS * ENTRA_MAX_WAITING_THREADS} may wait on Entra ID)")
        checks.figure(f"proxy: {hung} connections accepted and held while hanging; "
                      f"OBO calls reaching the dev tenant meanwhile: {obo_during}")
        checks.expect(obo_during == 0, f"{obo_during} OBO calls went through a hanging proxy")

        # One user's cold burst may hold every thread while its exchange is on time for
        # Entra ID's pace (so that a healthy Entra ID's bursts are never refused): warm users
        # wait that long at most, the patience (capped below 1 s). Issue 15's bound.
        check_warm_p99(checks, "hang", warm, baseline, floor=1.0)
        failed = [s for s in warm + whoami if s.status != 200]
        checks.expect(bool(warm) and not failed, f"warm users during the hang: {len(failed)} not 200, "
                                                 f"e.g. {failed[:3]}")
        bad = answered_in_time(cold, COLD_ANSWER_LIMIT, {503})
        checks.expect(not bad, f"cold user's burst: {len(bad)} of {len(cold)} not 503 + Retry-After within "
                               f"{COLD_ANSWER_LIMIT} s: {bad}")
        check_readyz(checks, "hang", readyz)
        check_service_resumes(stack, api, checks, fault_cold_got_token=False)
        checks.verify(api)
