"""Authlib AuthorizationServer wired to the directory, the token minter and Entra errors.

Authlib does the protocol plumbing (grant dispatch, client authentication registry,
token generator / ``save_token`` hooks); this module supplies the Entra specifics:
JWT access tokens in Entra's response shape, refresh tokens kept in memory, and
AADSTS-coded error bodies for every failure. The SPA's authorization code grant
(:mod:`devtenant.signin` drives its authorization endpoint) is registered here too.
"""

from __future__ import annotations

import time
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2 import OAuth2Error
from flask import Flask, Response, g
from flask import request as flask_request

from devtenant import clientauth, grants, scopes
from devtenant.directory import App, Directory
from devtenant.errors import as_entra_error
from devtenant.runtime import Principal, Runtime, base_url, current, issuer
from devtenant.tokens import client_info, random_lifetime

TOKEN_PATH = "/{tenant}/oauth2/v2.0/token"
NO_STORE = [
    ("Content-Type", "application/json; charset=utf-8"),
    ("Cache-Control", "no-store, no-cache"),
    ("Pragma", "no-cache"),
]


def generate_token(
    grant_type: str,
    client: App,
    user: Principal | None = None,
    scope: str | None = None,
    expires_in: int | None = None,
    include_refresh_token: bool = True,
) -> dict[str, Any]:
    """Authlib token generator producing Entra's token response body.

    ``scope`` is the canonical (consented, fully-qualified) scope chosen by the grant;
    the ``scope`` *returned* follows the runtime short/prefixed switch.
    """
    runtime = current()
    lifetime = expires_in or runtime.access_token_lifetime or random_lifetime()
    azpacr = g.get("devtenant_azpacr", "1")
    if user is None:
        lifetime = expires_in or runtime.app_token_lifetime or lifetime
        resource = scopes.app_only_resource(scope, runtime.directory)
        access_token = runtime.minter.app_token(
            issuer=issuer(),
            audience=resource.audience,
            client=client,
            azpacr=azpacr,
            roles=runtime.directory.app_roles_granted(client, resource),
            lifetime=lifetime,
        )
        return {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": access_token,
        }
    granted = scopes.parse_scope(scope, runtime.directory)
    body: dict[str, Any] = {
        "token_type": "Bearer",
        "scope": granted.response_scope(runtime.short_scopes),
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "access_token": runtime.minter.user_token(
            issuer=issuer(),
            audience=granted.resource.audience,
            user=user.user,
            azp=client.client_id,
            azpacr=azpacr,
            scp=granted.permissions or (),
            amr=user.amr,
            lifetime=lifetime,
            extra={"xms_cc": list(g.devtenant_xms_cc)} if g.get("devtenant_xms_cc") else None,
        ),
    }
    if include_refresh_token:
        body["refresh_token"] = runtime.new_refresh_token()
    if granted.wants_id_token:
        body["id_token"] = runtime.minter.id_token(
            issuer=issuer(),
            client_id=client.client_id,
            user=user.user,
            amr=user.amr,
            nonce=g.get("devtenant_nonce"),  # set by the authorization code grant
        )
    body["client_info"] = client_info(user.user, runtime.directory.tenant_id)
    return body


def save_token(token: dict[str, Any], request: Any) -> None:
    """Persist refresh tokens (in memory) bound to client, user and consented scope.

    A SPA's refresh token says when it expires (``refresh_token_expires_in``, as Entra
    does for that client-type; msal-browser stores it).
    """
    if "refresh_token" in token:
        granted: scopes.ScopeRequest = request.devtenant_scope
        spa = bool(getattr(request, "devtenant_spa", False))
        record = current().save_refresh_token(
            token["refresh_token"],
            request.client.client_id,
            request.user,
            granted.canonical(),
            spa=spa,
            expires_at=getattr(request, "devtenant_refresh_expires_at", None),
        )
        if spa:
            token["refresh_token_expires_in"] = max(0, int(record.expires_at - time.time()))


class EntraAuthorizationServer(AuthorizationServer):
    """Flask AuthorizationServer whose errors look like Entra's."""

    def handle_error_response(self, request: Any, error: OAuth2Error) -> Response:
        entra = as_entra_error(error)
        correlation = flask_request.headers.get("client-request-id")
        body = entra.body(base_url(), correlation)
        return self.handle_response(entra.status_code, body, NO_STORE)


def create_authorization_server(app: Flask, runtime: Runtime) -> EntraAuthorizationServer:
    """Register the client auth methods and grants on a new server bound to ``app``."""

    def directory() -> Directory:  # the request's tenant: several are hosted
        return runtime.directory

    def query_client(client_id: str | None) -> App | None:
        return runtime.directory.client(client_id)

    server = EntraAuthorizationServer(app, query_client=query_client, save_token=save_token)
    server.register_token_generator("default", generate_token)
    server.register_client_auth_method("client_secret_basic", clientauth.secret_basic(directory))
    server.register_client_auth_method("client_secret_post", clientauth.secret_post(directory))
    server.register_client_auth_method(
        "private_key_jwt", clientauth.CertificateAssertion(directory, TOKEN_PATH)
    )
    server.register_client_auth_method("none", clientauth.public_client(directory))
    server.register_grant(grants.SpaAuthorizationCodeGrant, [grants.SpaCodeChallenge(required=True)])
    server.register_grant(grants.OnBehalfOfGrant)
    server.register_grant(grants.RefreshGrant)
    server.register_grant(grants.AppOnlyGrant)
    return server
