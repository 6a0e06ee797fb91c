"""Probes: ``/healthz`` (the process answers; no auth, no I/O) and ``/readyz``
(Redis answers and the authority's OpenID configuration is reachable)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify
from redis.exceptions import RedisError

from .authority import AuthorityUnavailable, OpenIdConfiguration
from .cache_store import TokenCacheStore

log = logging.getLogger(__name__)

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@health.get("/readyz")
def readyz() -> Response | tuple[Response, int, dict[str, str]]:
    store: TokenCacheStore = current_app.extensions["flask-obo.store"]
    metadata: OpenIdConfiguration = current_app.extensions["flask-obo.metadata"]
    failed = []
    try:
        store.ping()
    except RedisError as exc:
        log.warning("readiness: redis ping failed: %s", type(exc).__name__)
        failed.append("redis")
    try:
        metadata.check()
    except AuthorityUnavailable:
        log.warning("readiness: authority metadata unreachable")
        failed.append("authority")
    if failed:
        return (
            jsonify(
                status="unavailable",
                failed=failed,
                error="not_ready",
                error_description="Not ready: " + ", ".join(failed) + " unreachable.",
            ),
            503,
            {"Retry-After": "5"},
        )
    return jsonify(status="ready", checks=["redis", "authority"])
