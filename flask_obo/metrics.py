"""Prometheus metrics: one ``Metrics`` per application, on a registry of its own.

``FlaskOBO.init_app`` builds it and hands it to the parts that count (the token provider,
msal's HTTP client, each downstream API, the Redis store), so several applications in
one process (an app factory called by each test) never share a counter, and nothing is
registered at import time.

Under gunicorn the workers are separate processes: prometheus_client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set by ``config/gunicorn.conf.py`` before anything imports
prometheus_client) has each worker write its values to files in that directory, and
``/metrics`` then sums every worker's files, those of dead workers included, so counters
add up whichever worker answers the scrape. Without that variable a process serves its
own registry.

The names and labels are a contract (dashboards rely on them): docs/reference/metrics.md is
generated from this module, docs/how-to/metrics-and-logs.md explains them.
"""

from __future__ import annotations

import logging
import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import values as _values
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

#: How an acquisition was served (``flask_obo_token_acquisitions_total{outcome}``).
MEMORY_HIT = "memory_hit"  # the in-process tier with no I/O (a single-flight follower too)
CACHE_HIT = "cache_hit"  # the user's entry re-read from Redis, no token request
REFRESH = "refresh"  # msal redeemed the refresh token
OBO = "obo"  # an On-Behalf-Of exchange
FAILED = "failed"  # raised: the request got an error
OUTCOMES = (MEMORY_HIT, CACHE_HIT, REFRESH, OBO, FAILED)

#: ``grant_type`` values named otherwise in ``flask_obo_token_endpoint_requests_total{grant}``.
GRANT_LABELS = {"urn:ietf:params:oauth:grant-type:jwt-bearer": "obo"}
UNMATCHED_ROUTE = "unmatched"  # requests no URL rule matched (404, 405)
NO_ANSWER = "error"  # the status label when no HTTP answer came (timeout, connection error)

# Seconds. Token endpoint and downstream calls take tens of ms to the timeouts (~10 s);
# a warm request is about a millisecond; lock waits are mostly zero.
_NETWORK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LOCK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """One application's metrics and how they are exposed.

    The request path only increments: children of labelled metrics are looked up once
    per label set and kept, so a warm request costs a dictionary lookup and a few
    increments (see docs/how-to/metrics-and-logs.md for the measured cost).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.token_acquisitions = Counter(
            "flask_obo_token_acquisitions", "Downstream-token acquisitions, by how each was served.",
            ["outcome"], registry=registry)
        self.token_endpoint_requests = Counter(
            "flask_obo_token_endpoint_requests", "Requests to the token endpoint (Entra ID), by grant "
            "and HTTP status ('error': no answer).", ["grant", "status"], registry=registry)
        self.token_endpoint_seconds = Histogram(
            "flask_obo_token_endpoint_seconds", "Duration of requests to the token endpoint.",
            buckets=_NETWORK_BUCKETS, registry=registry)
        self.downstream_requests = Counter(
            "flask_obo_downstream_requests", "Requests to downstream APIs, by API and HTTP status "
            "('error': no answer).", ["api", "status"], registry=registry)
        self.downstream_seconds = Histogram(
            "flask_obo_downstream_seconds", "Duration of requests to downstream APIs.",
            buckets=_NETWORK_BUCKETS, registry=registry)
        self.cache_errors = Counter(
            "flask_obo_cache_errors", "Failed Redis operations of the token cache, by operation.",
            ["operation"], registry=registry)
        self.lock_wait_seconds = Histogram(
            "flask_obo_lock_wait_seconds", "Time waiting for a user's token-cache lock before a "
            "token request.", buckets=_LOCK_BUCKETS, registry=registry)
        self.requests = Counter(
            "flask_obo_requests", "Requests served, by route template and HTTP status.",
            ["route", "status"], registry=registry)
        self.request_seconds = Histogram(
            "flask_obo_request_seconds", "Duration of requests served.", buckets=_REQUEST_BUCKETS,
            registry=registry)
        self._outcomes = {outcome: self.token_acquisitions.labels(outcome) for outcome in OUTCOMES}
        self._children: dict[tuple[object, ...], Counter] = {}
        self.multiprocess_dir = _multiprocess_dir()

    # --- counting -------------------------------------------------------------------------
    def acquisition(self, outcome: str) -> None:
        self._outcomes[outcome].inc()

    def token_endpoint(self, grant_type: str | None, status: int | str, started: float) -> None:
        """One request to the token endpoint that began at ``started`` (``time.perf_counter()``)."""
        self.token_endpoint_seconds.observe(time.perf_counter() - started)
        self._child(self.token_endpoint_requests, "t", grant_label(grant_type), str(status)).inc()

    def downstream(self, api: str, status: int | str, started: float) -> None:
        self.downstream_seconds.observe(time.perf_counter() - started)
        self._child(self.downstream_requests, "d", api, str(status)).inc()

    def cache_error(self, operation: str) -> None:
        self._child(self.cache_errors, "c", operation).inc()

    def lock_wait(self, seconds: float) -> None:
        self.lock_wait_seconds.observe(seconds)

    def request(self, route: str | None, status: int, seconds: float | None) -> None:
        if seconds is not None:
            self.request_seconds.observe(seconds)
        self._child(self.requests, "r", route or UNMATCHED_ROUTE, status).inc()

    def _child(self, counter: Counter, kind: str, *labels: object) -> Counter:
        key = (kind, *labels)
        child = self._children.get(key)
        if child is None:  # labels() takes a lock and validates: once per label set
            child = self._children[key] = counter.labels(*(str(label) for label in labels))
        return child

    # --- exposing -------------------------------------------------------------------------
    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type: every worker's values in multiprocess
        mode (a fresh registry reading the directory), else this application's own."""
        if self.multiprocess_dir is not None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def grant_label(grant_type: str | None) -> str:
    """``obo`` for the jwt-bearer grant, else the grant type's own name."""
    if not grant_type:
        return "unknown"
    return GRANT_LABELS.get(grant_type, grant_type.rsplit(":", 1)[-1])


def _multiprocess_dir() -> str | None:
    """The directory of multiprocess mode, if this process runs in it.

    prometheus_client picks its mode once, when first imported: a variable set later
    would make ``/metrics`` read a directory no worker writes to, so it is ignored then.
    """
    path = os.environ.get(MULTIPROC_DIR_VARIABLE)
    if not path:
        return None
    if not getattr(_values.ValueClass, "_multiprocess", False):
        log.warning("%s was set after prometheus_client was imported: /metrics serves this "
                    "process's own metrics only", MULTIPROC_DIR_VARIABLE)
        return None
    return path
