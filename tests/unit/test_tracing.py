"""OpenTelemetry traces (flask_obo.tracing): the off switch, a request's spans against the
HTTP double (exported in memory through the same scrubbing exporter as in production),
and the JSON log lines' trace_id / span_id. tests/e2e/test_tracing.py runs it for real."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import threading
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from app import create_app
from app.logging_setup import logging_config
from flask_obo import tracing
from flask_obo.bulkhead import Deadline, SingleFlight
from flask_obo.metrics import FAILED, OUTCOMES
from flask_obo.settings import Settings
from flask_obo.tracing import DISABLED_VARIABLE, ENDPOINT_VARIABLES, scrubbed
from tests.support.fake_entra import ADELE, CLIENT_SECRET, TOKEN_URL, Behaviour, FakeEntra, settings_env

OTEL_VARIABLES = (*ENDPOINT_VARIABLES, DISABLED_VARIABLE)


def traceparent() -> tuple[str, str, str]:
    """A caller's ``traceparent`` (sampled), with its trace id and span id."""
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield
    tracing.shutdown()  # whatever a test turned on, the next one starts with tracing off


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    assert tracing.configure(exporter)
    return exporter


def finished(exporter: InMemorySpanExporter) -> tuple[ReadableSpan, ...]:
    tracing.shutdown()  # flushes the batch processor into the exporter
    return exporter.get_finished_spans()


def every_string(spans: Sequence[ReadableSpan]) -> list[str]:
    """Every name, attribute value, event and status text of ``spans``: what leaves the process."""
    strings: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, str):
            strings.append(value)
        elif isinstance(value, (tuple, list)):
            for item in value:
                add(item)

    for one in spans:
        add(one.name)
        add(one.status.description or "")
        for key, value in (one.attributes or {}).items():
            add(key)
            add(value)
        for event in one.events:
            add(event.name)
            for value in (event.attributes or {}).values():
                add(value)
    return strings


# --- off ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("environ, on", [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "false"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
])
def test_traces_are_on_only_with_an_endpoint_and_the_sdk_not_disabled(environ, on):
    assert tracing.enabled(environ) is on


@pytest.mark.parametrize("environ", [{}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
                                          "OTEL_SDK_DISABLED": "true"}])
def test_off_nothing_is_instrumented_and_requests_are_served(environ, monkeypatch, entra: FakeEntra,
                                                             settings: Settings, store):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    app = create_app(settings, store=store)
    response = app.test_client().get("/api/me", headers={
        "Authorization": f"Bearer {entra.api_token()}", "traceparent": traceparent()[0]})

    assert response.status_code == 200
    assert not tracing.active()
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)  # no Flask hooks at all
    assert not hasattr(requests.Session.send, "opentelemetry_instrumentation_requests_applied")
    assert entra.graph_traceparents == [None]  # nothing was propagated: there is no span
    assert tracing.span("anything") is tracing.span("else")  # the one shared no-op


def test_disabled_wins_over_an_explicit_exporter(monkeypatch):
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.configure(InMemorySpanExporter())
    assert not tracing.active()


def test_an_endpoint_without_the_packages_is_named_once(monkeypatch, caplog):
    def missing(_exporter: object) -> None:
        raise ImportError("No module named 'opentelemetry.sdk'", name="opentelemetry.sdk")

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(tracing, "_start_provider", missing)
    monkeypatch.setattr(tracing, "_missing_packages_reported", False)
    with caplog.at_level(logging.WARNING, logger="flask_obo.tracing"):
        assert not tracing.configure()
        assert not tracing.configure()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "flask_obo.tracing"]
    assert "flask-obo[otel]" in warning and "opentelemetry.sdk" in warning


# --- on -----------------------------------------------------------------------------------------
def test_a_request_continues_the_callers_trace_down_to_graph(exporter, entra: FakeEntra,
                                                            settings: Settings, store):
    app = create_app(settings, store=store)
    client = app.test_client()
    token = entra.api_token()
    cold_parent, cold_trace, caller_span = traceparent()
    warm_parent, warm_trace, _ = traceparent()

    cold = client.get("/api/me", headers={"Authorization": f"Bearer {token}",
                                          "traceparent": cold_parent, "X-Request-ID": "trace-unit-1"})
    warm = client.get("/api/me", headers={"Authorization": f"Bearer {token}", "traceparent": warm_parent})
    spans = finished(exporter)

    assert cold.status_code == warm.status_code == 200
    by_trace: dict[str, list[ReadableSpan]] = {}
    for one in spans:
        by_trace.setdefault(format_trace_id(one.context.trace_id), []).append(one)
    assert set(by_trace) == {cold_trace, warm_trace}  # each request one trace: the caller's

    cold_spans = {one.context.span_id: one for one in by_trace[cold_trace]}
    (server,) = [one for one in cold_spans.values() if one.kind is SpanKind.SERVER]
    assert server.name == "GET /api/me" and format_span_id(server.parent.span_id) == caller_span
    assert server.attributes["flask_obo.request_id"] == "trace-unit-1"

    def children(parent: ReadableSpan, name: str | None = None) -> list[ReadableSpan]:
        return [one for one in cold_spans.values() if one.parent is not None
                and one.parent.span_id == parent.context.span_id and name in (None, one.name)]

    def under(ancestor: ReadableSpan, one: ReadableSpan) -> bool:
        while one.parent is not None and one.parent.span_id in cold_spans:
            one = cold_spans[one.parent.span_id]
            if one is ancestor:
                return True
        return False

    (validate,) = children(server, "flask_obo.token.validate")
    (acquire,) = children(server, "flask_obo.token.acquire")
    assert acquire.attributes["flask_obo.token.source"] == "obo"
    assert validate.end_time <= acquire.start_time
    (entra_call,) = [one for one in cold_spans.values()
                     if one.kind is SpanKind.CLIENT and one.attributes.get("http.url") == TOKEN_URL]
    assert under(acquire, entra_call) and entra_call.attributes["http.status_code"] == 200
    assert any(one.attributes.get("db.system") == "redis" for one in cold_spans.values()
               if under(acquire, one))  # the cache's commands (fakeredis here)
    (graph_call,) = [one for one in children(server) if one.kind is SpanKind.CLIENT]
    # The query's values never leave the process (a downstream query may carry a user's data).
    assert graph_call.attributes["http.url"] == "https://graph.microsoft.com/v1.0/me?%24select=REDACTED"
    # Graph received the trace: its parent is the Graph client span.
    assert entra.graph_traceparents[0] == f"00-{cold_trace}-{format_span_id(graph_call.context.span_id)}-01"

    warm_acquire = [one for one in by_trace[warm_trace] if one.name == "flask_obo.token.acquire"]
    # fakeredis has no client tracking, so the memory tier re-reads the entry: "redis" (with
    # real Redis a warm request says "memory": tests/e2e/test_tracing.py).
    assert [one.attributes["flask_obo.token.source"] for one in warm_acquire] == ["redis"]
    assert not [one for one in by_trace[warm_trace] if one.attributes.get("http.url") == TOKEN_URL]

    exported = "\n".join(every_string(spans))
    assert token not in exported and "eyJ" not in exported  # no JWT, the caller's or Graph's
    assert "gAAAAA" not in exported  # no sealed cache blob
    assert "adele@contoso.example" not in exported.lower()
    assert CLIENT_SECRET not in exported


def test_a_failed_acquisition_is_marked_with_its_error_type_only(exporter, entra: FakeEntra,
                                                                settings: Settings, store):
    entra.behaviours[ADELE] = Behaviour("invalid_grant")
    app = create_app(settings, store=store)
    response = app.test_client().get("/api/me", headers={"Authorization": f"Bearer {entra.api_token()}"})
    spans = finished(exporter)

    assert response.status_code >= 400
    (acquire,) = [one for one in spans if one.name == "flask_obo.token.acquire"]
    assert acquire.status.status_code is StatusCode.ERROR and not acquire.status.description
    assert acquire.attributes["error.type"] == "AssertionRejected"
    assert "flask_obo.token.source" not in acquire.attributes and not acquire.events


def test_a_follower_records_its_wait_for_the_leaders_exchange(exporter):
    """Single flight: the follower's ``flask_obo.token.wait`` spans its wait for the leader."""
    flights: SingleFlight[str] = SingleFlight()
    waiting = threading.Event()

    class WaitStarted(SpanProcessor):  # the leader finishes only once the follower waits
        def on_start(self, span, parent_context=None):
            if span.name == tracing.WAIT_SPAN:
                waiting.set()

    tracing._provider.add_span_processor(WaitStarted())
    leader_started = threading.Event()

    def exchange() -> str:
        leader_started.set()
        assert waiting.wait(10)
        return "the leader's token"

    with ThreadPoolExecutor(1) as pool:
        leader = pool.submit(flights.run, "adele", exchange, Deadline(10))
        assert leader_started.wait(10)
        with tracing.span(tracing.ACQUIRE_SPAN):
            followed = flights.run("adele", lambda: "a token of its own", Deadline(10))
        assert leader.result(10) == followed == "the leader's token"
    spans = {one.name: one for one in finished(exporter)}

    wait, acquire = spans[tracing.WAIT_SPAN], spans[tracing.ACQUIRE_SPAN]
    assert wait.parent.span_id == acquire.context.span_id and wait.status.is_ok


def test_every_outcome_but_failure_has_a_source():
    assert set(tracing.SOURCES) == set(OUTCOMES) - {FAILED}
    assert sorted(tracing.SOURCES.values()) == ["memory", "obo", "redis", "refresh"]


def test_an_spa_may_send_its_trace_context_cross_origin(store):
    spa = "https://spa.example"
    client = create_app(Settings.from_env(settings_env(CORS_ALLOWED_ORIGINS=spa)), store=store).test_client()
    response = client.options("/api/me", headers={
        "Origin": spa, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization,traceparent,tracestate"})

    assert response.headers["Access-Control-Allow-Origin"] == spa
    allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "traceparent", "tracestate"} <= allowed


# --- what leaves the process ------------------------------------------------------------------
@pytest.mark.parametrize("key, value, expected", [
    ("http.url", "https://graph.microsoft.com/v1.0/me?$select=displayName,mail&x=1",
     "https://graph.microsoft.com/v1.0/me?$select=REDACTED&x=REDACTED"),
    ("http.target", "/api/me?user=adele", "/api/me?user=REDACTED"),
    ("url.full", "https://graph.microsoft.com/v1.0/users/adele@contoso.com/manager",
     "https://graph.microsoft.com/v1.0/users/[redacted]/manager"),
    ("url.full", "https://graph.microsoft.com/v1.0/users/adele%40contoso.com",
     "https://graph.microsoft.com/v1.0/users/[redacted]"),
    ("exception.message", "bad token eyJhbGciOi.eyJzdWIiOiIx.c2ln here", "bad token [redacted] here"),
    ("x", "Authorization: Bearer abcdefghijklmnop.qrs", "Authorization: [redacted]"),
    ("x", "blob gAAAAABnQ1b2Zm9vYmFyYmF6cXV4", "blob [redacted]"),
    ("db.statement", "EVALSHA 3f2a flask-obo:token:abc gAAAAAxyz 86400", "EVALSHA"),
    ("db.statement", "SET ? ? ?\nGET ?", "SET\nGET"),
    ("db.query.text", "GET flask-obo:token:abc", "GET"),
    ("http.route", "/api/me", "/api/me"),
    ("http.status_code", 200, 200),
    ("tags", ("a@b.example", "ok"), ("[redacted]", "ok")),
])
def test_scrubbed_values(key, value, expected):
    assert scrubbed(key, value) == expected


# --- log correlation --------------------------------------------------------------------------
@pytest.fixture
def json_lines() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing through the app's own JSON handler (app.logging_setup) to a buffer."""
    stream = io.StringIO()
    config = logging_config("INFO", "json")
    config["handlers"]["stderr"]["stream"] = stream
    config["loggers"] = {"tests.tracing": {"level": "INFO", "handlers": ["stderr"], "propagate": False}}
    del config["root"]
    logging.config.dictConfig(config)
    yield logging.getLogger("tests.tracing"), stream
    logging.getLogger("tests.tracing").handlers.clear()


def test_json_lines_carry_the_active_spans_ids(exporter, json_lines):
    logger, stream = json_lines
    with tracing.span("unit.outer") as outer:
        logger.info("inside")
    logger.info("outside")
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())

    context = outer.get_span_context()
    assert inside["trace_id"] == format_trace_id(context.trace_id)
    assert inside["span_id"] == format_span_id(context.span_id)
    assert "trace_id" not in outside and "span_id" not in outside
    assert inside["request_id"] == outside["request_id"] == "-"


def test_json_lines_have_no_trace_fields_with_tracing_off(json_lines):
    logger, stream = json_lines
    with tracing.span("unit.outer"):
        logger.info("inside")
    (line,) = (json.loads(text) for text in stream.getvalue().splitlines())
    assert "trace_id" not in line and "span_id" not in line
