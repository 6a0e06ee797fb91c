"""The serving benchmark's baseline: ``gunicorn -c config/gunicorn.conf.py bench.bare_app:app``.

A bare Flask app whose ``GET /api/me`` makes the same Graph call as flask-obo's reference
API (the same ``DownstreamApi`` over the same pooled HTTPS session: ``/me`` with
``$select``, the same fields kept), with one fixed Graph token from the environment: no
token validation, no token acquisition, no cache, no Redis. What flask-obo adds on top
of this is what ``bench/serving_bench.py`` measures.
"""

from __future__ import annotations

import os

from flask import Flask, Response, jsonify

from flask_obo import DownstreamApi, DownstreamApiSettings
from flask_obo.http import build_session

GRAPH_BASE_URL = os.environ["GRAPH_BASE_URL"]
GRAPH_TOKEN = os.environ["BENCH_GRAPH_TOKEN"]
USER_FIELDS = ("id", "displayName", "mail", "userPrincipalName", "jobTitle")

app = Flask(__name__)
app.json.sort_keys = False  # type: ignore[attr-defined]
graph = DownstreamApi(
    "graph",
    DownstreamApiSettings(GRAPH_BASE_URL, ("https://graph.microsoft.com/.default",)),
    build_session([GRAPH_BASE_URL]),
    tokens=lambda scopes, claims: GRAPH_TOKEN,
)


@app.get("/api/me")
def me() -> Response:
    body = graph.get("/me", params={"$select": ",".join(USER_FIELDS)}).json()
    return jsonify({name: body.get(name) for name in USER_FIELDS})


@app.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})
