"""OpenTelemetry traces: where a request spent its time, end to end.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
set (and ``OTEL_SDK_DISABLED`` is not ``true``). Then each process exports its spans
over OTLP/HTTP (protobuf), configured by the standard ``OTEL_*`` variables, which the
OpenTelemetry SDK reads itself (sampler, headers, timeout, batching, resource
attributes); ``OTEL_SERVICE_NAME`` defaults to ``flask-obo``. The SDK, the exporter and
the Flask, requests and redis instrumentations come with the optional extra
``flask-obo[otel]`` and are imported only then: without them, or switched off, flask_obo
itself imports nothing of OpenTelemetry.

A request's trace: the server span (Flask instrumentation; an incoming ``traceparent``
continues the caller's trace; the request id is its ``flask_obo.request_id``), under it
``flask_obo.token.validate``, ``flask_obo.token.acquire`` (``flask_obo.token.source``:
``memory``, ``redis``, ``obo`` or ``refresh``; ``flask_obo.token.wait`` beneath it for
the time spent waiting on another thread's exchange), the client spans of each call to
Entra ID and to downstream APIs (requests instrumentation, which also sends
``traceparent`` on), and the Redis commands (redis instrumentation).

Off, the request path pays one ``is None`` test per span: ``span`` hands back a shared
``nullcontext`` and nothing is registered on the application. (The OpenTelemetry API's
own no-op tracer would cost a context attach and detach per span.)

Nothing secret leaves the process: every span passes ``scrubbed`` before export (query
values, e-mail addresses, JWTs, bearer credentials and Fernet tokens are replaced, Redis
statements keep their command names only), as ``RedactSecrets`` guards the logs. The
instrumentations record no header unless ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*``
asks; do not ask for ``Authorization``.

Under gunicorn, ``config/gunicorn.conf.py`` calls ``configure`` in each worker after the
fork (the batch exporter's thread must belong to the worker) and ``shutdown`` when the
worker exits, so its last spans are sent. Elsewhere ``FlaskOBO.init_app`` calls
``configure`` (through ``instrument_app``); at process exit the SDK flushes by itself.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from flask import Flask

from .metrics import CACHE_HIT, MEMORY_HIT, OBO, REFRESH
from .request_ids import current_request_id

if TYPE_CHECKING:
    from collections.abc import Iterator

    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
DISABLED_VARIABLE = "OTEL_SDK_DISABLED"
DEFAULT_SERVICE_NAME = "flask-obo"
INSTRUMENTATION_NAME = "flask_obo"

VALIDATE_SPAN = "flask_obo.token.validate"
ACQUIRE_SPAN = "flask_obo.token.acquire"
WAIT_SPAN = "flask_obo.token.wait"
SOURCE_ATTRIBUTE = "flask_obo.token.source"
REQUEST_ID_ATTRIBUTE = "flask_obo.request_id"
#: ``flask_obo.token.source`` for each acquisition outcome (``flask_obo.metrics.OUTCOMES``).
SOURCES = {MEMORY_HIT: "memory", CACHE_HIT: "redis", OBO: "obo", REFRESH: "refresh"}

P = ParamSpec("P")
R = TypeVar("R")

_NO_SPAN: AbstractContextManager[None] = nullcontext()
_lock = threading.Lock()
_tracer: Tracer | None = None  # set by configure(): tracing is on in this process
_provider: TracerProvider | None = None
_missing_packages_reported = False


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Does the environment ask for traces? An OTLP endpoint is set, the SDK not disabled.
    (The process environment: the SDK reads its ``OTEL_*`` variables there, not in ``.env``.)"""
    return not _sdk_disabled(environ) and any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def _sdk_disabled(environ: Mapping[str, str]) -> bool:
    return environ.get(DISABLED_VARIABLE, "").strip().lower() == "true"


def active() -> bool:
    """Is tracing on in this process (``configure`` set it up)?"""
    return _tracer is not None


def configure(exporter: SpanExporter | None = None) -> bool:
    """Set up this process's tracing if the environment asks for it; True when on.

    Idempotent. ``exporter`` replaces the OTLP/HTTP exporter (tests, a console exporter)
    and turns tracing on without an endpoint; ``OTEL_SDK_DISABLED=true`` still wins. With
    an endpoint but without the ``otel`` extra installed, a warning names what to install.
    """
    global _tracer, _provider
    with _lock:
        if _tracer is not None:
            return True
        if _sdk_disabled(os.environ) or (exporter is None and not enabled()):
            return False
        try:
            _provider = _start_provider(exporter)
        except ImportError as exc:
            _report_missing_packages(exc)
            return False
        _instrument_libraries(_provider)
        _tracer = _provider.get_tracer(INSTRUMENTATION_NAME)
        log.info("OpenTelemetry tracing is on in process %d", os.getpid())
        return True


def shutdown() -> None:
    """Send the spans still queued and stop tracing in this process (a worker's exit)."""
    global _tracer, _provider
    with _lock:
        provider, _provider, _tracer = _provider, None, None
        if provider is None:
            return
        _uninstrument_libraries()
        provider.shutdown()  # flushes the batch processor, then stops its thread


def instrument_app(app: Flask) -> None:
    """Trace ``app``'s requests when tracing is on (``configure``); otherwise nothing at
    all is registered, so the request path does no tracing work."""
    if not configure():
        return
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    FlaskInstrumentor.instrument_app(app, tracer_provider=_provider, enable_commenter=False)
    # After the instrumentation's own before_request (which opens the server span) and
    # after FlaskOBO's (which settles the request id).
    app.before_request(_tag_request_id)


def span(name: str) -> AbstractContextManager[Any]:
    """A child span of the current one named ``name`` around a block; when tracing is off,
    a shared no-op. An exception marks it failed with its type alone (``error.type``):
    exception messages are not recorded."""
    tracer = _tracer
    if tracer is None:
        return _NO_SPAN
    return _recorded(tracer, name)


def acquisition(acquire: Callable[P, tuple[str, str]]) -> Callable[P, tuple[str, str]]:
    """Decorates the token provider's ``_acquire`` (which answers the token and its
    outcome): a ``flask_obo.token.acquire`` span with ``flask_obo.token.source``."""

    @functools.wraps(acquire)
    def traced(*args: P.args, **kwargs: P.kwargs) -> tuple[str, str]:
        tracer = _tracer
        if tracer is None:
            return acquire(*args, **kwargs)
        with _recorded(tracer, ACQUIRE_SPAN) as current:
            token, outcome = acquire(*args, **kwargs)
            current.set_attribute(SOURCE_ATTRIBUTE, SOURCES.get(outcome, outcome))
            return token, outcome

    return traced


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (hex, as trace back-ends show them) to every record
    logged while a span is active; drops nothing. Put it on handlers, as ``RequestIdFilter``.
    JSON logs show the two fields; with tracing off a record gets neither."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _tracer is None or hasattr(record, "trace_id"):
            return True
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = trace.format_trace_id(context.trace_id)
            record.span_id = trace.format_span_id(context.span_id)
        return True


# --- set-up ----------------------------------------------------------------------------------
def _start_provider(exporter: SpanExporter | None) -> TracerProvider:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers, timeout...: from OTEL_EXPORTER_OTLP_*
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    # Not the global provider: an application's own OpenTelemetry set-up stays its own.
    # The sampler is the SDK's, from OTEL_TRACES_SAMPLER (default: parent-based, always on).
    provider = TracerProvider(resource=resource)
    # _ScrubbingExporter is a SpanExporter by shape: the class is defined where the SDK may be absent.
    provider.add_span_processor(BatchSpanProcessor(cast("SpanExporter", _ScrubbingExporter(exporter))))
    return provider


def _instrument_libraries(provider: TracerProvider) -> None:
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    RequestsInstrumentor().instrument(tracer_provider=provider)
    RedisInstrumentor().instrument(tracer_provider=provider)


def _uninstrument_libraries() -> None:
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    RequestsInstrumentor().uninstrument()
    RedisInstrumentor().uninstrument()


def _report_missing_packages(exc: ImportError) -> None:
    global _missing_packages_reported
    if not _missing_packages_reported:
        _missing_packages_reported = True
        log.warning("%s is set but OpenTelemetry is not installed (%s): no traces are exported; "
                    "install flask-obo[otel]", " or ".join(ENDPOINT_VARIABLES), exc.name)


def _tag_request_id() -> None:
    from opentelemetry import trace

    request_id = current_request_id()
    if request_id:
        trace.get_current_span().set_attribute(REQUEST_ID_ATTRIBUTE, request_id)


@contextmanager
def _recorded(tracer: Tracer, name: str) -> Iterator[Span]:
    with tracer.start_as_current_span(name, record_exception=False,
                                      set_status_on_exception=False) as current:
        try:
            yield current
        except BaseException as exc:
            from opentelemetry.trace import Status, StatusCode

            current.set_attribute("error.type", type(exc).__qualname__)
            current.set_status(Status(StatusCode.ERROR))
            raise


# --- scrubbing ---------------------------------------------------------------------------------
_REDACTED = "[redacted]"
_SECRETS = re.compile(
    r"[A-Za-z0-9._%+-]+(?:@|%40)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"  # e-mail, UPN
    r"|eyJ[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*){0,2}"  # JWTs (and a JWT's parts), client_info
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/-]{8,}=*"  # bearer credentials
    r"|gAAAAA[A-Za-z0-9_-]{8,}=*"  # Fernet tokens: sealed cache blobs
)
_QUERY_VALUE = re.compile(r"(?P<name>[?&][^=&#\s]+=)[^&#\s]*")
_STATEMENT_KEYS = frozenset({"db.statement", "db.query.text"})


def scrubbed(key: str, value: Any) -> Any:
    """``value`` of attribute ``key`` fit for export: no query value, e-mail address,
    JWT, bearer credential or Fernet token; Redis statements as command names alone."""
    if isinstance(value, str):
        if key in _STATEMENT_KEYS:  # "SET ? ? ?" (older instrumentations: the arguments)
            return "\n".join(line.split(" ", 1)[0] for line in value.splitlines())
        return _SECRETS.sub(_REDACTED, _QUERY_VALUE.sub(r"\g<name>REDACTED", value))
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        return tuple(scrubbed(key, item) for item in value)
    return value


def _scrubbed_attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {key: scrubbed(key, value) for key, value in (attributes or {}).items()}


class _ScrubbingExporter:
    """The exporter behind the batch processor: each span scrubbed (``scrubbed``), in the
    processor's own thread, never on the request path. No instrumentation offers this
    for every attribute (Flask's sets ``http.target`` after its hook, requests' records
    exception messages with the URL), hence a copy of each span here."""

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._exporter.export([_scrub(one) for one in spans])

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._exporter.force_flush(timeout_millis)


def _scrub(one: ReadableSpan) -> ReadableSpan:
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.trace import Link, Status

    return ReadableSpan(
        name=scrubbed("", one.name),
        context=one.context,
        parent=one.parent,
        resource=one.resource,
        attributes=_scrubbed_attributes(one.attributes),
        events=[Event(event.name, _scrubbed_attributes(event.attributes), event.timestamp)
                for event in one.events],
        links=[Link(link.context, _scrubbed_attributes(link.attributes)) for link in one.links],
        kind=one.kind,
        status=Status(one.status.status_code, scrubbed("", one.status.description or "") or None),
        start_time=one.start_time,
        end_time=one.end_time,
        instrumentation_scope=one.instrumentation_scope,
    )
