"""A 30 s Entra ID outage under load, while gunicorn recycles its workers.

Workers restart every 300 ± 50 requests, so several start during the outage with nothing
in memory: they must validate tokens from the authority metadata and keys persisted in
AUTHORITY_CACHE_DIR, and serve warm users from Redis. The issue asks for 30 s, and the
test keeps it (about 45 s in all).
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import (
    FAULT_COLD_USER,
    PID,
    SPARE_COLD_USER,
    Api,
    Checks,
    FaultStack,
    answered_in_time,
    check_service_resumes,
    slowest,
    steady_calls,
    wait_for_samples,
    warm_up,
)
from tests.support.faults import LoadGenerator, Sample, summary

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

OUTAGE_SECONDS = 30.0
MAX_REQUESTS, MAX_REQUESTS_JITTER = 120, 20  # recycles several times even on a slow, loaded machine
COLD_ANSWER_LIMIT = 1.0
MIN_RECYCLED_WORKERS = 2


def pids_in(lines: list[str]) -> list[int]:
    """The worker pids of access-log lines (``pid=<1234>``)."""
    return [int(m.group(1)) for line in lines if (m := PID.search(line))]


def test_warm_users_unaffected_and_cold_users_fail_fast_through_an_outage_and_recycles(
    stack: FaultStack,
) -> None:
    checks = Checks("entra outage")
    recycling = {"GUNICORN_MAX_REQUESTS": str(MAX_REQUESTS),
                 "GUNICORN_MAX_REQUESTS_JITTER": str(MAX_REQUESTS_JITTER)}
    with stack.api("outage", **recycling) as api:
        warm_up(stack, api)
        cold_calls = [stack.call("cold", "/api/me", user) for user in (FAULT_COLD_USER, SPARE_COLD_USER)]
        steady = LoadGenerator(api.url, steady_calls(stack), threads=6, interval=0.06,
                               duration=OUTAGE_SECONDS + 40)
        with steady as load:
            wait_for_samples(lambda: load.samples, 150, timeout=30)
            log_mark = len(api.access_lines())
            accepted_before = stack.proxy.accepted_total
            stack.proxy.refuse()
            start = time.monotonic()
            cold = LoadGenerator(api.url, cold_calls, threads=2, interval=0.2, duration=OUTAGE_SECONDS,
                                 timeout=10)
            cold_samples = cold.start().join(timeout=OUTAGE_SECONDS + 15)  # the outage lasts this long
            end = time.monotonic()
            log_end = len(api.access_lines())
            accepted_during = stack.proxy.accepted_total - accepted_before
            stack.proxy.pass_through()
        check_outage(checks, api, load, cold_samples, (start, end), (log_mark, log_end), accepted_during)
        check_service_resumes(stack, api, checks, fault_cold_got_token=False)
        checks.verify(api)


def check_outage(checks: Checks, api: Api, load: LoadGenerator, cold: list[Sample],
                 window: tuple[float, float], log_span: tuple[int, int], accepted_during: int) -> None:
    """Warm users and /api/whoami all 200, cold users 503 + Retry-After within 1 s, and
    workers did recycle (new pids served warm users during the outage)."""
    start, end = window
    baseline = load.window(load.started_at, start)
    warm, whoami = load.window(start, end, "warm"), load.window(start, end, "whoami")
    checks.figure(f"outage {end - start:.1f} s; baseline {summary(baseline)}")
    checks.figure(f"during: warm /api/me {summary(warm)}; /api/whoami {summary(whoami)}")
    checks.figure(f"during: cold /api/me {summary(cold)}")
    checks.figure(f"during: slowest {slowest(warm + whoami + cold, start)}")
    checks.expect(accepted_during == 0, f"the proxy accepted {accepted_during} connections while refusing")
    checks.expect(bool(baseline) and all(s.status == 200 for s in baseline),
                  f"before the outage not all 200: {summary(baseline)['statuses']}")
    for name, samples in (("warm /api/me", warm), ("/api/whoami", whoami)):
        failed = [s for s in samples if s.status != 200]
        checks.expect(bool(samples) and not failed,
                      f"{name} during the outage: {len(failed)} of {len(samples)} not 200 "
                      f"({summary(failed)['statuses'] if failed else {}}; e.g. {failed[:3]})")
    bad = answered_in_time(cold, COLD_ANSWER_LIMIT, {503})
    checks.expect(bool(cold) and not bad,
                  f"cold users during the outage: {len(bad)} of {len(cold)} not 503 + Retry-After within "
                  f"{COLD_ANSWER_LIMIT} s, e.g. {bad[:5]}")

    lines = api.access_lines()
    before, during = lines[: log_span[0]], lines[log_span[0]: log_span[1]]
    new_pids = set(pids_in(during)) - set(pids_in(before))
    served_me = {pid for line in during if "/api/me " in line and '" 200 ' in line
                 for pid in pids_in([line]) if pid in new_pids}
    checks.figure(f"workers: {len(set(pids_in(before)))} served before the outage, {len(new_pids)} started "
                  f"during it ({len(served_me)} of them served warm /api/me 200); "
                  f"{len(during)} requests logged during it")
    checks.expect(len(new_pids) >= MIN_RECYCLED_WORKERS,
                  f"only {len(new_pids)} workers started during the outage (want >= {MIN_RECYCLED_WORKERS}): "
                  "not enough load to recycle them")
    checks.expect(len(served_me) >= 1, "no worker started during the outage served a warm /api/me with 200")
