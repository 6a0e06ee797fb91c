"""/metrics under real gunicorn (two workers, the shipped config): counts are exact
whichever worker served a request or answers the scrape, also after a worker is killed
(SIGKILL) and replaced. Against the dev tenant and a real redis-server."""

from __future__ import annotations

import glob
import json
import os
import signal
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import redis_server, wait_until
from tests.support.stack import DevTenantProcess, GunicornProcess, api_env, devtenant, gunicorn

pytestmark = pytest.mark.e2e

USERS = ("adele", "nestor", "megan")
REQUESTS, THREADS = 60, 6


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[DevTenantProcess, GunicornProcess]]:
    with (
        redis_server() as redis_url,
        devtenant(tmp_path_factory.mktemp("devtenant")) as tenant,
        gunicorn(api_env(tenant, redis_url), workers=2) as api,
    ):
        yield tenant, api


def scrape(api: GunicornProcess) -> dict[tuple[str, frozenset], float]:
    response = requests.get(f"{api.url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def total(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def workers(api: GunicornProcess) -> set[int]:
    pid = api.process.pid
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def metrics_dir(api: GunicornProcess) -> str:
    """The private directory config/gunicorn.conf.py made for this master."""
    pattern = f"flask-obo-metrics-{api.process.pid}-*"
    (found,) = glob.glob(f"/dev/shm/{pattern}") or glob.glob(os.path.join(tempfile.gettempdir(), pattern))
    return found


def served_by(api: GunicornProcess, pid: int) -> float:
    """The /api/me requests worker ``pid`` counted, from its own file."""
    values = MmapedDict.read_all_values_from_file(os.path.join(metrics_dir(api), f"counter_{pid}.db"))
    keys = [(json.loads(key), value) for key, value, _, _ in values]
    return sum(value for (_, name, labels, _), value in keys
               if name == "flask_obo_requests_total" and labels["route"] == "/api/me")


def load(tenant: DevTenantProcess, api: GunicornProcess, count: int) -> None:
    tokens = [tenant.tenant.api_token(user) for user in USERS]

    def me(n: int) -> int:
        headers = {"Authorization": f"Bearer {tokens[n % len(tokens)]}"}
        return requests.get(f"{api.url}/api/me", headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(THREADS) as pool:
        assert set(pool.map(me, range(count))) == {200}


def assert_adds_up(samples, tenant: DevTenantProcess, served: int) -> None:
    assert total(samples, "flask_obo_requests_total", route="/api/me", status="200") == served
    assert total(samples, "flask_obo_requests_total", route="/api/me") == served
    assert total(samples, "flask_obo_token_acquisitions_total") == served
    assert total(samples, "flask_obo_token_acquisitions_total", outcome="failed") == 0
    obo = tenant.obo_calls()
    assert 1 <= obo <= len(USERS) * 2  # at most one per user per worker (usually one per user)
    assert total(samples, "flask_obo_token_endpoint_requests_total", grant="obo") == obo
    assert total(samples, "flask_obo_token_endpoint_requests_total", grant="obo", status="200") == obo
    assert total(samples, "flask_obo_token_acquisitions_total", outcome="obo") == obo
    assert total(samples, "flask_obo_downstream_requests_total", api="graph", status="200") == served
    assert total(samples, "flask_obo_downstream_seconds_count") == served
    assert total(samples, "flask_obo_request_seconds_count") >= served


def test_counts_add_up_over_two_workers_and_survive_a_killed_worker(stack):
    tenant, api = stack
    tenant.reset_counters()
    load(tenant, api, REQUESTS)
    before = scrape(api)
    assert_adds_up(before, tenant, REQUESTS)
    # both workers served (else this would not test the sum)
    assert all(served_by(api, pid) > 0 for pid in workers(api))

    victim = min(workers(api))
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(workers(api) - {victim}) == 2, timeout=30, what="a replacement worker")
    after_kill = scrape(api)
    assert_adds_up(after_kill, tenant, REQUESTS)  # the dead worker's counts stay

    load(tenant, api, REQUESTS // 2)
    assert_adds_up(scrape(api), tenant, REQUESTS + REQUESTS // 2)


def test_every_worker_answers_the_scrape_with_the_same_totals(stack):
    _, api = stack
    counts = set()
    for _ in range(8):  # new connections: gunicorn hands them to either worker
        samples = scrape(api)
        counts.add(total(samples, "flask_obo_requests_total", route="/api/me"))
    assert len(counts) == 1, counts


def test_the_private_metrics_directory_is_removed_when_gunicorn_exits(stack):
    tenant, _ = stack
    with gunicorn(api_env(tenant), workers=1) as api:
        path = metrics_dir(api)
        assert os.stat(path).st_mode & 0o777 == 0o700
        assert requests.get(f"{api.url}/metrics", timeout=10).status_code == 200
    assert not os.path.exists(path)
