"""The serving benchmark's baseline: ``gunicorn -c config/gunicorn.conf.py bench.bare_app:app``.

What a developer would write instead of flask-obo: a bare Flask app whose ``GET /api/me``
makes the same Graph call as flask-obo's reference API (``/me`` with ``$select``, the
same fields kept) with plain ``requests`` over one pooled keep-alive session, and one
fixed Graph token from the environment: no token validation, no token acquisition, no
cache, no Redis. What flask-obo adds on top of this (and what it saves: its session
reads the outbound environment once, ``flask_obo.http``) is what
``bench/serving_bench.py`` measures.
"""

from __future__ import annotations

import os

import requests
from flask import Flask, Response, abort, jsonify
from requests.adapters import HTTPAdapter

GRAPH_BASE_URL = os.environ["GRAPH_BASE_URL"].rstrip("/")
GRAPH_TOKEN = os.environ["BENCH_GRAPH_TOKEN"]
USER_FIELDS = ("id", "displayName", "mail", "userPrincipalName", "jobTitle")

app = Flask(__name__)
app.json.sort_keys = False  # type: ignore[attr-defined]
graph = requests.Session()
graph.mount("https://", HTTPAdapter(pool_maxsize=32))


@app.get("/api/me")
def me() -> Response:
    response = graph.get(f"{GRAPH_BASE_URL}/me", params={"$select": ",".join(USER_FIELDS)},
                         headers={"Authorization": f"Bearer {GRAPH_TOKEN}",
                                  "Accept": "application/json"},
                         timeout=(3.05, 10.0))
    if response.status_code != 200:
        abort(502)
    body = response.json()
    return jsonify({name: body.get(name) for name in USER_FIELDS})


@app.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})
