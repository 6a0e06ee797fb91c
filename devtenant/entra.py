"""Blueprint for the Entra ID v2 endpoints msal touches: discovery, JWKS, token.

(The browser sign-in, ``/authorize`` and ``/logout``, is :mod:`devtenant.signin`.)
Discovery, JWKS and token answer cross-origin requests as Entra does for SPAs
(msal-browser fetches them from the SPA's origin): ``Access-Control-Allow-Origin``
echoes the request's ``Origin``, and preflights get the methods and headers asked for.
CORS is these few headers, hand-written: flask-cors is the API's dependency (the
``server`` extra), not the dev tenant's, and the devtenant image does not install it.

URLs are built from the request's own scheme://host:port (or ``--public-url``), so one
server works as https://localhost:8443 on the host and https://devtenant:8443 inside
docker-compose. Only the tenant GUID and its domain name are accepted; anything else
gets Entra's AADSTS90002 like a mistyped tenant would.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, abort, current_app, jsonify, request

from devtenant import errors
from devtenant.authserver import NO_STORE, EntraAuthorizationServer
from devtenant.runtime import base_url, current, issuer

bp = Blueprint("entra", __name__)

#: Counter name per grant_type (OBO shares the JWT-bearer grant_type).
GRANT_KINDS = {
    "authorization_code": "authorization_code",
    "urn:ietf:params:oauth:grant-type:jwt-bearer": "on_behalf_of",
    "refresh_token": "refresh_token",
    "client_credentials": "client_credentials",
}

CLAIMS_SUPPORTED = [
    "sub", "iss", "cloud_instance_name", "cloud_instance_host_name", "cloud_graph_host_name",
    "msgraph_host", "aud", "exp", "iat", "auth_time", "acr", "nonce", "preferred_username",
    "name", "tid", "ver", "at_hash", "c_hash", "email",
]  # fmt: skip


#: Endpoints msal-browser calls with fetch() from the SPA's origin.
CORS_ENDPOINTS = frozenset({"entra.openid_configuration", "entra.jwks", "entra.token"})


def _error(error: errors.EntraError) -> Response:
    body = error.body(base_url(), request.headers.get("client-request-id"))
    response = jsonify(body)
    response.status_code = error.status_code
    response.headers.update(dict(NO_STORE[1:]))
    return response


@bp.url_value_preprocessor
def _check_tenant(endpoint: str | None, values: dict[str, Any] | None) -> None:
    tenant = (values or {}).get("tenant")
    if tenant is not None and not current().directory.is_tenant(tenant):
        abort(_error(errors.tenant_not_found(tenant)))


@bp.after_request
def _cors(response: Response) -> Response:
    origin = request.headers.get("Origin")
    if request.endpoint not in CORS_ENDPOINTS or not origin:
        return response
    response.headers["Access-Control-Allow-Origin"] = origin
    response.vary.add("Origin")
    if request.method == "OPTIONS":  # preflight (Flask answers OPTIONS itself)
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        asked = request.headers.get("Access-Control-Request-Headers")
        if asked:
            response.headers["Access-Control-Allow-Headers"] = asked
        response.headers["Access-Control-Max-Age"] = "86400"
    return response


@bp.get("/<tenant>/v2.0/.well-known/openid-configuration")
def openid_configuration(tenant: str) -> Response:
    base = base_url()
    tid = current().directory.tenant_id
    return jsonify(
        {
            "token_endpoint": f"{base}/{tid}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{base}/{tid}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": issuer(),
            "request_uri_parameter_supported": False,
            "authorization_endpoint": f"{base}/{tid}/oauth2/v2.0/authorize",
            "end_session_endpoint": f"{base}/{tid}/oauth2/v2.0/logout",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "claims_supported": CLAIMS_SUPPORTED,
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": urlsplit(base).netloc,
            "rbac_url": "https://pas.windows.net",
        }
    )


@bp.get("/<tenant>/discovery/v2.0/keys")
def jwks(tenant: str) -> Response:
    return jsonify(current().keys.jwks(issuer()))


@bp.post("/<tenant>/oauth2/v2.0/token")
def token(tenant: str) -> Response:
    form = request.form
    grant_type = form.get("grant_type")
    kind = GRANT_KINDS.get(grant_type or "", "other")
    if kind == "on_behalf_of" and form.get("requested_token_use") != "on_behalf_of":
        kind = "other"
    server: EntraAuthorizationServer = current_app.extensions["devtenant.authserver"]
    if not grant_type:
        response = _error(errors.missing_parameter("grant_type"))
    else:
        response = server.create_token_response()
    error = None
    if response.status_code >= 400:
        error = (response.get_json(silent=True) or {}).get("error", "unknown")
    current().counters.count_token(kind, error)
    correlation = request.headers.get("client-request-id")
    if correlation:
        response.headers["client-request-id"] = correlation
    return response
