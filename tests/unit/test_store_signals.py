"""A store's signals (``StoreUnavailable``, ``LockBusy``) are plain exceptions, and become
the same HTTP answers as ever only at the edge: a request goes on without the store where
it can, and answers 503 (``CacheUnavailable``/``TokenAcquisitionBusy``, same bodies and
``Retry-After``) where it cannot; the token-cache CLI keeps its messages and exit status.
The stores are a third party's (a subclass that raises only the signals) and the Redis
store on fakeredis; msal runs unpatched against the HTTP double of Entra ID."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import fakeredis
import pytest
from flask import Flask

from app import create_app
from flask_obo import LockBusy, MemoryTokenCacheStore, RedisTokenCacheStore, Settings, StoreUnavailable
from flask_obo.bulkhead import Deadline
from flask_obo.cache_store import Guard, StoredEntry
from flask_obo.errors import ApiError
from flask_obo.token_cache import partition_key
from tests.support.fake_entra import ADELE, BOB, TENANT_ID, FakeEntra, settings_env

SIGN_OUT = "/api/me/token-cache"
# What a caller has always read for each 503 (the strings are the contract, written out).
CACHE_UNAVAILABLE = {"error": "temporarily_unavailable",
                     "error_description": "The token cache is unavailable; retry later."}
BUSY = {"error": "temporarily_unavailable",
        "error_description": "Token acquisition for this user is taking too long; retry shortly."}


class ThirdPartyStore(MemoryTokenCacheStore):
    """Someone else's store: it says what went wrong with the store signals alone."""

    def __init__(self, ttl_seconds: int) -> None:
        super().__init__(ttl_seconds)
        self.down = False  # every operation: StoreUnavailable
        self.busy = False  # every lock: LockBusy

    @property  # type: ignore[override]
    def healthy(self) -> bool:
        return not self.down

    def _reach(self) -> None:
        if self.down:
            raise StoreUnavailable()

    def load(self, partition: str) -> StoredEntry | None:
        self._reach()
        return super().load(partition)

    @contextmanager
    def lock(self, partition: str, deadline: Deadline) -> Iterator[Guard]:  # type: ignore[override]
        self._reach()
        if self.busy:
            raise LockBusy()
        with super().lock(partition, deadline) as guard:
            yield guard

    def save(self, partition: str, blob: bytes, guard: Guard) -> bool:
        self._reach()
        return super().save(partition, blob, guard)

    def save_unless_changed(self, partition: str, blob: bytes, base: bytes | None) -> bool:
        self._reach()
        return super().save_unless_changed(partition, blob, base)

    def remove(self, partition: str, guard: Guard) -> bool:
        self._reach()
        return super().remove(partition, guard)


@pytest.fixture
def third_party(settings: Settings) -> ThirdPartyStore:
    return ThirdPartyStore(settings.token_cache_ttl_seconds)


@pytest.fixture
def api(settings: Settings, third_party: ThirdPartyStore) -> Flask:
    return create_app(settings, store=third_party)


def bearer(entra: FakeEntra, oid: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {entra.api_token(oid)}"}


def test_the_signals_are_not_http_errors() -> None:
    assert not issubclass(StoreUnavailable, ApiError)
    assert not issubclass(LockBusy, ApiError)


def test_a_store_that_cannot_be_reached_is_gone_around_where_a_request_can_go_on(
        api: Flask, third_party: ThirdPartyStore, entra: FakeEntra) -> None:
    third_party.down = True
    client = api.test_client()
    assert client.get("/api/me", headers=bearer(entra, ADELE)).status_code == 200  # OBO without the store
    assert client.get("/api/me", headers=bearer(entra, ADELE)).status_code == 200  # then from memory
    assert entra.obo_calls() == 1


def test_sign_out_while_the_store_cannot_be_reached_is_the_same_503_as_ever(
        api: Flask, third_party: ThirdPartyStore, entra: FakeEntra) -> None:
    client = api.test_client()
    assert client.get("/api/me", headers=bearer(entra, ADELE)).status_code == 200
    third_party.down = True
    response = client.delete(SIGN_OUT, headers=bearer(entra, ADELE))
    assert response.status_code == 503
    assert response.get_json() == CACHE_UNAVAILABLE
    assert response.headers["Retry-After"] == "5"
    assert response.mimetype == "application/json"
    third_party.down = False
    assert client.delete(SIGN_OUT, headers=bearer(entra, ADELE)).status_code == 204  # nothing sticks


def test_a_lock_that_stays_taken_is_the_same_503_as_ever(
        api: Flask, third_party: ThirdPartyStore, entra: FakeEntra) -> None:
    client = api.test_client()
    assert client.get("/api/me", headers=bearer(entra, ADELE)).status_code == 200
    third_party.busy = True
    for response in (client.get("/api/me", headers=bearer(entra, BOB)),  # an exchange needs the lock
                     client.delete(SIGN_OUT, headers=bearer(entra, ADELE))):
        assert response.status_code == 503
        assert response.get_json() == BUSY
        assert response.headers["Retry-After"] == "1"
    assert entra.obo_calls() == 1  # Bob's exchange waited for the lock, and was never made
    third_party.busy = False
    assert client.get("/api/me", headers=bearer(entra, BOB)).status_code == 200


def test_the_redis_store_raises_the_signals_not_http_errors(settings: Settings) -> None:
    server = fakeredis.FakeServer()
    store = RedisTokenCacheStore(fakeredis.FakeRedis(server=server), settings.token_cache_prefix,
                                 settings.token_cache_ttl_seconds)
    other = fakeredis.FakeRedis(server=server)
    partition = partition_key(ADELE, TENANT_ID)
    with other.lock(store.lock_key(partition), timeout=10), pytest.raises(LockBusy), \
            store.lock(partition, Deadline(0.05)):
        pass
    server.connected = False
    with pytest.raises(StoreUnavailable):
        store.load(partition)
    assert store.status() == "degraded"


# --- the token-cache CLI ------------------------------------------------------------------------
@pytest.fixture
def cli_app(fernet_key: str) -> tuple[Flask, fakeredis.FakeServer, RedisTokenCacheStore]:
    settings = Settings.from_env(settings_env(REDIS_URL="redis://unused:6379/0", TOKEN_CACHE_KEYS=fernet_key,
                                              TOKEN_ACQUISITION_TIMEOUT_SECONDS="1"))
    server = fakeredis.FakeServer()
    store = RedisTokenCacheStore(fakeredis.FakeRedis(server=server), settings.token_cache_prefix,
                                 settings.token_cache_ttl_seconds)
    return create_app(settings, store=store), server, store


def evict(app: Flask) -> tuple[int, str]:
    result = app.test_cli_runner().invoke(args=["token-cache", "evict", "--oid", ADELE, "--tid", TENANT_ID])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_the_cli_says_redis_cannot_be_reached_and_exits_1(cli_app) -> None:
    app, server, _ = cli_app
    server.connected = False
    assert evict(app) == (1, "Error: Redis cannot be reached (see the log above); run it again once "
                             "it is back\n")
    result = app.test_cli_runner().invoke(args=["token-cache", "stats"])
    assert result.exit_code == 1 and "Redis cannot be reached" in result.output


def test_the_cli_says_the_users_lock_stayed_taken_and_exits_1(cli_app) -> None:
    app, server, store = cli_app
    lock_key = store.lock_key(partition_key(ADELE, TENANT_ID))
    held = fakeredis.FakeRedis(server=server).lock(lock_key, timeout=10)
    assert held.acquire()
    try:
        assert evict(app) == (1, "Error: the user's lock stayed taken (a token acquisition in flight); "
                                 "run it again\n")
    finally:
        held.release()
    code, output = evict(app)
    assert code == 0 and output.startswith("partition ")  # no entry, marked removed all the same


def test_obo_check_names_an_unreachable_store_as_it_always_has(settings: Settings) -> None:
    """``flask obo check``'s TOKEN_CACHE_KEYS line reads entries through the store: its
    breaker's view of Redis going away is reported in the same words as before."""
    from flask_obo.check import FAIL, _check_keys

    server = fakeredis.FakeServer()
    store = RedisTokenCacheStore(fakeredis.FakeRedis(server=server), settings.token_cache_prefix,
                                 settings.token_cache_ttl_seconds)
    server.connected = False
    line = _check_keys(store, settings)
    assert (line.status, line.subject) == (FAIL, "TOKEN_CACHE_KEYS")
    assert line.detail == "could not read entries (CacheUnavailable)"
