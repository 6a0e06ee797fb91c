"""Blueprint for "Contoso Tasks API", a second downstream API next to Graph.

It exists so tests can show one user's msal cache holding tokens for two resources
(Graph and ``api://<tasks id>``), each accepted only by its own API. Validation is
what a Microsoft.Identity.Web API does with a v2 token: signature, issuer tenant,
lifetime, audience (its client id, or its App ID URI as v1 tokens carry) and a
delegated ``scp`` naming one of its scopes. Errors are RFC 6750 challenges, not
Graph's error shape, because a custom API has no reason to copy Graph.
"""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, Response, jsonify, request

from devtenant import TASKS_API_CLIENT_ID, TASKS_API_RESOURCE
from devtenant.runtime import current
from devtenant.tokens import TokenError

bp = Blueprint("tasks_api", __name__, url_prefix="/tasks-api/v1")

TASKS_AUDIENCES = (TASKS_API_CLIENT_ID, TASKS_API_RESOURCE)
READ_SCOPES = frozenset({"Tasks.Read", "Tasks.ReadWrite"})
#: ASP.NET Core's JwtBearer default clock skew, as for Graph.
CLOCK_SKEW = 300
#: Task ids are uuid5 of owner + position, so the same user always sees the same tasks.
_TASK_NAMESPACE = uuid.UUID(TASKS_API_CLIENT_ID)


class TasksApiError(Exception):
    """Raised inside a view; rendered as an RFC 6750 challenge plus a JSON body."""

    def __init__(self, status: int, error: str, description: str, scope: str | None = None) -> None:
        super().__init__(description)
        self.status, self.error, self.description, self.scope = status, error, description, scope


@bp.errorhandler(TasksApiError)
def _render_error(exc: TasksApiError) -> Response:
    response = jsonify({"error": exc.error, "error_description": exc.description})
    response.status_code = exc.status
    quoted = " ".join(exc.description.replace('"', "'").split())  # a valid quoted-string
    challenge = f'Bearer error="{exc.error}", error_description="{quoted}"'
    if exc.scope:
        challenge += f', scope="{exc.scope}"'
    response.headers["WWW-Authenticate"] = challenge
    return response


@bp.after_request
def _count(response: Response) -> Response:
    current().counters.count_tasks_api(request.path, response.status_code)
    return response


def _signed_in_oid() -> str:
    """Validate the bearer token and return the ``oid`` of the user it was issued for."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TasksApiError(401, "invalid_token", "No bearer token in the Authorization header.")
    try:
        claims = current().minter.verify(token.strip(), TASKS_AUDIENCES, leeway=CLOCK_SKEW)
    except TokenError as exc:
        raise TasksApiError(401, "invalid_token", exc.detail) from exc
    granted = set(str(claims.get("scp", "")).split())
    if not READ_SCOPES & granted:  # app-only tokens (no scp) land here too: /me needs a user
        raise TasksApiError(
            403,
            "insufficient_scope",
            "The token does not grant Tasks.Read or Tasks.ReadWrite.",
            scope="Tasks.Read",
        )
    return str(claims.get("oid", ""))


def _tasks_for(oid: str) -> list[dict[str, Any]]:
    """Two fixed tasks per known user; an unknown oid simply owns none (not an error)."""
    user = current().directory.user(oid) if oid else None
    if user is None:
        return []
    first = user.profile.get("givenName") or user.display_name
    items = [(f"Send {first}'s weekly status report", "inProgress"), ("Review expense claims", "notStarted")]
    return [
        {
            "id": str(uuid.uuid5(_TASK_NAMESPACE, f"{oid}/{n}")),
            "title": title,
            "status": status,
            "assignedTo": user.upn,
        }
        for n, (title, status) in enumerate(items, start=1)
    ]


@bp.get("/me/tasks")
def my_tasks() -> Response:
    oid = _signed_in_oid()
    return jsonify({"value": _tasks_for(oid), "owner": oid})
