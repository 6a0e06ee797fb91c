"""Probes: ``/healthz`` (the process answers; no auth, no I/O) and ``/readyz``.

``/readyz`` answers 200 whenever this process can serve, and says in its body how its
dependencies look (``FlaskOBO.readiness``). It never calls Entra ID, and waits on Redis at
most one socket timeout: taking instances out of rotation because a shared dependency is
down would turn a partial outage into a total one.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from .extensions import obo

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@health.get("/readyz")
def readyz() -> Response:
    return jsonify(status="ready", checks=obo.readiness())
