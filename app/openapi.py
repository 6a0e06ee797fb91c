"""``GET /openapi.json``: the reference API described, as an OpenAPI 3.1 document.

The document is kept here, beside the routes, and filled at request time from the current
application's settings (``obo.settings``): the OAuth2 authorization-code flow points at the
configured authority (``AZURE_AUTHORITY_HOST``/tenant) and names the API's scope
(``<App ID URI>/<API_REQUIRED_SCOPE>``). The ``error`` codes come from the code itself
(``flask_obo.errors.error_codes()`` plus the few this API raises on its own), by status.

Every route of the application is described (a unit test walks ``app.url_map``), except
the operational endpoints in ``UNDESCRIBED_PATHS``: ``/metrics`` is Prometheus text for
the monitoring system, not part of the API, so it stays out of the document. Any path not
described answers 404 and any method a path does not take answers 405 with ``Allow``,
both with the JSON error body (``components.responses``).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from flask_obo import Settings
from flask_obo.errors import REALM, error_codes

from .extensions import obo
from .routes import USER_FIELDS, WHOAMI_CLAIMS

openapi = Blueprint("openapi", __name__)

API_VERSION = "1.0.0"
# Operational endpoints, not API: never in the document (the Prometheus scrape).
UNDESCRIBED_PATHS = frozenset({"/metrics"})
# The codes the reference API answers with itself, beyond flask_obo's vocabulary.
APP_ERROR_CODES: dict[int, frozenset[str]] = {404: frozenset({"manager_not_found"})}
SECURITY_SCHEME = "entra"

JsonObject = dict[str, Any]


@openapi.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(openapi_document(obo.settings))


def all_error_codes() -> dict[int, frozenset[str]]:
    """Every ``error`` code the API can answer with, by HTTP status."""
    codes = dict(error_codes())
    for status, names in APP_ERROR_CODES.items():
        codes[status] = codes.get(status, frozenset()) | names
    return dict(sorted(codes.items()))


def api_scope(settings: Settings) -> str:
    return f"{settings.app_id_uri}/{settings.required_scope}"


def app_scope(settings: Settings) -> str:
    """What a daemon asks Entra ID for to call this API (client credentials)."""
    return f"{settings.app_id_uri}/.default"


def openapi_document(settings: Settings) -> JsonObject:
    """The OpenAPI 3.1 document for an application with these settings."""
    scope = api_scope(settings)
    protected = [{SECURITY_SCHEME: [scope]}]
    # /api/whoami: a user's token, or (API_APP_ROLE set) an application's with that role.
    role = settings.api_app_role
    whoami_security = [*protected, {SECURITY_SCHEME: [app_scope(settings)]}] if role else protected
    flows: JsonObject = {"authorizationCode": {
        "authorizationUrl": f"{settings.authority}/oauth2/v2.0/authorize",
        "tokenUrl": f"{settings.authority}/oauth2/v2.0/token",
        "scopes": {scope: "Call the API as the signed-in user."},
    }}
    if role:
        flows["clientCredentials"] = {
            "tokenUrl": f"{settings.authority}/oauth2/v2.0/token",
            "scopes": {app_scope(settings): f"Call the API as an application (app role `{role}`)."},
        }
    # Any request may be malformed, oversized or use a method the path does not take.
    generic = ["400", "405", "413", "414", "431", "500"]
    protected_errors = [*generic, "401", "403", "503"]
    graph_errors = [*protected_errors, "404", "502", "504"]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "flask-obo reference API",
            "version": API_VERSION,
            "description": (
                "The reference API of flask-obo: it validates Microsoft Entra ID access tokens "
                "and calls Microsoft Graph on behalf of the signed-in user (On-Behalf-Of). "
                "Every error is JSON `{error, error_description}`; a 401 carries a "
                "`WWW-Authenticate: Bearer` challenge and a 503 a `Retry-After`. A path not "
                "described here answers 404 (`not_found`); a method a path does not take "
                "answers 405 (`method_not_allowed`) with `Allow`."
            ),
        },
        "paths": {
            "/api/whoami": {"get": _operation(
                "whoami", "The caller's identity, read from the validated access token: a user's "
                "(with the API's scope) or an application's (an app-only token with the app role "
                + (f"`{role}`)." if role else "named by `API_APP_ROLE`; unset here: refused)."),
                whoami_security, {"200": _json("The validated token's claims.", "Whoami")},
                protected_errors,
            )},
            "/api/me": {"get": _operation(
                "me", "The signed-in user, from Microsoft Graph on behalf of the caller.",
                protected, {"200": _json("The signed-in user.", "User")}, graph_errors,
            )},
            "/api/me/manager": {"get": _operation(
                "manager", "The signed-in user's manager, from Microsoft Graph. 404 "
                "`manager_not_found` when the user has none.",
                protected, {"200": _json("The signed-in user's manager.", "User")}, graph_errors,
            )},
            "/api/me/token-cache": {"delete": _operation(
                "forgetTokens", "Forget the tokens cached on behalf of the caller (sign-out).",
                protected, {"204": {"description": "The caller's cached tokens are gone."}},
                protected_errors,
            )},
            "/healthz": {"get": _operation(
                "healthz", "Liveness: the process answers. No authentication, no I/O.",
                [], {"200": _json("The process is alive.", "Health")},
                generic,
            )},
            "/readyz": {"get": _operation(
                "readyz", "Readiness: 200 whenever this process can serve; the body says how "
                "its dependencies look. 503 when Entra ID refuses this API's settings (a wrong "
                "tenant, an unknown client id, a rejected credential, an untrusted CA): "
                "`reasons` names the cause. Redis refusing its password or user is named in "
                "`reasons` too, with 200: users are served from memory meanwhile. Never waits "
                "on Entra ID.",
                [], {"200": _json("The process can serve.", "Readiness"),
                     "503": _json("The API is misconfigured: see `reasons`.", "Readiness")},
                generic,
            )},
            "/openapi.json": {"get": _operation(
                "openapi", "This document.",
                [], {"200": _json("The OpenAPI document.", "OpenApiDocument")},
                generic,
            )},
        },
        "components": {
            "securitySchemes": {SECURITY_SCHEME: {
                "type": "oauth2",
                "description": (
                    "A Microsoft Entra ID access token for this API, sent as "
                    "`Authorization: Bearer <token>`."
                ),
                "flows": flows,
            }},
            "schemas": _schemas(),
            "responses": _error_responses(),
        },
    }


def _operation(operation_id: str, summary: str, security: list[JsonObject],
               answers: JsonObject, errors: list[str]) -> JsonObject:
    responses = {**answers, **{status: {"$ref": f"#/components/responses/{_RESPONSE_NAMES[status]}"}
                                for status in sorted(errors)}}
    return {"operationId": operation_id, "summary": summary, "security": security,
            "responses": responses}


def _json(description: str, schema: str) -> JsonObject:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _nullable_string() -> JsonObject:
    return {"type": ["string", "null"]}


def _schemas() -> JsonObject:
    codes = sorted({code for names in all_error_codes().values() for code in names})
    return {
        "User": {
            "type": "object",
            "description": "A Microsoft Graph user: exactly these standard fields.",
            "properties": {field: _nullable_string() for field in USER_FIELDS},
            "required": list(USER_FIELDS),
            "additionalProperties": False,
        },
        "Whoami": {
            "type": "object",
            "description": "Claims of the validated access token (null when absent): a user's "
                           "(`scp`), or an application's (`app_id`, `roles`, no user claims).",
            "properties": {
                **{claim: ({"type": "string", "format": "uuid"} if claim in ("oid", "tid")
                           else _nullable_string())
                   for claim in WHOAMI_CLAIMS},
                "roles": {"type": ["array", "null"], "items": {"type": "string"},
                          "description": "The token's app roles."},
                "app_id": {**_nullable_string(),
                           "description": "The client application (`azp`, or `appid` in v1)."},
            },
            "required": [*WHOAMI_CLAIMS, "roles", "app_id"],
            "additionalProperties": False,
        },
        "Health": {
            "type": "object",
            "properties": {"status": {"const": "ok"}},
            "required": ["status"],
            "additionalProperties": False,
        },
        "Readiness": {
            "type": "object",
            "properties": {
                "status": {"enum": ["ready", "misconfigured"]},
                "checks": {
                    "type": "object",
                    "properties": {
                        "redis": {"enum": ["ok", "degraded", "misconfigured", "not_configured"],
                                  "description": "degraded: Redis is down or its circuit open; users "
                                                 "are served from memory and Entra ID meanwhile; "
                                                 "misconfigured: it refuses the password or user "
                                                 "(served from memory meanwhile too)."},
                        "authority": {"enum": ["ok", "stale", "unavailable", "misconfigured"],
                                      "description": "stale: signing keys kept past their refresh "
                                                     "time while Entra ID is down; unavailable: none "
                                                     "loaded yet; misconfigured: a wrong tenant or "
                                                     "an untrusted CA."},
                        "credential": {"const": "rejected",
                                       "description": "present only when Entra ID refuses the API's "
                                                      "own credential or client id."},
                    },
                    "required": ["redis", "authority"],
                    "additionalProperties": False,
                },
                "reasons": {
                    "type": "object",
                    "description": "Per misconfigured component, the reason code: AADSTS90002, "
                                   "AADSTS7000215, untrusted_ca, redis_auth...",
                    "additionalProperties": {"type": "string"},
                },
            },
            "required": ["status", "checks"],
            "additionalProperties": False,
        },
        "OpenApiDocument": {
            "type": "object",
            "properties": {"openapi": {"type": "string", "pattern": r"^3\.1\."}},
            "required": ["openapi", "info", "paths"],
        },
        "Error": {
            "type": "object",
            "description": "Every error the API answers with. Descriptions are fixed strings, "
                           "never text from a token, Entra ID or a downstream API.",
            "properties": {
                "error": {"type": "string", "enum": codes},
                "error_description": {"type": "string", "minLength": 1},
                "claims": {"type": "string", "contentEncoding": "base64",
                           "description": "With `insufficient_claims` only: the claims challenge "
                                          "(as in `WWW-Authenticate`) to sign in again with."},
            },
            "required": ["error", "error_description"],
            "additionalProperties": False,
        },
    }


def _headers() -> JsonObject:
    return {
        "WWW-Authenticate": {
            "description": f'An RFC 6750 challenge: `Bearer realm="{REALM}"`, with `error`, '
                           "`error_description`, `scope` or `claims` as the case may be.",
            "schema": {"type": "string", "pattern": f'^Bearer realm="{REALM}"'},
        },
        "Retry-After": {
            "description": "Seconds to wait before retrying.",
            "schema": {"type": "integer", "minimum": 1},
        },
        "Allow": {
            "description": "The methods the path takes.",
            "schema": {"type": "string", "minLength": 1},
        },
    }


# status -> (component name, description, headers: {name: required})
_ERROR_RESPONSES: dict[str, tuple[str, str, dict[str, bool]]] = {
    "400": ("BadRequest", "A malformed request (gunicorn's answer to one is this JSON too).", {}),
    "401": ("Unauthorized", "No bearer token, an invalid or expired one, or Entra ID wants the user "
                            "to sign in again (`insufficient_claims` carries the claims to sign in "
                            "with).", {"WWW-Authenticate": True}),
    "403": ("Forbidden", "The token lacks the API's scope or the route's app role "
                         "(`insufficient_scope`, with a `WWW-Authenticate` challenge), is an "
                         "app-only token on a route that acts on behalf of a user "
                         "(`user_token_required`, with a challenge), or an administrator must "
                         "consent (`consent_required`).", {"WWW-Authenticate": False}),
    "404": ("NotFound", "No such path (`not_found`), the downstream API has no such resource "
                        "(`not_found`), or the user has no manager (`manager_not_found`).", {}),
    "405": ("MethodNotAllowed", "The path does not take this method; `Allow` lists those it does.",
            {"Allow": True}),
    "413": ("PayloadTooLarge", "A body over 64 KB.", {}),
    "414": ("UriTooLong", "A request line over the server's limit.", {}),
    "431": ("HeadersTooLarge", "A request header, or all of them, over the server's limits.", {}),
    "500": ("ServerError", "An unexpected failure (logged with its type and stack).", {}),
    "502": ("BadGateway", "Entra ID refused the exchange (`token_acquisition_failed`) or the "
                          "downstream API failed (`downstream_error`).", {}),
    "503": ("ServiceUnavailable", "Entra ID, Redis or the downstream API is unavailable or "
                                  "throttling; retry after `Retry-After` seconds.",
            {"Retry-After": True}),
    "504": ("GatewayTimeout", "The downstream API did not answer in time.", {}),
}
_RESPONSE_NAMES = {status: name for status, (name, _, _) in _ERROR_RESPONSES.items()}


def _error_responses() -> JsonObject:
    codes = all_error_codes()
    responses: JsonObject = {}
    for status, (name, description, headers) in _ERROR_RESPONSES.items():
        schema: JsonObject = {"$ref": "#/components/schemas/Error"}
        if names := codes.get(int(status)):
            schema = {"allOf": [schema, {"properties": {"error": {"enum": sorted(names)}}}]}
        responses[name] = {
            "description": description,
            "headers": {header: {**_headers()[header], "required": required}
                        for header, required in headers.items()},
            "content": {"application/json": {"schema": schema}},
        }
    return responses
