"""The API on a Redis Cluster (``REDIS_CLUSTER=true``): 3 primaries, 3 replicas."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from cryptography.fernet import Fernet

from app import create_app
from flask_obo.settings import Settings
from flask_obo.token_cache import TokenCacheCodec, partition_key
from tests.support.fake_entra import TENANT_ID, settings_env
from tests.support.topologies import Cluster, RedisNode, redis_cluster
from tests.topologies.scenarios import (
    Stack,
    api_stack,
    check_cache_hit_across_instances,
    check_cold_burst_makes_one_obo,
    check_failover_under_load,
)

pytestmark = pytest.mark.integration


class ClusterTopology:
    """:class:`tests.topologies.scenarios.Topology` over a :class:`Cluster`."""

    name = "cluster"

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.killed: RedisNode | None = None

    def primary_of(self, key: str) -> str:
        return self.cluster.primary_for_key(key).address

    def on_replica(self, key: str) -> bool:
        return self.cluster.on_replica(key)

    def stored(self, key: str) -> bool:
        with self.cluster.primary_for_key(key).client() as client:  # MOVED if not its slot
            return bool(client.exists(key))

    def kill_primary_of(self, key: str) -> None:
        self.killed = self.cluster.primary_for_key(key)
        self.cluster.kill(self.killed)

    def wait_failover(self) -> str:
        assert self.killed is not None
        return self.cluster.wait_failover(self.killed).address


@pytest.fixture(scope="module")
def topology() -> Iterator[ClusterTopology]:
    started = time.monotonic()
    with redis_cluster(primaries=3, replicas=1) as cluster:
        print(f"[cluster] Redis up in {time.monotonic() - started:.2f}s")
        yield ClusterTopology(cluster)


@pytest.fixture(scope="module")
def stack(topology: ClusterTopology, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with api_stack(tmp_path_factory.mktemp("cluster"), REDIS_URL=topology.cluster.url,
                   REDIS_CLUSTER="true") as running:
        yield running


def test_cold_burst_across_instances_makes_one_obo(stack: Stack, topology: ClusterTopology) -> None:
    check_cold_burst_makes_one_obo(stack, topology)


def test_cache_hit_across_instances(stack: Stack, topology: ClusterTopology) -> None:
    check_cache_hit_across_instances(stack, topology)


def test_token_cache_cli_on_the_cluster(topology: ClusterTopology) -> None:
    """``stats`` scans every primary and ``evict`` removes under the user's lock, on a
    cluster (the entries spread over the three primaries' slots)."""
    started = time.monotonic()
    key = Fernet.generate_key().decode()
    settings = Settings.from_env(settings_env(REDIS_URL=topology.cluster.url, REDIS_CLUSTER="true",
                                              TOKEN_CACHE_KEYS=key, TOKEN_CACHE_PREFIX="cli-test"))
    codec = TokenCacheCodec([key])
    oids = [f"{n:08x}-2222-4000-8000-{'0' * 12}" for n in range(60)]
    primaries = set()
    with topology.cluster.client() as cluster:
        for oid in oids:
            partition = partition_key(oid, TENANT_ID)
            name = f"cli-test:cache:{{{partition}}}"
            cluster.set(name, codec.seal(partition, '{"AccessToken": {}}'), ex=600)
            primaries.add(topology.primary_of(name))
    assert len(primaries) == 3
    runner = create_app(settings).test_cli_runner()

    result = runner.invoke(args=["token-cache", "stats", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert (figures["entries"], figures["removed"]) == (len(oids), 0)

    result = runner.invoke(args=["token-cache", "evict", "--oid", oids[0], "--tid", TENANT_ID])
    assert result.exit_code == 0, result.output
    assert "evicted partition" in result.output
    result = runner.invoke(args=["token-cache", "stats", "--json"])
    figures = json.loads(result.output)
    assert (figures["entries"], figures["removed"]) == (len(oids) - 1, 1)
    print(f"[cluster] token-cache CLI: {time.monotonic() - started:.2f}s")


def test_primary_killed_under_load(stack: Stack, topology: ClusterTopology) -> None:
    """Kills a primary: keep this test last in the module."""
    check_failover_under_load(stack, topology)
