"""The reference API plus a few routes for daemons, for the app-role and app-token tests
under gunicorn (``gunicorn(env, target="tests.support.daemon_api:app")``). Built from
flask_obo's public API only, as a user's own API would be.

* ``GET /daemon/users/<id>``: apps with the dev tenant's ``access_as_application`` role;
  reads the user from Graph *as the app* (``downstream("graph", as_app=True)``).
* ``GET /daemon/me``: users with the API's scope, or apps with the role; calls Graph on
  behalf of the caller, which an app-only token cannot.
* ``GET /daemon/app-token?resource=<resource>``: apps with the role; acquires the API's
  app token for ``<resource>/.default`` and says which one it got (its ``exp`` and a
  short digest, never the token).

Each answer names the worker that served it (``pid``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os

from flask import Blueprint, jsonify, request

from app import create_app
from app.extensions import obo
from devtenant import API_APP_ROLE

daemon = Blueprint("daemon", __name__, url_prefix="/daemon")


@daemon.get("/users/<user_id>")
@obo.require_app_role(API_APP_ROLE)
def user(user_id: str):
    graph = obo.downstream("graph", as_app=True)
    body = graph.get(f"/users/{user_id}", params={"$select": "displayName"}).json()
    return jsonify(displayName=body.get("displayName"), pid=os.getpid())


@daemon.get("/me")
@obo.require_scope(app_roles=[API_APP_ROLE])
def me():
    body = obo.downstream("graph").get("/me").json()
    return jsonify(displayName=body.get("displayName"), pid=os.getpid())


@daemon.get("/app-token")
@obo.require_app_role(API_APP_ROLE)
def app_token():
    token = obo.acquire_app_token([f"{request.args['resource']}/.default"])
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return jsonify(exp=claims["exp"], digest=hashlib.sha256(token.encode()).hexdigest()[:12],
                   pid=os.getpid())


app = create_app()
app.register_blueprint(daemon)
