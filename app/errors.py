"""One error shape for the whole API: JSON ``{"error", "error_description"}``.

Descriptions are fixed strings chosen here, never text from a token, Entra ID or
Graph, so nothing sensitive can be echoed back to a caller.
"""

from __future__ import annotations

import base64
import json
import logging
import traceback

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

REALM = "flask-obo"


class ApiError(Exception):
    """An error the API answers with; subclasses fix status, code and description."""

    status = 500
    error = "server_error"
    description = "The server could not complete the request."

    def __init__(
        self,
        description: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
        error: str | None = None,
    ) -> None:
        super().__init__(description or self.description)
        if description:
            self.description = description
        if status:
            self.status = status
        if error:
            self.error = error
        self.headers = headers or {}

    def response(self) -> Response:
        response = jsonify(error=self.error, error_description=self.description)
        response.status_code = self.status
        response.headers.update(self.headers)
        return response


class ServiceUnavailable(ApiError):
    """A dependency (Entra ID, Redis) is down; the client may retry after a while."""

    status = 503
    error = "temporarily_unavailable"
    description = "A service this API depends on is unavailable; retry later."

    def __init__(self, description: str | None = None, retry_after: int = 5) -> None:
        super().__init__(description, headers={"Retry-After": str(max(1, int(retry_after)))})


class InsufficientClaims(ApiError):
    """A claims challenge (MFA, Conditional Access) the SPA must satisfy by signing in
    again with these claims; msal.js reads them from ``WWW-Authenticate``."""

    status = 401
    error = "insufficient_claims"
    description = "Sign in again with the claims in the WWW-Authenticate header."

    def __init__(self, claims: str) -> None:
        encoded = base64.b64encode(claims.encode()).decode()
        super().__init__(headers={
            "WWW-Authenticate": bearer_challenge(error="insufficient_claims", claims=encoded)
        })
        self.claims = encoded

    def response(self) -> Response:
        response = super().response()
        response.set_data(json.dumps({
            "error": self.error, "error_description": self.description, "claims": self.claims
        }))
        return response

    @staticmethod
    def is_claims_json(value: str) -> bool:
        """A challenge's claims must be a small JSON object before we relay them."""
        if len(value) > 8192:
            return False
        try:
            return isinstance(json.loads(value), dict)
        except ValueError:
            return False


def bearer_challenge(**params: str) -> str:
    """A ``WWW-Authenticate: Bearer`` value per RFC 6750 (values are ours, never echoed)."""
    parts = [f'realm="{REALM}"', *(f'{name}="{value}"' for name, value in params.items())]
    return "Bearer " + ", ".join(parts)


def init_app(app: Flask) -> None:
    """Render ApiError and every HTTP error as JSON; turn surprises into a logged 500."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return exc.response()

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        response = ApiError(
            description=_HTTP_DESCRIPTIONS.get(code, "The request could not be completed."),
            status=code,
            error=_HTTP_ERRORS.get(code, "invalid_request"),
        ).response()
        allowed = getattr(exc, "valid_methods", None)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # Log the type and the frames, never str(exc): it may quote a token or a blob.
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.error("unhandled %s\n%s", type(exc).__name__, frames)
        return ApiError().response()


_HTTP_ERRORS = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    431: "request_too_large",
}
_HTTP_DESCRIPTIONS = {
    400: "The request is malformed.",
    404: "No such resource.",
    405: "This method is not allowed on this resource.",
    413: "The request is too large.",
    431: "The request headers are too large.",
}
