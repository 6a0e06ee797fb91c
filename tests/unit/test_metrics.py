"""Metrics: each label of the contract (docs/reference/metrics.md) counted where it
happens, msal unpatched against the HTTP double. Counts are read from the application's
own registry, and the text format from ``GET /metrics`` of the reference API."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import requests
import responses
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from flask_obo import FlaskOBO, RedisTokenCacheStore
from flask_obo.extension import services_of
from flask_obo.metrics import Metrics, grant_label
from flask_obo.settings import Settings
from flask_obo.token_cache import partition_key
from tests.support.fake_entra import (
    ADELE,
    BOB,
    GRAPH,
    TENANT_ID,
    TOKEN_URL,
    Behaviour,
    FakeEntra,
    settings_env,
)
from tests.support.servers import free_port


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def value(app: Flask, name: str, **labels: str) -> float:
    """A sample of ``app``'s registry (0 when absent)."""
    found = services_of(app).metrics.registry.get_sample_value(name, labels)
    return found or 0.0


def acquisitions(app: Flask) -> dict[str, float]:
    outcomes = ("memory_hit", "cache_hit", "refresh", "obo", "failed")
    return {o: n for o in outcomes if (n := value(app, "flask_obo_token_acquisitions_total", outcome=o))}


@pytest.fixture
def memory_app() -> Flask:
    """The reference API on the in-process store: the memory tier is always current."""
    return create_app(Settings.from_env(settings_env()))


# --- flask_obo_token_acquisitions_total{outcome} ------------------------------------------------


def test_first_acquisition_is_obo_and_warm_ones_memory_hits(memory_app: Flask, entra: FakeEntra):
    client = memory_app.test_client()
    for _ in range(4):
        assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    assert acquisitions(memory_app) == {"obo": 1, "memory_hit": 3}
    assert value(memory_app, "flask_obo_token_endpoint_requests_total", grant="obo", status="200") == 1
    assert value(memory_app, "flask_obo_token_endpoint_seconds_count") == entra.obo_calls() == 1
    assert value(memory_app, "flask_obo_downstream_requests_total", api="graph", status="200") == 4
    assert value(memory_app, "flask_obo_downstream_seconds_count") == 4


def test_a_session_invalidated_is_reread_a_cache_hit_then_current_again(memory_app: Flask, entra: FakeEntra):
    client = memory_app.test_client()
    headers = bearer(entra.api_token(ADELE))
    assert client.get("/api/me", headers=headers).status_code == 200
    services_of(memory_app).tokens.invalidate([partition_key(ADELE, TENANT_ID)])  # as Redis reports
    assert client.get("/api/me", headers=headers).status_code == 200
    assert client.get("/api/me", headers=headers).status_code == 200
    assert acquisitions(memory_app) == {"obo": 1, "cache_hit": 1, "memory_hit": 1}
    assert len(entra.token_requests) == 1


def test_without_a_coherence_channel_every_warm_acquisition_rereads_redis(client, app: Flask,
                                                                          entra: FakeEntra):
    """The fixture's store does not listen for invalidations: copies are never current."""
    for _ in range(3):
        assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    assert acquisitions(app) == {"obo": 1, "cache_hit": 2}


def test_an_expired_access_token_is_renewed_a_refresh(client, app: Flask, entra: FakeEntra):
    entra.expires_in = 120  # msal treats tokens with < 5 min left as expired
    headers = bearer(entra.api_token(ADELE))
    assert client.get("/api/me", headers=headers).status_code == 200
    assert client.get("/api/me", headers=headers).status_code == 200
    assert acquisitions(app) == {"obo": 1, "refresh": 1}
    assert value(app, "flask_obo_token_endpoint_requests_total", grant="refresh_token", status="200") == 1
    assert value(app, "flask_obo_token_endpoint_requests_total", grant="obo", status="200") == 1


@pytest.mark.parametrize(("kind", "status", "answer"), [
    ("invalid_grant", "400", 401), ("throttled", "429", 503), ("server_error", "500", 503),
])
def test_a_refused_exchange_is_failed_with_the_endpoints_status(client, app: Flask, entra: FakeEntra,
                                                                 kind: str, status: str, answer: int):
    entra.behaviours[ADELE] = Behaviour(kind)
    assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == answer
    assert acquisitions(app) == {"failed": 1}
    assert value(app, "flask_obo_token_endpoint_requests_total", grant="obo", status=status) == 1
    assert value(app, "flask_obo_downstream_requests_total", api="graph", status="200") == 0
    assert value(app, "flask_obo_requests_total", route="/api/me", status=str(answer)) == 1


def test_a_token_endpoint_that_does_not_answer_counts_as_error(settings: Settings, store):
    entra = FakeEntra()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.POST, TOKEN_URL, body=requests.ConnectionError("refused"))
        entra.register(rsps)
        app = create_app(settings, store=store)
        assert app.test_client().get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 503
    assert value(app, "flask_obo_token_endpoint_requests_total", grant="obo", status="error") == 1
    assert acquisitions(app) == {"failed": 1}


@dataclass
class HeldEntra(FakeEntra):
    """Token requests wait for ``release``, so a second request of the user can join."""

    release: threading.Event = field(default_factory=threading.Event)
    waiting: threading.Event = field(default_factory=threading.Event)

    def _token(self, request: Any) -> tuple[int, dict[str, str], str]:
        self.waiting.set()
        assert self.release.wait(10)
        return super()._token(request)


def test_a_single_flight_follower_is_a_memory_hit(settings: Settings, store, monkeypatch):
    """The follower gets the leader's token in-process; with this store (never current)
    a request arriving after the flight would have been a cache_hit instead."""
    entra = HeldEntra()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        entra.register(rsps)
        app = create_app(settings, store=store)
        flights = services_of(app).tokens._flights
        entered = threading.Semaphore(0)
        run = flights.run

        def counting_run(*args: Any) -> Any:
            entered.release()
            return run(*args)

        monkeypatch.setattr(flights, "run", counting_run)
        token = entra.api_token(ADELE)
        statuses: list[int] = []

        def me() -> None:
            statuses.append(app.test_client().get("/api/me", headers=bearer(token)).status_code)

        leader = threading.Thread(target=me)
        leader.start()
        assert entra.waiting.wait(10) and entered.acquire(timeout=10)
        follower = threading.Thread(target=me)
        follower.start()
        assert entered.acquire(timeout=10)  # in the flight while the leader's request is held
        entra.release.set()
        leader.join(10)
        follower.join(10)
    assert statuses == [200, 200]
    assert acquisitions(app) == {"obo": 1, "memory_hit": 1}
    assert entra.obo_calls() == 1


def test_a_claims_challenge_from_graph_is_a_second_obo_and_two_downstream_requests(client, app, entra):
    entra.graph_behaviours[ADELE] = ["claims"]
    assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    assert acquisitions(app) == {"obo": 2}
    assert value(app, "flask_obo_downstream_requests_total", api="graph", status="401") == 1
    assert value(app, "flask_obo_downstream_requests_total", api="graph", status="200") == 1


# --- downstream, cache errors, lock wait ----------------------------------------------------------


def test_downstream_statuses_are_labelled_by_api(client, app: Flask, entra: FakeEntra):
    headers = bearer(entra.api_token(BOB))
    assert client.get("/api/me/manager", headers=headers).status_code == 404  # Bob has no manager
    entra.graph_behaviours[BOB] = ["500"]
    assert client.get("/api/me", headers=headers).status_code == 502
    assert value(app, "flask_obo_downstream_requests_total", api="graph", status="404") == 1
    assert value(app, "flask_obo_downstream_requests_total", api="graph", status="500") == 1
    assert value(app, "flask_obo_requests_total", route="/api/me/manager", status="404") == 1
    assert value(app, "flask_obo_requests_total", route="/api/me", status="502") == 1


def test_a_downstream_api_that_does_not_answer_counts_as_error(settings: Settings, store):
    entra = FakeEntra()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, f"{GRAPH}/me", body=requests.ConnectionError("refused"))
        entra.register(rsps)
        app = create_app(settings, store=store)
        assert app.test_client().get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 502
    assert value(app, "flask_obo_downstream_requests_total", api="graph", status="error") == 1
    assert acquisitions(app) == {"obo": 1}  # the token was had; the call failed


def test_every_redis_operation_that_fails_counts_and_the_user_is_still_served(settings: Settings,
                                                                              entra: FakeEntra):
    down = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    store = RedisTokenCacheStore(down, settings.token_cache_prefix, settings.token_cache_ttl_seconds)
    app = create_app(settings, store=store)
    assert app.test_client().get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    errors = {op: value(app, "flask_obo_cache_errors_total", operation=op) for op in ("load", "lock", "save")}
    assert errors == {"load": 1, "lock": 1, "save": 1}  # then the breaker opens:
    assert app.test_client().get("/readyz").json["checks"]["redis"] == "degraded"
    assert value(app, "flask_obo_cache_errors_total", operation="ping") == 0  # turned away, not tried
    assert acquisitions(app) == {"obo": 1}


def test_lock_waits_are_observed_for_each_token_request(client, app: Flask, entra: FakeEntra):
    assert value(app, "flask_obo_lock_wait_seconds_count") == 0
    assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    assert client.get("/api/me", headers=bearer(entra.api_token(BOB))).status_code == 200
    assert client.get("/api/me", headers=bearer(entra.api_token(BOB))).status_code == 200  # cache hit
    assert value(app, "flask_obo_lock_wait_seconds_count") == 2
    assert 0 <= value(app, "flask_obo_lock_wait_seconds_sum") < 1


# --- requests, the view -------------------------------------------------------------------------


@pytest.fixture
def small_app() -> tuple[Flask, FlaskOBO]:
    app = Flask(__name__)
    obo = FlaskOBO(app, settings=settings_env())
    app.add_url_rule("/metrics", "metrics", obo.metrics_view)

    @app.get("/items/<int:item>")
    def item(item: int) -> dict[str, int]:
        return {"item": item}

    return app, obo


def test_requests_are_labelled_by_route_template_never_the_raw_path(small_app):
    app, _ = small_app
    client = app.test_client()
    for n in (1, 2, 3):
        assert client.get(f"/items/{n}").status_code == 200
    assert client.get("/items/not-a-number").status_code == 404
    assert client.get("/random/path/9f3a").status_code == 404
    assert client.post("/items/1").status_code == 405
    assert value(app, "flask_obo_requests_total", route="/items/<int:item>", status="200") == 3
    assert value(app, "flask_obo_requests_total", route="unmatched", status="404") == 2
    assert value(app, "flask_obo_requests_total", route="unmatched", status="405") == 1
    assert value(app, "flask_obo_request_seconds_count") == 6
    scraped = client.get("/metrics").get_data(as_text=True)
    assert "9f3a" not in scraped and "not-a-number" not in scraped


def test_metrics_view_serves_the_text_format_of_its_own_app(small_app, memory_app: Flask, entra):
    app, _ = small_app
    client = app.test_client()
    client.get("/items/1")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.headers["Cache-Control"] == "no-store"
    families = {f.name: f for f in text_string_to_metric_families(response.get_data(as_text=True))}
    expected = {"flask_obo_token_acquisitions", "flask_obo_token_endpoint_requests",
                "flask_obo_token_endpoint_seconds", "flask_obo_downstream_requests",
                "flask_obo_downstream_seconds", "flask_obo_cache_errors", "flask_obo_lock_wait_seconds",
                "flask_obo_requests", "flask_obo_request_seconds"}
    assert expected <= set(families)
    (sample,) = [s for s in families["flask_obo_requests"].samples
                 if s.name == "flask_obo_requests_total" and s.labels["route"] == "/items/<int:item>"]
    assert sample.value == 1 and sample.labels["status"] == "200"
    # every outcome is there from the start (0), so rate() sees the first one
    outcomes = {s.labels["outcome"] for s in families["flask_obo_token_acquisitions"].samples
                if s.name.endswith("_total")}
    assert outcomes == {"memory_hit", "cache_hit", "refresh", "obo", "failed"}
    # another app in the same process counts apart
    memory_app.test_client().get("/api/me", headers=bearer(entra.api_token(ADELE)))
    assert value(app, "flask_obo_token_acquisitions_total", outcome="obo") == 0
    assert value(memory_app, "flask_obo_token_acquisitions_total", outcome="obo") == 1


def test_the_reference_api_serves_metrics_without_a_token(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "flask_obo_token_acquisitions_total" in response.get_data(as_text=True)


def test_grant_labels():
    assert grant_label("urn:ietf:params:oauth:grant-type:jwt-bearer") == "obo"
    assert grant_label("refresh_token") == "refresh_token"
    assert grant_label("client_credentials") == "client_credentials"
    assert grant_label("urn:ietf:params:oauth:grant-type:device_code") == "device_code"
    assert grant_label(None) == "unknown"


def test_a_multiprocess_directory_set_after_import_is_ignored(monkeypatch, tmp_path, caplog):
    """prometheus_client chose its mode at import (here: single process): reading a
    directory no process writes to would serve zeros."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    metrics = Metrics()
    assert metrics.multiprocess_dir is None
    assert "set after prometheus_client was imported" in caplog.text
    metrics.acquisition("obo")
    assert b'flask_obo_token_acquisitions_total{outcome="obo"} 1.0' in metrics.exposition()[0]
