"""The API's routes: ``/api/*``, every one requiring the API scope.

Reading a Graph route top-down is the request path: protector (``before_request``) →
OBO provider (with the user's cache) → Graph client. Only routes that call Graph ever
trigger an On-Behalf-Of exchange.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from .errors import ApiError, InsufficientClaims
from .graph_client import GraphClaimsChallenge, GraphClient, GraphNotFound
from .protector import authenticate_request, current_user_token
from .token_acquisition import OnBehalfOfTokenProvider

api = Blueprint("api", __name__, url_prefix="/api")

WHOAMI_CLAIMS = ("oid", "tid", "name", "preferred_username", "scp")


@api.before_request
def _require_scope() -> None:
    if request.method != "OPTIONS":  # CORS preflights carry no token
        authenticate_request()


@api.after_request
def _never_cache(response: Response) -> Response:
    # Every answer here is one user's data (or an error about their token): no shared
    # cache (CDN, proxy) may keep it, whichever origin asked.
    response.headers["Cache-Control"] = "no-store"
    response.vary.add("Origin")
    return response


@api.get("/whoami")
def whoami() -> Response:
    token = current_user_token()
    return jsonify({claim: token.get(claim) for claim in WHOAMI_CLAIMS})


@api.get("/me")
def me() -> Response:
    return jsonify(_graph_user("/me"))


@api.get("/me/manager")
def manager() -> Response:
    try:
        return jsonify(_graph_user("/me/manager"))
    except GraphNotFound:
        raise ApiError("The signed-in user has no manager.", status=404,
                       error="manager_not_found") from None


def _graph_user(path: str) -> dict[str, Any]:
    """GET a Graph user object as the caller; one fresh token on a claims challenge."""
    user = current_user_token()
    tokens: OnBehalfOfTokenProvider = current_app.extensions["flask-obo.tokens"]
    graph: GraphClient = current_app.extensions["flask-obo.graph"]
    access_token = tokens.acquire_token(user)
    try:
        return graph.get_user(path, access_token)
    except GraphClaimsChallenge as challenge:
        access_token = tokens.acquire_token(user, claims_challenge=challenge.claims)
    try:
        return graph.get_user(path, access_token)
    except GraphClaimsChallenge as challenge:  # still challenged: the SPA must act
        raise InsufficientClaims(challenge.claims) from None
