"""The serving benchmark's baseline: ``gunicorn -c config/gunicorn.conf.py bench.bare_app:app``.

A bare Flask app whose ``GET /api/me`` makes the same Graph call as flask-obo's (the same
``GraphClient`` over the same pooled HTTPS session from ``app.http``: ``/me`` with
``$select``), with one fixed Graph token from the environment: no token validation, no
token acquisition, no cache, no Redis. What flask-obo adds on top of this is what
``bench/serving_bench.py`` measures.
"""

from __future__ import annotations

import os

from flask import Flask, Response, jsonify

from app.graph_client import GraphClient
from app.http import build_session

GRAPH_BASE_URL = os.environ["GRAPH_BASE_URL"]
GRAPH_TOKEN = os.environ["BENCH_GRAPH_TOKEN"]

app = Flask(__name__)
app.json.sort_keys = False
graph = GraphClient(GRAPH_BASE_URL, build_session(GRAPH_BASE_URL))


@app.get("/api/me")
def me() -> Response:
    return jsonify(graph.get_user("/me", GRAPH_TOKEN))


@app.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})
