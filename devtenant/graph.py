"""Blueprint for the Microsoft Graph calls the API makes: ``/me`` and ``/me/manager`` on
behalf of a user, and ``/users/{id | userPrincipalName}``, which app-only tokens (client
credentials, application permission ``User.Read.All``) may read too.

Responses and errors copy Graph's shapes (``@odata.context``, ``$select``,
``InvalidAuthenticationToken`` with a ``WWW-Authenticate`` challenge,
``Request_ResourceNotFound`` for a missing manager) because the API maps them to
its own errors. Tokens are checked as Graph does: signature, audience, lifetime, and
a delegated permission that allows reading the profile. Graph is multi-tenant: a token
of any hosted tenant is accepted and its user looked up in that tenant (``tid``).

Continuous Access Evaluation: once a user's sessions are revoked
(:mod:`devtenant.revocation`), a CAE token (``xms_cc`` has ``cp1``) issued before the
revocation gets 401 with ``error="insufficient_claims"`` and a base64 ``claims``
(``{"access_token":{"nbf":{"essential":true,"value":"<revocation time>"}}}``) in
``WWW-Authenticate``; a non-CAE token keeps working until it expires, as in Entra.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from flask import Blueprint, Response, jsonify, request

from devtenant import GRAPH_APP_ID, GRAPH_RESOURCE
from devtenant.directory import User
from devtenant.runtime import base_url, current
from devtenant.tokens import TokenError

bp = Blueprint("graph", __name__, url_prefix="/v1.0")

GRAPH_AUDIENCES = (GRAPH_RESOURCE, GRAPH_RESOURCE + "/", GRAPH_APP_ID)
READ_PERMISSIONS = frozenset({"User.Read", "User.ReadBasic.All", "User.Read.All"})
#: Graph lets clocks disagree by five minutes before rejecting a token.
CLOCK_SKEW = 300
_TOKEN_MESSAGES = {
    "expired": "Lifetime validation failed, the token is expired.",
    "audience": "Access token validation failure. Invalid audience.",
}


class GraphError(Exception):
    """Raised inside a view; rendered in Graph's ``{"error": {...}}`` shape."""

    def __init__(self, status: int, code: str, message: str, challenge: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.challenge = challenge  # extra WWW-Authenticate parameters


def _request_ids() -> tuple[str, str]:
    return str(uuid.uuid4()), request.headers.get("client-request-id") or str(uuid.uuid4())


@bp.errorhandler(GraphError)
def _render_error(exc: GraphError) -> Response:
    request_id, client_request_id = _request_ids()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    response = jsonify(
        {
            "error": {
                "code": exc.code,
                "message": exc.message,
                "innerError": {
                    "date": date,
                    "request-id": request_id,
                    "client-request-id": client_request_id,
                },
            }
        }
    )
    response.status_code = exc.status
    response.headers["request-id"] = request_id
    response.headers["client-request-id"] = client_request_id
    if exc.status == 401:
        tenant = "common" if exc.challenge else current().directory.tenant_id
        response.headers["WWW-Authenticate"] = (
            f'Bearer realm="", authorization_uri="{base_url()}/{tenant}/oauth2/authorize", '
            f'client_id="{GRAPH_APP_ID}"{exc.challenge}'
        )
    return response


@bp.after_request
def _count(response: Response) -> Response:
    current().counters.count_graph(request.path, response.status_code, request.headers.get("traceparent"))
    return response


def _caller_claims() -> dict[str, Any]:
    """Validate the bearer token (signature, audience, lifetime, revocation); its claims."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
    runtime = current()
    try:
        claims = runtime.minter.verify(
            token.strip(), GRAPH_AUDIENCES, leeway=CLOCK_SKEW, tenants=runtime.tenant_ids
        )
    except TokenError as exc:
        message = _TOKEN_MESSAGES.get(exc.reason, "Access token validation failure.")
        raise GraphError(401, "InvalidAuthenticationToken", message) from exc
    runtime.use_tenant(str(claims["tid"]))
    _check_revocation(claims)
    return claims


def _signed_in_user() -> User:
    """Validate the bearer token and return the user it was issued for."""
    claims = _caller_claims()
    runtime = current()
    if "scp" not in claims:
        raise GraphError(400, "BadRequest", "/me request is only valid with delegated authentication flow.")
    if not READ_PERMISSIONS & set(str(claims["scp"]).split()):
        raise GraphError(
            403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation."
        )
    user = runtime.directory.user(str(claims.get("oid", "")))
    if user is None:
        raise GraphError(
            404,
            "Request_ResourceNotFound",
            f"Resource '{claims.get('oid')}' does not exist or one of its queried "
            "reference-property objects are not present.",
        )
    return user


def _check_revocation(claims: dict[str, Any]) -> None:
    """CAE: a revoked session's CAE tokens get a claims challenge."""
    revocation = current().revocations.get(str(claims.get("oid", "")))
    if revocation is None or not revocation.revokes(float(claims.get("iat", 0))):
        return
    if "cp1" not in [str(c).lower() for c in claims.get("xms_cc", ())]:
        return  # not CAE-capable: the token lives out its (short) lifetime
    raise GraphError(
        401,
        "InvalidAuthenticationToken",
        "Continuous access evaluation resulted in challenge with result: InteractionRequired "
        "and code: TokenIssuedBeforeRevocationTimestamp",
        challenge=f', error="insufficient_claims", claims="{revocation.claims_b64()}"',
    )


def _project(user: User, entity_set: str) -> dict[str, Any]:
    """Apply ``$select`` (case-insensitive, comma-separated) like Graph does."""
    properties = user.profile
    raw = request.args.get("$select", "")
    if not raw.strip():
        selected = list(properties)
        context = f"{base_url()}/v1.0/$metadata#{entity_set}/$entity"
    else:
        by_lower = {name.lower(): name for name in properties}
        selected = []
        for item in (part.strip() for part in raw.split(",")):
            if item.lower() not in by_lower:
                raise GraphError(
                    400,
                    "BadRequest",
                    f"Could not find a property named '{item}' on type 'microsoft.graph.user'.",
                )
            selected.append(by_lower[item.lower()])
        selected = list(dict.fromkeys(selected))
        context = f"{base_url()}/v1.0/$metadata#{entity_set}({','.join(selected)})/$entity"
    return {"@odata.context": context, **{name: properties[name] for name in selected}}


@bp.get("/me")
def me() -> Response:
    return jsonify(_project(_signed_in_user(), "users"))


@bp.get("/me/manager")
def manager() -> Response:
    user = _signed_in_user()
    boss = current().directory.manager_of(user)
    if boss is None:
        raise GraphError(
            404,
            "Request_ResourceNotFound",
            "Resource 'manager' does not exist or one of its queried reference-property "
            "objects are not present.",
        )
    body = _project(boss, "directoryObjects")
    context = body.pop("@odata.context")
    return jsonify({"@odata.context": context, "@odata.type": "#microsoft.graph.user", **body})


@bp.get("/users/<ref>")
def user(ref: str) -> Response:
    """A user by object id or UPN, as an app reads the directory: an app-only token with the
    application permission ``User.Read.All`` (``roles``), or a delegated token with
    ``User.ReadBasic.All`` or ``User.Read.All``."""
    claims = _caller_claims()
    if "scp" in claims:
        allowed = {"User.ReadBasic.All", "User.Read.All"} & set(str(claims["scp"]).split())
    else:
        allowed = {"User.Read.All"} & {str(r) for r in claims.get("roles", ())}
    if not allowed:
        raise GraphError(
            403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation."
        )
    found = current().directory.user(ref)
    if found is None:
        raise GraphError(
            404,
            "Request_ResourceNotFound",
            f"Resource '{ref}' does not exist or one of its queried reference-property objects "
            "are not present.",
        )
    return jsonify(_project(found, "users"))


@bp.route("/<path:rest>", methods=["GET", "POST", "PATCH", "PUT", "DELETE"])
def unsupported(rest: str) -> Response:
    """Graph's answer for segments this fake does not implement."""
    segment = rest.split("/")[-1]
    raise GraphError(400, "BadRequest", f"Resource not found for the segment '{segment}'.")
