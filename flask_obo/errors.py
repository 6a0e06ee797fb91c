"""flask-obo's one error vocabulary: every error a protected route can answer with.

Each is an ``ApiError`` carrying its status, its ``error`` code and its headers, and
``FlaskOBO.init_app`` renders them all as JSON ``{"error", "error_description"}``. So a
route never maps errors itself: it lets them propagate, or catches one to say more
(``except DownstreamNotFound: raise ApiError(..., status=404, error="manager_not_found")``).

Descriptions are fixed strings chosen here, never text from a token, Entra ID or a
downstream API, so nothing sensitive can be echoed back to a caller.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, Response, jsonify

from .store_errors import LockBusy, StoreUnavailable

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


# --- the caller's token (the protector) -------------------------------------------------------
class MissingToken(ApiError):
    status = 401
    error = "missing_token"
    description = "The request carries no bearer token."

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": bearer_challenge()})


class InvalidAccessToken(ApiError):
    """One fixed answer for every defect of a token, so a caller learns nothing from it."""

    status = 401
    error = "invalid_token"
    description = "The access token is invalid or has expired."

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": bearer_challenge(
            error="invalid_token", error_description=self.description)})


class InsufficientScope(ApiError):
    """The token lacks the scope the route requires (an app-only token has no scope at all)."""

    status = 403
    error = "insufficient_scope"

    def __init__(self, scope: str) -> None:
        super().__init__(
            f"The access token lacks the required scope {scope}.",
            headers={"WWW-Authenticate": bearer_challenge(error="insufficient_scope", scope=scope)},
        )


class MissingAppRole(InsufficientScope):
    """An app-only token without any of the route's app roles (or a delegated token on a
    route for apps alone). The roles are the route's own names, never the token's."""

    def __init__(self, roles: tuple[str, ...]) -> None:
        ApiError.__init__(
            self, f"The access token lacks an app role this route requires: {', '.join(roles)}.",
            headers={"WWW-Authenticate": bearer_challenge(error="insufficient_scope")},
        )


class UserTokenRequired(ApiError):
    """An app-only token on a route that acts on behalf of a user (an On-Behalf-Of
    exchange): no user is behind it, so it is refused before any call to Entra ID. The
    challenge is RFC 6750's for a token with too few privileges, naming the scope a
    user's token needs."""

    status = 403
    error = "user_token_required"
    description = "This operation acts on behalf of a signed-in user; an app-only token cannot be used."

    def __init__(self, scope: str) -> None:
        super().__init__(headers={"WWW-Authenticate": bearer_challenge(error="insufficient_scope",
                                                                       scope=scope)})


# --- acquiring tokens from Entra ID ------------------------------------------------------------
class IdentityProviderUnavailable(ServiceUnavailable):
    description = "The identity provider is unavailable; retry later."


class TokenAcquisitionBusy(ServiceUnavailable):
    description = "Token acquisition for this user is taking too long; retry shortly."

    def __init__(self) -> None:
        super().__init__(retry_after=1)


class TooManyWaiting(ServiceUnavailable):
    description = "Too many requests are waiting on the identity provider; retry shortly."

    def __init__(self) -> None:
        super().__init__(retry_after=1)


class WorkerRetiring(ServiceUnavailable):
    """The worker serving the request is going away (``flask_obo.retire_worker``) and will
    not wait on the identity provider any longer; another worker answers the retry."""

    description = "This server is restarting; retry shortly."

    def __init__(self) -> None:
        super().__init__(retry_after=1)


class ConsentRequired(ApiError):
    status = 403
    error = "consent_required"
    description = "An administrator must grant this API consent to call the downstream API."


class InteractionRequired(ApiError):
    status = 401
    error = "interaction_required"
    description = "The user must sign in again interactively."

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": bearer_challenge(error="invalid_token")})


class AssertionRejected(ApiError):
    """Entra refused the incoming token itself: that request's problem, not its user's."""

    status = 401
    error = "invalid_token"
    description = "The identity provider no longer accepts this access token; get a new one."

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": bearer_challenge(error="invalid_token")})


class TokenAcquisitionFailed(ApiError):
    status = 502
    error = "token_acquisition_failed"
    description = "The identity provider refused to issue a token for the downstream API."


# --- background jobs (flask_obo.background) ----------------------------------------------------
class InvalidBackgroundHandle(ApiError):
    """A background handle this API did not issue, or one that was altered: refused before
    anything is read for it. The same answer whatever was wrong with it (the generic
    ``invalid_request`` code: a malformed input, told apart by this class and its text)."""

    status = 400
    error = "invalid_request"
    description = "The background handle is not one this API issued."


class BackgroundHandleRevoked(InteractionRequired):
    """The user signed out (or their cached session ended) after the handle was taken: the
    job can no longer act for them until they sign in and start it again."""

    description = "The user's session behind this background job has ended; the user must sign in again."


class RefreshTokenExpired(InteractionRequired):
    """A background job's user has no usable refresh token any more: Entra ID refused it
    (expired, revoked) or there is none. Only the user, signing in again, can renew it."""

    description = ("The identity provider no longer honours the user's refresh token; "
                   "the user must sign in again.")


# --- the token cache ---------------------------------------------------------------------------
class CacheUnavailable(ServiceUnavailable):
    """Redis is down, slow or its circuit is open. Token acquisition goes on without it,
    so a caller sees this only where there is no other way."""

    description = "The token cache is unavailable; retry later."


@contextmanager
def store_signals_answered() -> Iterator[None]:
    """Where a request cannot go on without the store: its signals (``flask_obo.store_errors``,
    plain exceptions) become the answers above, ``StoreUnavailable`` as ``CacheUnavailable``
    and ``LockBusy`` as ``TokenAcquisitionBusy`` (each 503 with its ``Retry-After``)."""
    try:
        yield
    except StoreUnavailable:
        raise CacheUnavailable() from None
    except LockBusy:
        raise TokenAcquisitionBusy() from None


# --- downstream APIs ---------------------------------------------------------------------------
class DownstreamNotFound(ApiError):
    """The downstream API answered 404: a JSON 404 on every route (never a 500), unless the
    route catches it to say more, as the reference API's ``/api/me/manager`` does."""

    status = 404
    error = "not_found"
    description = "The downstream API has no such resource."


class DownstreamError(ApiError):
    status = 502
    error = "downstream_error"
    description = "The downstream API failed to answer the request."


class DownstreamTimeout(ApiError):
    status = 504
    error = "downstream_timeout"
    description = "The downstream API did not answer in time."


class DownstreamThrottled(ServiceUnavailable):
    description = "The downstream API is throttling requests; retry later."


class DownstreamNotConfigured(ApiError, LookupError):
    """A route asked ``FlaskOBO.downstream`` for a name no setting configures: the API's
    own mistake (500), logged with the name and the configured names, answered with a
    description that says so rather than a bare ``server_error``. A ``LookupError`` too."""

    description = "This route needs a downstream API that is not configured on the server."

    def __init__(self, name: str = "", configured: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.name, self.configured = name, configured

    def __str__(self) -> str:  # for the developer; the caller gets ``description``
        return f"no downstream API named {self.name!r}; configured: {', '.join(self.configured)}"


class UnsafeDownstreamPath(ApiError, ValueError):
    """A route asked to call a downstream path that could resolve outside the API's base
    URL (``..``, ``%252e``, ``\\``, ``;``): refused before any token is acquired, so a
    path built from a caller's input cannot carry the user's token elsewhere. A
    ``ValueError`` too: it is the route's argument that is wrong."""

    status = 400
    error = "invalid_request"
    description = "The path must be relative to the downstream API's base URL, e.g. /me."


def bearer_challenge(**params: str) -> str:
    """A ``WWW-Authenticate: Bearer`` value per RFC 6750 (values are ours, never echoed)."""
    parts = [f'realm="{REALM}"', *(f'{name}="{value}"' for name, value in params.items())]
    return "Bearer " + ", ".join(parts)


def error_codes() -> dict[int, frozenset[str]]:
    """Every ``error`` code this module answers with, by HTTP status: each ``ApiError``
    class's and the generic HTTP errors' (400, 404, 405, 413, 414, 431). An application adds the
    codes it raises itself (``ApiError(..., error="manager_not_found")``); an API document
    (the reference API's ``/openapi.json``) is built from both."""
    codes: dict[int, set[str]] = {}
    for value in globals().values():
        if isinstance(value, type) and issubclass(value, ApiError):
            codes.setdefault(value.status, set()).add(value.error)
    for status, error in _HTTP_ERRORS.items():
        codes.setdefault(status, set()).add(error)
    return {status: frozenset(names) for status, names in sorted(codes.items())}


def http_error(status: int) -> ApiError:
    """The answer to a generic HTTP error (no route, a method the route does not take, a
    body or headers too large...), whoever detects it: Flask, or the HTTP server before the
    request reaches Flask (app/gunicorn_errors.py)."""
    if status == 500:
        return ApiError()
    return ApiError(
        description=_HTTP_DESCRIPTIONS.get(status, "The request could not be completed."),
        status=status,
        error=_HTTP_ERRORS.get(status, "invalid_request"),
    )


def register_error_handlers(app: Flask) -> None:
    """Render flask-obo's own errors (``ApiError``: what the protector, the token provider
    and the downstream APIs raise) as JSON. Nothing else: an application's own 404 page,
    its other errors and its handlers stay its own (the reference API renders every HTTP
    error as JSON too: ``app/errors.py``)."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return exc.response()


_HTTP_ERRORS = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    414: "request_too_large",
    431: "request_too_large",
}
_HTTP_DESCRIPTIONS = {
    400: "The request is malformed.",
    404: "No such resource.",
    405: "This method is not allowed on this resource.",
    413: "The request is too large.",
    414: "The request URI is too long.",
    431: "The request headers are too large.",
}
