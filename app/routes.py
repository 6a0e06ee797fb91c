"""The API's routes: ``/api/*``, every one requiring the API scope (``API_REQUIRED_SCOPE``).

Reading a Graph route top-down is the request path: the protector (``obo.protect``, before
each request) → a token on behalf of the caller (``downstream`` asks ``acquire_token``,
which reads the user's cache) → the Graph call. Only routes that call Graph ever trigger
an On-Behalf-Of exchange; ``DELETE /api/me/token-cache`` (sign-out) forgets the caller's
tokens so that the next one does. Errors propagate: ``FlaskOBO`` answers them as JSON.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from flask_obo import current_token
from flask_obo.errors import ApiError, DownstreamError, DownstreamNotFound

from .extensions import obo

api = Blueprint("api", __name__, url_prefix="/api")
obo.protect(api)

WHOAMI_CLAIMS = ("oid", "tid", "name", "preferred_username", "scp")
USER_FIELDS = ("id", "displayName", "mail", "userPrincipalName", "jobTitle")


@api.get("/whoami")
def whoami() -> Response:
    return jsonify({claim: current_token.get(claim) for claim in WHOAMI_CLAIMS})


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
    response = obo.downstream("graph").get(path, params={"$select": ",".join(USER_FIELDS)})
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise DownstreamError()
    return {name: body.get(name) for name in USER_FIELDS}
