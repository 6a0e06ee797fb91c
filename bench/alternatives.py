"""The serving benchmark's "Python alternatives": what a developer would write without
flask-obo, serving the same ``GET /api/me`` (Graph ``/me`` with ``$select``, the same
fields kept) as the reference API, under the same gunicorn config:

    gunicorn -c config/gunicorn.conf.py 'bench.alternatives:azure_identity_app()'
    gunicorn -c config/gunicorn.conf.py 'bench.alternatives:msal_app()'

* ``azure_identity_app``: azure-identity's ``OnBehalfOfCredential`` created for each
  request, its documented use (a credential holds one user assertion). Each request
  pays an On-Behalf-Of exchange: the credential's token cache dies with it.
* ``msal_app``: msal's ``ConfidentialClientApplication`` with a process-local
  ``SerializableTokenCache`` per user, calling ``acquire_token_on_behalf_of`` on each
  request (msal's OBO never reads the cache: a lookup first would need the account, i.e.
  the *verified* identity, or it serves whoever presents a token naming another user's
  ``oid``; see the docs' "silent first" trap). The per-user application is kept, keyed
  by the incoming token's SHA-256, so nothing is trusted from an unverified claim.

Neither validates the caller's token (flask-obo does, on every request): that favours
them. Settings come from the dev tenant's environment (``DevTenant.env()``).
"""

from __future__ import annotations

import hashlib
import os
import threading

import requests
from flask import Flask, Response, abort, jsonify, request
from requests.adapters import HTTPAdapter

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
USER_FIELDS = ("id", "displayName", "mail", "userPrincipalName", "jobTitle")


def _graph_me(session: requests.Session, access_token: str) -> Response:
    base = os.environ["GRAPH_BASE_URL"].rstrip("/")
    response = session.get(f"{base}/me", params={"$select": ",".join(USER_FIELDS)},
                           headers={"Authorization": f"Bearer {access_token}",
                                    "Accept": "application/json"}, timeout=(3.05, 10.0))
    if response.status_code != 200:
        abort(502)
    body = response.json()
    return jsonify({name: body.get(name) for name in USER_FIELDS})


def _bearer() -> str:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        abort(401)
    return header[len("Bearer "):]


def _app() -> tuple[Flask, requests.Session]:
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    session = requests.Session()
    session.mount("https://", HTTPAdapter(pool_maxsize=32))

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    return app, session


def azure_identity_app() -> Flask:
    from azure.identity import OnBehalfOfCredential

    app, session = _app()
    authority = os.environ["AZURE_AUTHORITY_HOST"]  # https://host[:port]

    @app.get("/api/me")
    def me() -> Response:
        credential = OnBehalfOfCredential(
            os.environ["AZURE_TENANT_ID"], os.environ["AZURE_CLIENT_ID"],
            client_secret=os.environ["AZURE_CLIENT_SECRET"], user_assertion=_bearer(),
            authority=authority, disable_instance_discovery=True)
        try:
            access_token = credential.get_token(GRAPH_SCOPE).token
        finally:
            credential.close()
        return _graph_me(session, access_token)

    return app


def msal_app() -> Flask:
    import msal

    app, session = _app()
    applications: dict[str, msal.ConfidentialClientApplication] = {}
    lock = threading.Lock()
    authority = f"{os.environ['AZURE_AUTHORITY_HOST']}/{os.environ['AZURE_TENANT_ID']}"

    def application_for(assertion: str) -> msal.ConfidentialClientApplication:
        key = hashlib.sha256(assertion.encode()).hexdigest()
        with lock:
            found = applications.get(key)
        if found is None:
            found = msal.ConfidentialClientApplication(
                os.environ["AZURE_CLIENT_ID"], client_credential=os.environ["AZURE_CLIENT_SECRET"],
                authority=authority, token_cache=msal.SerializableTokenCache(),
                http_client=session, instance_discovery=False)
            with lock:
                found = applications.setdefault(key, found)
        return found

    @app.get("/api/me")
    def me() -> Response:
        assertion = _bearer()
        result = application_for(assertion).acquire_token_on_behalf_of(assertion, [GRAPH_SCOPE])
        if "access_token" not in result:
            abort(502)
        return _graph_me(session, result["access_token"])

    return app
