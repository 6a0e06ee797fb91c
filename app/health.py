"""Probes: ``/healthz`` (the process answers; no auth, no I/O) and ``/readyz``.

``/readyz`` answers 200 whenever this process can serve, and says in its body how its
dependencies look: ``redis`` is ``ok`` or ``degraded`` (down or its circuit open: users
are served from memory and Entra ID meanwhile), or ``not_configured``; ``authority`` is
``ok``, ``stale`` (signing keys kept past their refresh time while Entra ID is down) or
``unavailable`` (none loaded yet). It never calls Entra ID, and waits on Redis at most
one socket timeout: taking instances out of rotation because a shared dependency is
down would turn a partial outage into a total one.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from .authority import SigningKeys
from .cache_store import RedisTokenCacheStore, TokenCacheStore

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@health.get("/readyz")
def readyz() -> Response:
    store: TokenCacheStore = current_app.extensions["flask-obo.store"]
    keys: SigningKeys = current_app.extensions["flask-obo.keys"]
    redis = store.status() if isinstance(store, RedisTokenCacheStore) else "not_configured"
    return jsonify(status="ready", checks={"redis": redis, "authority": keys.status()})
