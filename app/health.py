"""Probes: ``/healthz`` (the process answers; no auth, no I/O) and ``/readyz``.

``/readyz`` answers 200 whenever this process can serve, and says in its body how its
dependencies look (``FlaskOBO.readiness``). It never calls Entra ID, and waits on Redis at
most one socket timeout: taking instances out of rotation because a shared dependency is
down would turn a partial outage into a total one.

A misconfiguration of Entra ID is another matter: a wrong tenant, an unknown client id, a
rejected credential or an untrusted CA fails every call to a downstream API, on every
instance, until someone changes a setting. Then ``/readyz`` answers 503 with ``status:
misconfigured`` and, in ``reasons``, the reason code (``AADSTS90002``, ``untrusted_ca``...),
so a rollout whose new instances come up misconfigured stops there instead of replacing
the good ones. A refused Redis password is named the same way (``redis: misconfigured``
and its reason) but keeps 200: users are served from memory and Entra ID meanwhile, as
in a Redis outage.
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
    checks = obo.readiness()
    reasons = obo.misconfiguration()
    if not reasons:
        return jsonify(status="ready", checks=checks)
    if set(reasons) <= {"redis"}:  # served from memory meanwhile: still ready
        return jsonify(status="ready", checks=checks, reasons=reasons)
    response = jsonify(status="misconfigured", checks=checks, reasons=reasons)
    response.status_code = 503
    return response
