"""An OTLP/HTTP trace receiver on loopback: what an OpenTelemetry collector would receive.

It accepts ``POST /v1/traces`` (protobuf, gzip or not), decodes each
``ExportTraceServiceRequest`` with ``opentelemetry-proto`` and keeps its spans, flattened
with their resource's attributes, for the test to read.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

from tests.support.servers import wait_until

KINDS = {ProtoSpan.SPAN_KIND_SERVER: "server", ProtoSpan.SPAN_KIND_CLIENT: "client",
         ProtoSpan.SPAN_KIND_INTERNAL: "internal", ProtoSpan.SPAN_KIND_PRODUCER: "producer",
         ProtoSpan.SPAN_KIND_CONSUMER: "consumer"}


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # hex, as in traceparent
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    kind: str  # server, client, internal...
    attributes: dict[str, Any]
    status_code: int
    status_message: str
    events: tuple[tuple[str, dict[str, Any]], ...]
    resource: dict[str, Any]

    def strings(self) -> list[str]:
        """Every text of the span that left the API: name, attributes, events, status."""
        texts = [self.name, self.status_message]
        for attributes in (self.attributes, self.resource, *(attrs for _, attrs in self.events)):
            for key, value in attributes.items():
                texts.append(key)
                texts.extend(value if isinstance(value, list) else [value])
        texts.extend(name for name, _ in self.events)
        return [str(text) for text in texts]


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which) if which else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass
class OtlpReceiver:
    url: str  # what OTEL_EXPORTER_OTLP_ENDPOINT should be
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self, body: bytes) -> None:
        message = ExportTraceServiceRequest.FromString(body)
        batch = []
        for resource_spans in message.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    batch.append(ReceivedSpan(
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(), name=span.name,
                        kind=KINDS.get(span.kind, str(span.kind)), attributes=_attributes(span.attributes),
                        status_code=span.status.code, status_message=span.status.message,
                        events=tuple((event.name, _attributes(event.attributes)) for event in span.events),
                        resource=resource))
        with self._lock:
            self.requests += 1
            self.spans.extend(batch)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def wait_for(self, trace_id: str, *names: str, timeout: float = 20.0) -> list[ReceivedSpan]:
        """The trace's spans once spans with each of ``names`` have arrived (bounded wait)."""
        wait_until(lambda: {*names} <= {span.name for span in self.trace(trace_id)}, timeout=timeout,
                   what=f"spans {names} of trace {trace_id}")
        return self.trace(trace_id)


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """An OTLP/HTTP receiver on a free loopback port, stopped afterwards."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    receiver = OtlpReceiver(f"http://127.0.0.1:{server.server_address[1]}")
    server.receiver = receiver  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        self.server.receiver.received(body)  # type: ignore[attr-defined]
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return None
