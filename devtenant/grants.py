"""Authlib grants: the three flows the API uses (OBO, refresh_token, client_credentials)
and the SPA's authorization code + PKCE.

OBO is not RFC 7523's JWT-bearer grant even though it shares its ``grant_type``: the
assertion is a *user's* access token issued by this tenant to the calling client, and
the client authenticates separately. Hence a dedicated grant class rather than
Authlib's :class:`~authlib.oauth2.rfc7523.JWTBearerGrant` (which expects the client
to be the assertion's issuer).

The SPA's grant is Authlib's :class:`AuthorizationCodeGrant` with its PKCE extension
(:class:`CodeChallenge`), narrowed to what Entra does for the 'Single-Page
Application' client-type: S256 challenge required, codes redeemed cross-origin only
(an ``Origin`` of a registered redirect URI), single use, Entra's AADSTS errors.

Each grant validates, then stores what the token generator and ``save_token`` need
on the request: ``request.user`` (a :class:`Principal`) and ``request.devtenant_scope``
(the consented :class:`ScopeRequest`).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

from authlib.oauth2.rfc6749 import BaseGrant, InvalidGrantError, OAuth2Error, TokenEndpointMixin
from authlib.oauth2.rfc6749.grants import (
    AuthorizationCodeGrant,
    ClientCredentialsGrant,
    RefreshTokenGrant,
)
from authlib.oauth2.rfc6749.hooks import hooked
from authlib.oauth2.rfc7523.jwt_bearer import JWT_BEARER_GRANT_TYPE
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core.grants.util import create_response_mode_response
from flask import g
from flask import request as flask_request

from devtenant import errors, scopes
from devtenant.directory import App, User
from devtenant.runtime import (
    AUTHORIZATION_CODE_LIFETIME,
    AUTHORIZATION_CODE_PREFIX,
    REFRESH_TOKEN_PREFIX,
    AuthorizationCodeRecord,
    Principal,
    RefreshRecord,
    current,
)
from devtenant.tokens import TokenError, client_info

AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt"]
#: ``azpacr``: how the client authenticated (0 public, 1 secret, 2 certificate).
AZPACR = {"none": "0", "client_secret_basic": "1", "client_secret_post": "1", "private_key_jwt": "2"}
RESPONSE_MODES = ("query", "fragment", "form_post")


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


def enforce_policies(user: User, amr: tuple[str, ...], resource: App, *, obo: bool = False) -> None:
    """Conditional Access stand-in: flagged users must have done MFA (and so must users
    whose sessions were revoked with ``require_mfa``). With ``mfa_at_sign_in`` off (the
    ``/_devtenant/mfa`` switch), the flag counts only for what an OBO asks (Graph, a
    downstream API), as a policy on those resources alone would."""
    runtime = current()
    revocation = runtime.revocations.get(user.oid)
    flagged = user.mfa_required and (obo or runtime.mfa_at_sign_in)
    if (flagged or (revocation and revocation.require_mfa)) and "mfa" not in amr:
        raise errors.mfa_required(resource.identifier, runtime.directory.mfa_policy_id)


def client_capabilities(claims: str | None) -> tuple[str, ...]:
    """``xms_cc`` values of a ``claims`` request (msal sends them with client_capabilities)."""
    if not claims:
        return ()
    try:
        parsed = json.loads(claims)
    except ValueError as exc:
        raise errors.invalid_parameter("claims", "It is not a JSON object.") from exc
    values = (((parsed if isinstance(parsed, dict) else {}).get("access_token") or {}).get("xms_cc") or {})
    values = values.get("values") if isinstance(values, dict) else None
    return tuple(str(v) for v in values) if isinstance(values, list) else ()


def note_client_capabilities() -> None:
    """Tokens minted for this request carry ``xms_cc`` when the client declared ``cp1``
    (it can handle CAE claims challenges), as Entra's CAE tokens do."""
    capabilities = client_capabilities(flask_request.form.get("claims"))
    if any(c.lower() == "cp1" for c in capabilities):
        g.devtenant_xms_cc = ("cp1",)


def check_revocation(user: User, issued_at: float, assertion: bool) -> None:
    """Refresh tokens issued before a revocation are dead (AADSTS50173); assertions only
    when the revocation requires the user to sign in again (then with the ``nbf``
    claims challenge the caller has to pass to its client)."""
    revocation = current().revocations.get(user.oid)
    if revocation is None or not revocation.revokes(issued_at):
        return
    if not assertion:
        raise errors.grant_revoked(issued_at, revocation.at)
    if revocation.require_sign_in:
        raise errors.grant_revoked(
            issued_at, revocation.at, error="interaction_required", claims=revocation.claims()
        )


def verify_assertion(assertion: str, client: App) -> dict[str, Any]:
    """The OBO assertion must be our own unexpired token, issued *to* this client, by the
    tenant the request is for (a user of another hosted tenant: AADSTS50020)."""
    audiences = [client.client_id, *client.identifier_uris]
    runtime = current()
    try:
        claims = runtime.minter.verify(assertion, audiences, tenants=runtime.tenant_ids)
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
    directory = runtime.directory
    if claims.get("tid") != directory.tenant_id:
        upn = str(claims.get("upn") or claims.get("preferred_username") or claims.get("oid"))
        raise errors.user_not_in_tenant(
            upn, str(claims.get("iss")), directory.tenant_name, client.client_id, client.display_name
        )
    return claims


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
        check_revocation(user, float(claims.get("iat", 0)), assertion=True)
        enforce_policies(user, amr, granted.resource, obo=True)
        note_client_capabilities()
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


def check_cross_origin(client: App, request: Any) -> None:
    """SPA codes and refresh tokens are redeemed by browsers only: Origin is required."""
    if not client.check_origin(request.headers.get("Origin")):
        raise errors.cross_origin_required()


def response_mode(payload: Any) -> str:
    """Where the authorization response goes: ``query`` unless the client says otherwise."""
    return payload.data.get("response_mode") or "query"


def is_claims_challenge(claims: str | None) -> bool:
    """Does the ``claims`` parameter ask for more than client capabilities (``xms_cc``)?

    A Conditional Access challenge (``capolids``/``acrs``) means step-up; msal-browser
    also sends ``claims`` with only ``xms_cc`` on every request when clientCapabilities
    is configured, which is no challenge.
    """
    if not claims:
        return False
    try:
        parsed = json.loads(claims)
    except ValueError as exc:
        raise errors.invalid_parameter("claims", "It is not a JSON object.") from exc
    if not isinstance(parsed, dict):
        raise errors.invalid_parameter("claims", "It is not a JSON object.")
    return any(not isinstance(part, dict) or set(part) - {"xms_cc"} for part in parsed.values())


class SpaCodeChallenge(CodeChallenge):
    """Authlib's PKCE extension with Entra's SPA rules and errors: S256 only, required."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise errors.pkce_required()
        if data.get("code_challenge_method") != "S256":
            raise errors.invalid_parameter(
                "code_challenge_method",
                "The 'Single-Page Application' client-type must use 'S256'.",
            )
        try:
            super().validate_code_challenge(grant, redirect_uri)
        except errors.EntraError:
            raise
        except OAuth2Error as exc:
            raise errors.invalid_parameter("code_challenge", exc.description or "") from exc

    def validate_code_verifier(self, grant: Any, result: Any) -> None:
        if not grant.request.form.get("code_verifier"):
            raise errors.missing_parameter("code_verifier")
        try:
            super().validate_code_verifier(grant, result)
        except InvalidGrantError as exc:
            raise errors.code_verifier_mismatch() from exc
        except errors.EntraError:
            raise
        except OAuth2Error as exc:
            raise errors.invalid_parameter("code_verifier", exc.description or "") from exc


class SpaAuthorizationCodeGrant(AuthorizationCodeGrant):
    """``authorization_code`` for the SPA (public client): issued by /authorize."""

    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]

    # --- authorization endpoint ---------------------------------------------------------
    def validate_requested_scope(self) -> None:
        """Entra checks the scope (and consent) when the request arrives, not at redemption."""
        scope = self.request.payload.scope
        if not (scope or "").strip():
            raise errors.missing_parameter("scope")
        runtime = current()
        requested = scopes.parse_scope(scope, runtime.directory)
        try:
            granted = scopes.grant_delegated(requested, self.request.client, runtime.directory)
        except errors.EntraError as exc:  # no consent UI here: report it like prompt=none does
            raise errors.EntraError("consent_required", exc.code, exc.message) from exc
        self.request.devtenant_scope = granted

    def create_authorization_response(self, redirect_uri: str, grant_user: Principal) -> Any:
        """Issue a code bound to client, redirect URI, PKCE challenge and nonce; deliver it
        (with ``state`` and, when asked for, ``client_info``) in ``response_mode``."""
        payload = self.request.payload
        data = payload.data
        runtime = current()
        granted: scopes.ScopeRequest = self.request.devtenant_scope
        record = AuthorizationCodeRecord(
            client_id=self.request.client.client_id,
            redirect_uri=redirect_uri,
            scope=granted.canonical(),
            principal=grant_user,
            code_challenge=data.get("code_challenge"),
            code_challenge_method=data.get("code_challenge_method"),
            nonce=data.get("nonce"),
            spa=True,
            expires_at=time.time() + AUTHORIZATION_CODE_LIFETIME,
        )
        params = [("code", runtime.save_code(record))]
        if data.get("client_info") == "1":
            params.append(("client_info", client_info(grant_user.user, runtime.directory.tenant_id)))
        if payload.state:
            params.append(("state", payload.state))
        return create_response_mode_response(redirect_uri, params, response_mode(payload))

    # --- token endpoint -----------------------------------------------------------------
    @hooked
    def validate_token_request(self) -> None:
        if not self.request.payload.client_id:
            raise errors.missing_parameter("client_id")
        client = _authenticate(self)
        if not client.check_grant_type(self.GRANT_TYPE):
            raise errors.EntraError(
                "unauthorized_client", 700016, "The client is not authorized for this grant type."
            )
        code = self.request.form.get("code")
        if not code:
            raise errors.missing_parameter("code")
        record = self.query_authorization_code(code, client)
        redirect_uri = self.request.payload.redirect_uri
        if not redirect_uri:
            raise errors.missing_parameter("redirect_uri")
        if redirect_uri != record.redirect_uri:
            raise errors.EntraError(
                "invalid_grant",
                500112,
                f"The reply address '{redirect_uri}' does not match the reply address "
                f"'{record.redirect_uri}' provided when requesting Authorization code.",
            )
        if record.spa:
            check_cross_origin(client, self.request)
        self.request.authorization_code = record
        g.devtenant_nonce = record.nonce

    def query_authorization_code(self, code: str, client: App) -> AuthorizationCodeRecord:
        if not code.startswith(AUTHORIZATION_CODE_PREFIX):
            raise errors.malformed_grant()
        record = current().find_code(code)
        if record is None or record.client_id != client.client_id:
            raise errors.EntraError(
                "invalid_grant", 70000, "The provided value for the 'code' parameter is not valid."
            )
        if record.redeemed:
            raise errors.code_redeemed()
        if record.is_expired():
            raise errors.code_expired()
        return record

    @hooked
    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        record: AuthorizationCodeRecord = self.request.authorization_code
        runtime = current()
        granted = scopes.parse_scope(record.scope, runtime.directory)
        enforce_policies(record.principal.user, record.principal.amr, granted.resource)
        if not runtime.redeem_code(record):
            raise errors.code_redeemed()
        self.request.user = record.principal
        self.request.devtenant_scope = granted
        self.request.devtenant_spa = record.spa
        token = self.generate_token(
            user=record.principal, scope=record.scope, include_refresh_token=granted.offline
        )
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER


class RefreshGrant(RefreshTokenGrant):
    """Redeem an in-memory refresh token; the response carries a rotated one.

    A SPA's refresh token (from a code issued to a SPA redirect URI) is redeemed
    cross-origin only, and its successors keep its 24 h expiry.
    """

    TOKEN_ENDPOINT_AUTH_METHODS = [*AUTH_METHODS, "none"]
    INCLUDE_NEW_REFRESH_TOKEN = True

    def _validate_request_client(self) -> App:
        return _authenticate(self)

    def _validate_request_token(self, client: App) -> RefreshRecord:
        value = self.request.form.get("refresh_token")
        if not value:
            raise errors.missing_parameter("refresh_token")
        record = self.authenticate_refresh_token(value)
        if record is None or not record.check_client(client) or (
            record.tenant_id and record.tenant_id != current().directory.tenant_id
        ):
            raise errors.EntraError(
                "invalid_grant",
                70000,
                "The provided value for the 'refresh_token' is not valid: it was not issued "
                "to this client, has expired, or was already redeemed.",
            )
        if record.spa:
            check_cross_origin(client, self.request)
            self.request.devtenant_spa = True
            self.request.devtenant_refresh_expires_at = record.expires_at
        return record

    def _validate_token_scope(self, token: RefreshRecord) -> None:
        runtime = current()
        requested = scopes.parse_scope(self.request.payload.scope or token.scope, runtime.directory)
        granted = scopes.grant_delegated(requested, self.request.client, runtime.directory)
        check_revocation(token.principal.user, token.issued_at, assertion=False)
        enforce_policies(token.principal.user, token.principal.amr, granted.resource)
        note_client_capabilities()
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
