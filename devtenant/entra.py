"""Blueprint for the Entra ID v2 endpoints msal touches: discovery, JWKS, token.

(The browser sign-in, ``/authorize`` and ``/logout``, is :mod:`devtenant.signin`.)
Discovery, JWKS and token answer cross-origin requests as Entra does for SPAs
(msal-browser fetches them from the SPA's origin): ``Access-Control-Allow-Origin``
echoes the request's ``Origin``, and preflights get the methods and headers asked for.
CORS is these few headers, hand-written: flask-cors is the API's dependency (the
``server`` extra), not the dev tenant's, and the devtenant image does not install it.

URLs are built from the request's own scheme://host:port (or ``--public-url``), so one
server works as https://localhost:8443 on the host and https://devtenant:8443 inside
docker-compose. Each hosted tenant (home and the second one, see
:meth:`devtenant.directory.Directory.load_all`) is reached by its GUID or domain name;
anything else gets Entra's AADSTS90002 like a mistyped tenant would. ``common`` and
``organizations`` serve discovery with Entra's issuer template
(``https://<host>/{tenantid}/v2.0``) and the shared JWKS; their token endpoint works
for the grants whose tenant the request implies (OBO: the assertion's ``tid``;
refresh: the refresh token's tenant), else AADSTS50059.

v1 discovery (``/<tenant>/.well-known/openid-configuration``, issuer
``<host>/sts/<tid>/``) and the v1 JWKS (``/common/discovery/keys``) exist for APIs
that validate v1 tokens; the keys are the same.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, abort, current_app, g, jsonify, request

from devtenant import errors
from devtenant.authserver import NO_STORE, EntraAuthorizationServer
from devtenant.runtime import base_url, current, issuer, v1_issuer

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
#: Tenant-independent authorities and the endpoints they serve here.
MULTI_TENANT = frozenset({"common", "organizations"})
MULTI_TENANT_ENDPOINTS = frozenset({"entra.openid_configuration", "entra.jwks", "entra.token"})
TENANT_TEMPLATE = "{tenantid}"


def _error(error: errors.EntraError) -> Response:
    body = error.body(base_url(), request.headers.get("client-request-id"))
    response = jsonify(body)
    response.status_code = error.status_code
    response.headers.update(dict(NO_STORE[1:]))
    return response


@bp.url_value_preprocessor
def _check_tenant(endpoint: str | None, values: dict[str, Any] | None) -> None:
    tenant = (values or {}).get("tenant")
    if tenant is None:
        return
    if tenant.lower() in MULTI_TENANT and endpoint in MULTI_TENANT_ENDPOINTS:
        g.devtenant_multi_tenant = tenant.lower()
        return
    directory = current().tenant(tenant)
    if directory is None:
        abort(_error(errors.tenant_not_found(tenant)))
    current().use_tenant(directory.tenant_id)


def _multi_tenant() -> str | None:
    return g.get("devtenant_multi_tenant")


def _implied_tenant() -> str | None:
    """For a token request to common/organizations: the tenant its grant implies."""
    runtime = current()
    form = request.form
    if form.get("requested_token_use") == "on_behalf_of":
        try:
            payload = (form.get("assertion") or "").split(".")[1]
            claims = json.loads(base64_decode(payload))
        except (IndexError, ValueError):
            return None
        tid = claims.get("tid") if isinstance(claims, dict) else None
        return tid if isinstance(tid, str) and runtime.tenant(tid) else None
    if form.get("grant_type") == "refresh_token":
        with runtime._lock:
            record = runtime._refresh.get(form.get("refresh_token") or "")
        return record.tenant_id if record else None
    return None


def base64_decode(segment: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


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
    multi = _multi_tenant()
    tid = multi or current().directory.tenant_id
    iss = f"{base}/{TENANT_TEMPLATE}/v2.0" if multi else issuer()
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
            "issuer": iss,
            "request_uri_parameter_supported": False,
            "authorization_endpoint": f"{base}/{tid}/oauth2/v2.0/authorize",
            "end_session_endpoint": f"{base}/{tid}/oauth2/v2.0/logout",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "claims_supported": CLAIMS_SUPPORTED,
            "tenant_region_scope": None if multi else "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": urlsplit(base).netloc,
            "rbac_url": "https://pas.windows.net",
        }
    )


@bp.get("/<tenant>/discovery/v2.0/keys")
def jwks(tenant: str) -> Response:
    iss = f"{base_url()}/{TENANT_TEMPLATE}/v2.0" if _multi_tenant() else issuer()
    return jsonify(current().keys.jwks(iss))


@bp.get("/<tenant>/.well-known/openid-configuration")
def openid_configuration_v1(tenant: str) -> Response:
    """v1 metadata: what an API validating v1 tokens (``ver: 1.0``) reads."""
    base = base_url()
    tid = current().directory.tenant_id
    return jsonify(
        {
            "token_endpoint": f"{base}/{tid}/oauth2/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post", "private_key_jwt", "client_secret_basic",
            ],
            "jwks_uri": f"{base}/common/discovery/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "token id_token", "token"],
            "scopes_supported": ["openid"],
            "issuer": v1_issuer(),
            "authorization_endpoint": f"{base}/{tid}/oauth2/authorize",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
        }
    )  # fmt: skip


@bp.get("/common/discovery/keys")
def jwks_v1() -> Response:
    keys = current().keys.jwks("")["keys"]
    return jsonify({"keys": [{k: v for k, v in key.items() if k != "issuer"} for key in keys]})


@bp.post("/<tenant>/oauth2/v2.0/token")
def token(tenant: str) -> Response:
    form = request.form
    grant_type = form.get("grant_type")
    kind = GRANT_KINDS.get(grant_type or "", "other")
    if kind == "on_behalf_of" and form.get("requested_token_use") != "on_behalf_of":
        kind = "other"
    if kind == "client_credentials" and current().app_token_delay:
        time.sleep(current().app_token_delay)  # a slow Entra ID, as /_devtenant/app-tokens asks
    server: EntraAuthorizationServer = current_app.extensions["devtenant.authserver"]
    implied = _implied_tenant() if _multi_tenant() else None
    if implied:
        current().use_tenant(implied)
    if not grant_type:
        response = _error(errors.missing_parameter("grant_type"))
    elif _multi_tenant() and not implied:
        response = _error(errors.no_tenant_information())
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
