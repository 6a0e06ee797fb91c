"""Credentials for Azure SDK clients and the Microsoft Graph SDK (``flask-obo[azure]``).

Azure SDK clients (Blob Storage, Key Vault...) and ``msgraph-sdk``'s ``GraphServiceClient``
take an azure-core credential and ask it for a token for whatever scopes they need.
``UserCredential`` answers on behalf of one user, the current request's or a background
job's, through the same token provider as ``obo.acquire_token``: the memory tier, the
shared Redis cache, single flight, the On-Behalf-Of exchange, and the claims-challenge
retry (a ``claims`` argument forces a fresh token for those claims). So an SDK client
costs no more exchanges than ``obo.downstream``: one for the user's first token, none
while it is cached. ``AppCredential`` answers as the API itself, through
``obo.acquire_app_token``'s provider (client credentials).

It implements azure-core's ``TokenCredential`` (``get_token``) and ``SupportsTokenInfo``
(``get_token_info``). ``AsyncCredential`` wraps it for async clients
(``AsyncTokenCredential``/``AsyncSupportsTokenInfo``, what ``GraphServiceClient`` is
built for): acquisition blocks on Redis and Entra ID, so it runs in a worker thread
(``asyncio.to_thread``, bounded by ``TOKEN_ACQUISITION_TIMEOUT``) and never stalls the
event loop; the user was captured when the credential was made, inside the request, so
the thread needs no request context.

Errors are flask-obo's (``flask_obo.errors``): raised through the SDK call, a route
answers them as it would from ``obo.downstream`` (a claims challenge for the SPA, 503
while Entra ID is down...). This module imports azure-core: ``flask_obo`` itself does
not, so it works without the extra.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.core.exceptions import ClientAuthenticationError

from .app_tokens import AppTokenProvider
from .protector import EntraAccessToken
from .token_acquisition import MSAL_EXPIRY_MARGIN_SECONDS, OnBehalfOfTokenProvider

#: ``(scopes, claims, tenant_id) -> access token``: how a credential gets its tokens.
TokenSource = Callable[[list[str], "str | None", "str | None"], str]


class Credential:
    """A synchronous azure-core credential over a ``TokenSource``."""

    def __init__(self, source: TokenSource) -> None:
        self._source = source

    def get_token(self, *scopes: str, claims: str | None = None, tenant_id: str | None = None,
                  enable_cae: bool = False, **kwargs: Any) -> AccessToken:
        """azure-core's ``TokenCredential.get_token``. ``enable_cae``: whether tokens are
        CAE-capable is the API's ``CLIENT_CAPABILITIES`` setting, the same for every
        token it holds (an SDK that does not ask for CAE still gets its claims
        challenges answered: ``claims``)."""
        info = self._token(scopes, claims, tenant_id)
        return AccessToken(info.token, info.expires_on)

    def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        """azure-core's ``SupportsTokenInfo.get_token_info``."""
        options = options or {}
        return self._token(scopes, options.get("claims"), options.get("tenant_id"))

    def _token(self, scopes: tuple[str, ...], claims: str | None, tenant_id: str | None) -> AccessTokenInfo:
        if not scopes or not all(isinstance(scope, str) and scope for scope in scopes):
            raise ValueError("at least one scope is required, e.g. https://graph.microsoft.com/.default")
        token = self._source(list(scopes), claims or None, tenant_id)
        return AccessTokenInfo(token, expires_on(token))

    def close(self) -> None:
        """Nothing to release: the token provider belongs to the application."""

    def __enter__(self) -> Credential:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class UserCredential(Credential):
    """Tokens on behalf of one user (``obo.user_credential()``): for the request that
    made it, or the background job whose handle it was made with."""

    def __init__(self, tokens: OnBehalfOfTokenProvider, user: EntraAccessToken) -> None:
        def acquire(scopes: list[str], claims: str | None, tenant_id: str | None) -> str:
            if tenant_id and tenant_id.lower() != user.tid.lower():
                raise ClientAuthenticationError(
                    "a user credential acquires tokens in the user's own tenant only")
            return tokens.acquire_token(user, scopes, claims)

        super().__init__(acquire)


class AppCredential(Credential):
    """The API's own tokens (client credentials, no user: ``obo.app_credential()``) from
    its app token provider: cached in memory and Redis per tenant and resource, renewed
    ahead of expiry. Scopes are one ``<resource>/.default``, as for client credentials.
    An SDK's ``tenant_id`` (or ``tenant`` here) picks a tenant this API serves."""

    def __init__(self, app_tokens: AppTokenProvider, tenant: str | None = None) -> None:
        def acquire(scopes: list[str], claims: str | None, tenant_id: str | None) -> str:
            return app_tokens.acquire(scopes, tenant_id or tenant, claims)

        super().__init__(acquire)


class AsyncCredential:
    """An async azure-core credential (``AsyncTokenCredential``, ``AsyncSupportsTokenInfo``)
    over a synchronous one, for async clients such as ``msgraph-sdk``'s."""

    def __init__(self, credential: Credential) -> None:
        self._credential = credential

    async def get_token(self, *scopes: str, claims: str | None = None, tenant_id: str | None = None,
                        enable_cae: bool = False, **kwargs: Any) -> AccessToken:
        # to_thread copies the context (the request id, for logs) into the worker thread.
        return await asyncio.to_thread(self._credential.get_token, *scopes, claims=claims,
                                       tenant_id=tenant_id, enable_cae=enable_cae)

    async def get_token_info(self, *scopes: str,
                             options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        return await asyncio.to_thread(self._credential.get_token_info, *scopes, options=options)

    async def close(self) -> None:
        self._credential.close()

    async def __aenter__(self) -> AsyncCredential:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None = None,
                        exc_value: BaseException | None = None,
                        traceback: TracebackType | None = None) -> None:
        await self.close()


def expires_on(token: str) -> int:
    """When ``token`` expires (Unix time): its ``exp`` claim when it is a JWT (read, not
    verified: it is our own token from Entra ID, and this only schedules its renewal).
    Otherwise a lower bound: msal hands out no token within five minutes of its expiry,
    so an SDK that caches it asks again by then, and is answered from the cache."""
    fallback = int(time.time()) + MSAL_EXPIRY_MARGIN_SECONDS
    parts = token.split(".")
    if len(parts) != 3:
        return fallback
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return fallback
    exp = payload.get("exp") if isinstance(payload, dict) else None
    return exp if isinstance(exp, int) and not isinstance(exp, bool) else fallback
