"""Shared fixtures: the HTTP double for Entra ID and Graph, fakeredis, the app."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator

import fakeredis
import pytest
import responses
from cryptography.fernet import Fernet

from app import create_app
from flask_obo.cache_store import RedisTokenCacheStore
from flask_obo.settings import Settings
from tests.support.fake_entra import FakeEntra, settings_env
from tests.support.log_secrets import SecretDetector


@pytest.fixture(scope="session")
def secret_detector() -> Iterator[SecretDetector]:
    detector = SecretDetector()
    logging.getLogger().addHandler(detector)
    yield detector
    logging.getLogger().removeHandler(detector)


@pytest.fixture(autouse=True)
def no_secret_in_logs(secret_detector: SecretDetector) -> Iterator[None]:
    """Every test, whatever it is about: nothing it logs holds a token, secret or key."""
    before = len(secret_detector.leaks)
    yield
    leaks = secret_detector.leaks[before:]
    assert not leaks, f"a secret reached the logs: {leaks}"


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own system temp dir, so disk copies of the authority's keys
    (kept under it by default) never pass from one test's fake Entra to another's."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("tmp")))


@pytest.fixture
def entra() -> Iterator[FakeEntra]:
    fake = FakeEntra()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        fake.register(rsps)
        yield fake


@pytest.fixture
def fernet_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture
def redis_client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def settings(fernet_key: str) -> Settings:
    return Settings.from_env(settings_env(REDIS_URL="redis://unused:6379/0", TOKEN_CACHE_KEYS=fernet_key))


@pytest.fixture
def store(redis_client: fakeredis.FakeRedis, settings: Settings) -> RedisTokenCacheStore:
    return RedisTokenCacheStore(redis_client, settings.token_cache_prefix, settings.token_cache_ttl_seconds)


@pytest.fixture
def app(settings: Settings, store: RedisTokenCacheStore):
    return create_app(settings, store=store)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the whole session (skipped locally without the binary)."""
    from tests.support.servers import redis_server

    with redis_server() as url:
        yield url


@pytest.fixture
def real_redis(redis_url: str):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()
