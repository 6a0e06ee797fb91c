"""Authlib grants for the three flows the API uses: OBO, refresh_token, client_credentials.

OBO is not RFC 7523's JWT-bearer grant even though it shares its ``grant_type``: the
assertion is a *user's* access token issued by this tenant to the calling client, and
the client authenticates separately. Hence a dedicated grant class rather than
Authlib's :class:`~authlib.oauth2.rfc7523.JWTBearerGrant` (which expects the client
to be the assertion's issuer).

Each grant validates, then stores what the token generator and ``save_token`` need
on the request: ``request.user`` (a :class:`Principal`) and ``request.devtenant_scope``
(the consented :class:`ScopeRequest`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from authlib.oauth2.rfc6749 import BaseGrant, TokenEndpointMixin
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant, RefreshTokenGrant
from authlib.oauth2.rfc7523.jwt_bearer import JWT_BEARER_GRANT_TYPE
from flask import g

from devtenant import errors, scopes
from devtenant.directory import App, User
from devtenant.runtime import REFRESH_TOKEN_PREFIX, Principal, RefreshRecord, current
from devtenant.tokens import TokenError

AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt"]
#: ``azpacr``: how the client authenticated (0 public, 1 secret, 2 certificate).
AZPACR = {"client_secret_basic": "1", "client_secret_post": "1", "private_key_jwt": "2"}


def _authenticate(grant: BaseGrant) -> App:
    client = grant.authenticate_token_endpoint_client()
    grant.request.client = client
    g.devtenant_azpacr = AZPACR.get(grant.request.auth_method or "", "1")
    return client


def _iso(ts: Any) -> str:
    try:
        return dt.datetime.fromtimestamp(float(ts), dt.UTC).strftime("%m/%d/%Y %H:%M:%S")
    except (TypeError, ValueError):
        return "unknown"


def enforce_policies(user: User, amr: tuple[str, ...], resource: App) -> None:
    """Conditional Access stand-in: flagged users must have done MFA."""
    if user.mfa_required and "mfa" not in amr:
        directory = current().directory
        raise errors.mfa_required(resource.identifier, directory.mfa_policy_id)


def verify_assertion(assertion: str, client: App) -> dict[str, Any]:
    """The OBO assertion must be our own unexpired token, issued *to* this client."""
    audiences = [client.client_id, *client.identifier_uris]
    try:
        return current().minter.verify(assertion, audiences)
    except TokenError as exc:
        if exc.reason == "expired":
            now = dt.datetime.now(dt.UTC).timestamp()
            raise errors.EntraError(
                "invalid_grant",
                500133,
                "Assertion is not within its valid time range. Ensure that the access token "
                "is not expired before using it for user assertion, or request a new token. "
                f"Current time: {_iso(now)}, expiry time of assertion {_iso(exc.claims.get('exp'))}.",
            ) from exc
        if exc.reason == "audience":
            message = (
                "Assertion audience does not match the Client app presenting the assertion. "
                f"The audience in the assertion was '{exc.claims.get('aud')}' and the expected "
                f"audience is '{client.client_id}' or one of the Application Id URIs of this "
                "application."
            )
        else:
            message = f"Assertion failed signature validation. [Reason - {exc.detail}]"
        raise errors.EntraError("invalid_grant", 50013, message) from exc


class OnBehalfOfGrant(BaseGrant, TokenEndpointMixin):
    """``urn:ietf:params:oauth:grant-type:jwt-bearer`` + ``requested_token_use=on_behalf_of``."""

    GRANT_TYPE = JWT_BEARER_GRANT_TYPE
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS

    def validate_token_request(self) -> None:
        form = self.request.form
        if form.get("requested_token_use") != "on_behalf_of":
            raise errors.missing_parameter("requested_token_use")
        assertion = form.get("assertion")
        if not assertion:
            raise errors.missing_parameter("assertion")
        if not (self.request.payload.scope or "").strip():
            raise errors.missing_parameter("scope")
        client = _authenticate(self)
        runtime = current()
        claims = verify_assertion(assertion, client)
        user = runtime.directory.user(str(claims.get("oid", "")))
        if user is None:
            raise errors.EntraError(
                "invalid_grant", 50013, "Assertion does not identify a user of this tenant."
            )
        requested = scopes.parse_scope(self.request.payload.scope, runtime.directory)
        if user.consent_missing:
            raise errors.consent_required(client.client_id, client.display_name)
        granted = scopes.grant_delegated(requested, client, runtime.directory)
        amr = tuple(str(m) for m in claims.get("amr", ()))
        enforce_policies(user, amr, granted.resource)
        self.request.user = Principal(user, amr)
        self.request.devtenant_scope = granted

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        granted: scopes.ScopeRequest = self.request.devtenant_scope
        token = self.generate_token(
            user=self.request.user,
            scope=granted.canonical(),
            include_refresh_token=granted.offline,
        )
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER


class RefreshGrant(RefreshTokenGrant):
    """Redeem an in-memory refresh token; the response carries a rotated one."""

    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True

    def _validate_request_client(self) -> App:
        return _authenticate(self)

    def _validate_request_token(self, client: App) -> RefreshRecord:
        value = self.request.form.get("refresh_token")
        if not value:
            raise errors.missing_parameter("refresh_token")
        record = self.authenticate_refresh_token(value)
        if record is None or not record.check_client(client):
            raise errors.EntraError(
                "invalid_grant",
                70000,
                "The provided value for the 'refresh_token' is not valid: it was not issued "
                "to this client, has expired, or was already redeemed.",
            )
        return record

    def _validate_token_scope(self, token: RefreshRecord) -> None:
        runtime = current()
        requested = scopes.parse_scope(self.request.payload.scope or token.scope, runtime.directory)
        granted = scopes.grant_delegated(requested, self.request.client, runtime.directory)
        enforce_policies(token.principal.user, token.principal.amr, granted.resource)
        self.request.devtenant_scope = granted

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshRecord | None:
        if not refresh_token.startswith(REFRESH_TOKEN_PREFIX):
            raise errors.EntraError(
                "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid."
            )
        return current().find_refresh_token(refresh_token)

    def authenticate_user(self, refresh_token: RefreshRecord) -> Principal:
        return refresh_token.principal

    def issue_token(self, user: Principal, refresh_token: RefreshRecord) -> dict[str, Any]:
        granted: scopes.ScopeRequest = self.request.devtenant_scope
        return self.generate_token(user=user, scope=granted.canonical(), include_refresh_token=True)

    def revoke_old_credential(self, refresh_token: RefreshRecord) -> None:
        current().revoke_refresh_token(refresh_token)


class AppOnlyGrant(ClientCredentialsGrant):
    """client_credentials with ``<resource>/.default``: an app-only token with ``roles``."""

    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS

    def authenticate_token_endpoint_client(self) -> App:
        client = super().authenticate_token_endpoint_client()
        g.devtenant_azpacr = AZPACR.get(self.request.auth_method or "", "1")
        return client

    def validate_requested_scope(self) -> None:
        scopes.app_only_resource(self.request.payload.scope, current().directory)
