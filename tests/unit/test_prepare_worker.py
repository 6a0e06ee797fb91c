"""``flask_obo.prepare_worker(app)``: a server's worker looks at Redis once before its
first request, so one started while Redis hangs opens its circuit there, not in a user's
request that would wait the timeout first. On the Redis store over fakeredis; msal runs
unpatched against the HTTP double of Entra ID."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
from flask import Flask
from redis.exceptions import TimeoutError as RedisTimeout

from app import create_app
from flask_obo import RedisTokenCacheStore, Settings, prepare_worker
from flask_obo.breaker import CircuitBreaker, State
from tests.support.fake_entra import ADELE, FakeEntra


class HangingRedis(fakeredis.FakeRedis):
    """A Redis that accepts connections and never answers: every command times out."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands += 1
        raise RedisTimeout("Timeout reading from socket")

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        self.commands += 1
        raise RedisTimeout("Timeout reading from socket")


def redis_store(client: fakeredis.FakeRedis, settings: Settings) -> RedisTokenCacheStore:
    store = RedisTokenCacheStore(client, settings.token_cache_prefix, settings.token_cache_ttl_seconds)
    store.breaker = CircuitBreaker("redis")  # this test's own health, not the process's
    return store


def test_a_worker_started_while_redis_hangs_opens_its_circuit_before_any_request(
        settings: Settings, entra: FakeEntra) -> None:
    hanging = HangingRedis()
    store = redis_store(hanging, settings)
    app = create_app(settings, store=store)

    prepare_worker(app)
    assert store.breaker.state is State.OPEN
    assert hanging.commands == 1  # one PING

    response = app.test_client().get("/api/me", headers={"Authorization": f"Bearer {entra.api_token(ADELE)}"})
    assert response.status_code == 200  # by an exchange, without Redis
    assert hanging.commands == 1  # the request did not wait on Redis
    assert entra.obo_calls() == 1


def test_a_worker_started_while_redis_answers_keeps_its_circuit_closed(settings: Settings) -> None:
    store = redis_store(fakeredis.FakeRedis(), settings)
    prepare_worker(create_app(settings, store=store))
    assert store.breaker.state is State.CLOSED


@pytest.mark.parametrize("app", [Flask("not-flask-obo"), lambda environ, start_response: []],
                         ids=["flask-without-flask-obo", "plain-wsgi"])
def test_an_application_without_flask_obo_is_left_alone(app: Any) -> None:
    prepare_worker(app)
