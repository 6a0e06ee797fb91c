"""OpenTelemetry traces end to end: the API under real gunicorn (two workers, the shipped
config) with a real redis-server, against the dev tenant, exporting OTLP/HTTP to a
receiver this test runs (tests/support/otlp.py decodes what a collector would get).

A cold ``/api/me`` that arrives with a ``traceparent`` is one trace with that trace id:
the server span, token validation, the acquisition (``source=obo``) with its Redis
commands and the call to the dev tenant's token endpoint, and the Graph call, whose
``traceparent`` the Graph stand-in received. A warm request's acquisition says
``memory``. Nothing exported holds the token, the user's UPN, a JWT or a sealed blob.
"""

from __future__ import annotations

import json
import uuid

import pytest
import requests

from tests.support.otlp import ReceivedSpan, otlp_receiver
from tests.support.servers import redis_server
from tests.support.stack import api_env, devtenant, gunicorn

pytestmark = pytest.mark.e2e

SERVER_SPAN = "GET /api/me"
WARM_ATTEMPTS = 5


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def ancestors(spans: list[ReceivedSpan], one: ReceivedSpan) -> list[str]:
    """The names of ``one``'s ancestors within ``spans``, nearest first."""
    by_id = {span.span_id: span for span in spans}
    names = []
    while one.parent_span_id in by_id:
        one = by_id[one.parent_span_id]
        names.append(one.name)
    return names


def test_a_request_is_one_trace_from_the_caller_to_graph(tmp_path):
    with (
        otlp_receiver() as receiver,
        redis_server() as redis_url,
        devtenant(tmp_path / "devtenant") as tenant,
    ):
        env = api_env(tenant, redis_url, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
                      OTEL_BSP_SCHEDULE_DELAY="100", LOG_FORMAT="json", LOG_LEVEL="info")
        with gunicorn(env, workers=2) as api:
            token = tenant.tenant.api_token("adele")
            cold_parent, cold_trace, caller_span = traceparent()
            with requests.Session() as session:  # one keep-alive connection: one worker
                cold = session.get(f"{api.url}/api/me", timeout=30, headers={
                    "Authorization": f"Bearer {token}", "traceparent": cold_parent,
                    "X-Request-ID": "otel-e2e-cold"})
                # The server span ends last (its children end first): once it is in, all are.
                cold_spans = receiver.wait_for(cold_trace, SERVER_SPAN)
                # Warm: the worker's first requests may re-read the entry from Redis (its
                # invalidation listener connects at first use), then memory serves it.
                warm_sources, warm_statuses = [], []
                for _ in range(WARM_ATTEMPTS):
                    warm_parent, warm_trace, _ = traceparent()
                    warm_statuses.append(session.get(f"{api.url}/api/me", timeout=30, headers={
                        "Authorization": f"Bearer {token}", "traceparent": warm_parent}).status_code)
                    warm_spans = receiver.wait_for(warm_trace, SERVER_SPAN)
                    (warm_acquire,) = [span for span in warm_spans if span.name == "flask_obo.token.acquire"]
                    warm_sources.append(warm_acquire.attributes["flask_obo.token.source"])
                    if warm_sources[-1] == "memory":
                        break
            graph_traceparents = tenant.counters()["graph_traceparents"]
            log_lines = [json.loads(line) for line in api.log.read_text().splitlines()]
        upn = tenant.tenant.find_user("adele")[1].upn
        secret = env.get("AZURE_CLIENT_SECRET", "")
        everything = list(receiver.spans)

    assert cold.status_code == 200 and set(warm_statuses) == {200}
    # One trace, the caller's: one server span, child of the caller's span, and every other
    # span of the trace beneath it.
    (server,) = [span for span in cold_spans if span.kind == "server"]
    assert (server.name, server.parent_span_id) == (SERVER_SPAN, caller_span)
    assert all(SERVER_SPAN in ancestors(cold_spans, span) for span in cold_spans if span is not server)
    assert server.attributes["flask_obo.request_id"] == "otel-e2e-cold"
    assert server.attributes["http.status_code"] == 200
    assert server.resource["service.name"] == "flask-obo"

    (validate,) = [span for span in cold_spans if span.name == "flask_obo.token.validate"]
    (acquire,) = [span for span in cold_spans if span.name == "flask_obo.token.acquire"]
    assert validate.parent_span_id == acquire.parent_span_id == server.span_id
    assert acquire.attributes["flask_obo.token.source"] == "obo"
    (entra,) = [span for span in cold_spans if span.kind == "client"
                and span.attributes.get("http.url", "").endswith("/oauth2/v2.0/token")]
    assert "flask_obo.token.acquire" in ancestors(cold_spans, entra)
    assert entra.attributes["http.method"] == "POST" and entra.attributes["http.status_code"] == 200
    redis_commands = [span.name for span in cold_spans if span.attributes.get("db.system") == "redis"
                      and "flask_obo.token.acquire" in ancestors(cold_spans, span)]
    # The user's lock, taken with the entry's read, and the locked write that releases it:
    # two scripts (each may follow its SCRIPT LOAD), no separate SET NX or unlock.
    assert redis_commands.count("EVALSHA") >= 2 and "SET" not in redis_commands, redis_commands
    (graph,) = [span for span in cold_spans if span.kind == "client"
                and "/v1.0/me" in span.attributes.get("http.url", "")]
    assert graph.parent_span_id == server.span_id and graph.attributes["http.status_code"] == 200
    # The Graph stand-in received the trace, as the child of the API's Graph client span.
    assert f"00-{cold_trace}-{graph.span_id}-01" in graph_traceparents

    # Warm (same worker: same connection): from memory, no call to Entra ID.
    assert warm_sources[-1] == "memory" and set(warm_sources) <= {"redis", "memory"}, warm_sources
    assert not [span for span in warm_spans if "/oauth2/" in span.attributes.get("http.url", "")]

    # The JSON log line of the exchange names the trace and the acquisition span.
    (exchange,) = [line for line in log_lines if "on-behalf-of exchange" in line["message"]]
    assert (exchange["trace_id"], exchange["span_id"]) == (cold_trace, acquire.span_id)
    assert exchange["request_id"] == "otel-e2e-cold"

    # Nothing exported (every span of every trace, all attributes) holds a secret.
    assert everything
    for span in everything:
        for text in span.strings():
            assert token not in text and "eyJ" not in text, (span.name, text)  # no JWT at all
            assert upn.lower() not in text.lower(), (span.name, text)
            assert "gAAAAA" not in text, (span.name, text)  # no sealed cache blob
            assert not secret or secret not in text, (span.name, text)


def test_a_worker_sends_its_queued_spans_when_it_exits(tmp_path):
    """Batches leave every 10 minutes here, so only the exit's flush can send them."""
    with (
        otlp_receiver() as receiver,
        devtenant(tmp_path / "devtenant") as tenant,
    ):
        env = api_env(tenant, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="600000")
        parent, trace_id, _ = traceparent()
        with gunicorn(env, workers=2) as api:
            response = requests.get(f"{api.url}/api/whoami", timeout=30, headers={
                "Authorization": f"Bearer {tenant.tenant.api_token('adele')}", "traceparent": parent})
            assert response.status_code == 200
            assert receiver.trace(trace_id) == []  # still queued in the worker
        # gunicorn stopped (SIGTERM): each worker flushed as it exited.
        spans = receiver.wait_for(trace_id, "GET /api/whoami", "flask_obo.token.validate", timeout=5)

    assert {span.trace_id for span in spans} == {trace_id}
