"""The API's routes: ``/api/*``, every one requiring the API scope (``API_REQUIRED_SCOPE``);
``/api/whoami`` also admits applications (app-only tokens) with the app role
``API_APP_ROLE``, when that is set.

Reading a Graph route top-down is the request path: the protector (``obo.protect``, before
each request) → a token on behalf of the caller (``downstream`` asks ``acquire_token``,
which reads the user's cache) → the Graph call. Only routes that call Graph ever trigger
an On-Behalf-Of exchange; ``DELETE /api/me/token-cache`` (sign-out) forgets the caller's
tokens so that the next one does. Errors propagate: ``FlaskOBO`` answers them as JSON.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, jsonify

from flask_obo import EntraAccessToken, current_token
from flask_obo.errors import ApiError, DownstreamError, DownstreamNotFound

from .extensions import obo

api = Blueprint("api", __name__, url_prefix="/api")
obo.protect(api)  # users only: every route here acts on behalf of the caller

WHOAMI_CLAIMS = ("oid", "tid", "name", "preferred_username", "scp")
USER_FIELDS = ("id", "displayName", "mail", "userPrincipalName", "jobTitle")
# The query every Graph user call sends, encoded once: as a string, requests passes it on
# as it is (a dict is merged and encoded again on every call).
USER_QUERY = urlencode({"$select": ",".join(USER_FIELDS)})


def whoami() -> Response:
    """The caller's identity from the validated token: a user's (``scp``) or, for an
    app-only token, the application's (``app_id``, ``roles``; no user claims). The token
    is taken from the ``current_token`` proxy once: each use of the proxy looks it up again."""
    token: EntraAccessToken = current_token._get_current_object()  # type: ignore[attr-defined]
    claims = {claim: token.get(claim) for claim in WHOAMI_CLAIMS}
    return jsonify({**claims, "roles": list(token.roles) or None, "app_id": token.app_id})


def identity_blueprint(app_role: str | None) -> Blueprint:
    """``GET /api/whoami``: users with the API's scope and, when ``app_role``
    (``API_APP_ROLE``) is set, applications whose app-only token carries that role.
    Built per application, as the role is a setting."""
    identity = Blueprint("identity", __name__, url_prefix="/api")
    guard = obo.require_scope(app_roles=(app_role,) if app_role else ())
    identity.add_url_rule("/whoami", "whoami", guard(whoami), methods=["GET"])
    return identity


@api.get("/me")
def me() -> Response:
    return jsonify(_graph_user("/me"))


@api.get("/me/manager")
def manager() -> Response:
    try:
        return jsonify(_graph_user("/me/manager"))
    except DownstreamNotFound:
        raise ApiError("The signed-in user has no manager.", status=404,
                       error="manager_not_found") from None


@api.delete("/me/token-cache")
def forget_token_cache() -> Response:
    """Sign-out: the caller's cached downstream tokens go, on every worker and instance
    within a second; their next Graph call makes a new On-Behalf-Of exchange."""
    obo.forget_user()
    return Response(status=204)


def _graph_user(path: str) -> dict[str, Any]:
    """A Graph user object as the caller sees it: exactly the standard fields."""
    response = obo.downstream("graph").get(path, params=USER_QUERY)
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise DownstreamError()
    return {name: body.get(name) for name in USER_FIELDS}
