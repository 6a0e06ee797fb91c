"""The API on Sentinel (``REDIS_SENTINELS``): a password-protected primary, its replica
and 3 sentinels; ``REDIS_URL`` names the service, ``redis://:<password>@mymaster/0``."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.support.topologies import SentinelGroup, redis_sentinel
from tests.topologies.scenarios import (
    Stack,
    api_stack,
    check_cache_hit_across_instances,
    check_cold_burst_makes_one_obo,
    check_failover_under_load,
)

pytestmark = pytest.mark.integration
PASSWORD = "topology-test-password"


class SentinelTopology:
    """:class:`tests.topologies.scenarios.Topology` over a :class:`SentinelGroup`."""

    name = "sentinel"

    def __init__(self, group: SentinelGroup) -> None:
        self.group = group
        self.master = group.master  # the node serving now, as far as this test knows

    def primary_of(self, key: str) -> str:
        return self.master.address

    def on_replica(self, key: str) -> bool:
        return self.group.on_replica(key)

    def stored(self, key: str) -> bool:
        with self.master.client() as client:
            return bool(client.exists(key))

    def kill_primary_of(self, key: str) -> None:
        self.group.kill_master()

    def wait_failover(self) -> str:
        self.master = self.group.wait_promoted()
        return self.master.address


@pytest.fixture(scope="module")
def topology() -> Iterator[SentinelTopology]:
    started = time.monotonic()
    with redis_sentinel(password=PASSWORD) as group:
        print(f"[sentinel] Redis up in {time.monotonic() - started:.2f}s")
        yield SentinelTopology(group)


@pytest.fixture(scope="module")
def stack(topology: SentinelTopology, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with api_stack(tmp_path_factory.mktemp("sentinel"), REDIS_URL=topology.group.url,
                   REDIS_SENTINELS=topology.group.redis_sentinels) as running:
        yield running


def test_cold_burst_across_instances_makes_one_obo(stack: Stack, topology: SentinelTopology) -> None:
    check_cold_burst_makes_one_obo(stack, topology)


def test_cache_hit_across_instances(stack: Stack, topology: SentinelTopology) -> None:
    check_cache_hit_across_instances(stack, topology)


def test_master_killed_under_load(stack: Stack, topology: SentinelTopology) -> None:
    """Kills the master: keep this test last in the module."""
    check_failover_under_load(stack, topology)
