"""The token-cache store contract (``flask_obo.testing.TokenCacheStoreContract``) against
every store flask-obo ships: memory, and Redis alone, as a Cluster and behind Sentinel
(real servers on loopback; a topology is started once per module, and each test works
under a key prefix of its own)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from cryptography.fernet import Fernet

from flask_obo.cache_store import MemoryTokenCacheStore, RedisTokenCacheStore, TokenCacheStore
from flask_obo.settings import Settings
from flask_obo.testing import TokenCacheStoreContract
from tests.support.fake_entra import settings_env
from tests.support.topologies import Cluster, SentinelGroup, redis_cluster, redis_sentinel

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
SENTINEL_PASSWORD = "contract-test-password"


class TestMemoryStore(TokenCacheStoreContract):
    def make_store(self) -> TokenCacheStore:
        return MemoryTokenCacheStore(ttl_seconds=600)


class RedisContract(TokenCacheStoreContract):
    """A Redis store as the API builds it (``RedisTokenCacheStore.from_settings``), under a
    prefix of the test's own; ``other_client`` is a second store on the same data, as
    another worker or instance has."""

    redis_settings: dict[str, str]

    def make_store(self) -> TokenCacheStore:
        self.settings = Settings.from_env(settings_env(
            TOKEN_CACHE_KEYS=Fernet.generate_key().decode(),
            TOKEN_CACHE_PREFIX=f"contract-{uuid.uuid4().hex[:8]}", **self.redis_settings))
        return RedisTokenCacheStore.from_settings(self.settings)

    def other_client(self, store: TokenCacheStore) -> TokenCacheStore:
        if getattr(self, "_other", None) is None:
            self._other = RedisTokenCacheStore.from_settings(self.settings)
        return self._other

    def close(self, store: TokenCacheStore) -> None:
        assert isinstance(store, RedisTokenCacheStore)
        store.close()
        self._other = None


class TestRedisStore(RedisContract):
    @pytest.fixture(autouse=True)
    def _redis(self, redis_url: str) -> None:
        self.redis_settings = {"REDIS_URL": redis_url}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    started = time.monotonic()
    with redis_cluster(primaries=3, replicas=1) as running:
        print(f"[contract] cluster up in {time.monotonic() - started:.2f}s")
        yield running


@pytest.fixture(scope="module")
def sentinel() -> Iterator[SentinelGroup]:
    started = time.monotonic()
    with redis_sentinel(password=SENTINEL_PASSWORD) as running:
        print(f"[contract] sentinel up in {time.monotonic() - started:.2f}s")
        yield running


class TestRedisClusterStore(RedisContract):
    @pytest.fixture(autouse=True)
    def _redis(self, cluster: Cluster) -> None:
        self.redis_settings = {"REDIS_URL": cluster.url, "REDIS_CLUSTER": "true"}


class TestRedisSentinelStore(RedisContract):
    @pytest.fixture(autouse=True)
    def _redis(self, sentinel: SentinelGroup) -> None:
        self.redis_settings = {"REDIS_URL": sentinel.url, "REDIS_SENTINELS": sentinel.redis_sentinels}
