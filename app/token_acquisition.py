"""Acquiring Graph tokens on behalf of the signed-in user (msal's OBO grant).

msal binds a token cache to a ``ConfidentialClientApplication`` at construction, and
``acquire_token_on_behalf_of`` never reads the cache. So per request we build a cheap
application around that user's cache (the OpenID configuration, the pooled session and
the credential are shared) and go: silent lookup → only on a miss, OBO → write back if
changed. The first look is offline and lock-free; anything that needs Entra ID runs
under the user's lock, so a burst of cold requests makes one call, whoever serves it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msal
import requests

from .authority import AUTHORITY_TIMEOUT, AuthorityUnavailable, OpenIdConfiguration
from .cache_store import Guard, TokenCacheStore
from .errors import ApiError, InsufficientClaims, ServiceUnavailable, bearer_challenge
from .protector import EntraAccessToken
from .settings import Settings
from .token_cache import TokenCacheCodec, UserTokenCache, home_account_id, partition_key

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER = 5
MAX_RETRY_AFTER = 300
USER_STATES = 10_000


class ConsentRequired(ApiError):
    status = 403
    error = "consent_required"
    description = "An administrator must grant this API consent to call Microsoft Graph."


class TokenAcquisitionFailed(ApiError):
    status = 502
    error = "token_acquisition_failed"
    description = "The identity provider refused to issue a token for Microsoft Graph."


class IdentityProviderUnavailable(ServiceUnavailable):
    description = "The identity provider is unavailable; retry later."


class _NetworkNeeded(Exception):
    """Raised by the offline client: the cache alone cannot answer."""


@dataclass
class _UserState:
    """Per-user HTTP state. msal's ``http_cache`` also holds its throttling entries, and
    for OBO those are not keyed by user; a shared one would replay one user's 429 or
    400 to everyone. Each user gets their own, plus their own Retry-After gate."""

    http_cache: dict[str, Any] = field(default_factory=dict)
    blocked_until: float = 0.0


class _CachedResponse:
    def __init__(self, text: str) -> None:
        self.status_code, self.text, self.headers = 200, text, {}

    def raise_for_status(self) -> None:
        return None


class _MsalHttpClient:
    """msal's HTTP client for one request: the process's pooled session and timeouts,
    the cached OpenID configuration (so construction is free), and the user's gate."""

    def __init__(
        self,
        session: requests.Session,
        metadata: OpenIdConfiguration,
        user: _UserState,
        offline: bool,
    ) -> None:
        self._session, self._metadata, self._user, self._offline = session, metadata, user, offline

    def get(self, url: str, params: Any = None, headers: Any = None, **_: Any) -> Any:
        if not params and url.lower() == self._metadata.url.lower():
            return _CachedResponse(self._metadata.text())
        if self._offline:
            raise _NetworkNeeded()
        return self._send("GET", url, params=params, headers=headers)

    def post(self, url: str, params: Any = None, data: Any = None, headers: Any = None,
             **_: Any) -> Any:
        if self._offline:
            raise _NetworkNeeded()
        wait = self._user.blocked_until - time.monotonic()
        if wait > 0:
            raise IdentityProviderUnavailable(retry_after=int(wait) + 1)
        return self._send("POST", url, params=params, data=data, headers=headers)

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            response = self._session.request(method, url, timeout=AUTHORITY_TIMEOUT, **kwargs)
        except requests.RequestException as exc:
            log.error("token endpoint unreachable: %s", type(exc).__name__)
            raise IdentityProviderUnavailable() from None
        if response.status_code == 429 or response.status_code >= 500:
            retry_after = _retry_after(response.headers.get("Retry-After"))
            if response.status_code == 429:
                self._user.blocked_until = time.monotonic() + retry_after
            log.warning("token endpoint answered HTTP %d", response.status_code)
            raise IdentityProviderUnavailable(retry_after=retry_after)
        return response

    def close(self) -> None:  # the session outlives this client
        return None


class OnBehalfOfTokenProvider:
    """Graph access tokens for the caller of the current request."""

    def __init__(
        self,
        settings: Settings,
        store: TokenCacheStore,
        codec: TokenCacheCodec,
        session: requests.Session,
        metadata: OpenIdConfiguration,
    ) -> None:
        self._settings = settings
        self._scopes = list(settings.graph_scopes)
        self._store, self._codec = store, codec
        self._session, self._metadata = session, metadata
        self._users: OrderedDict[str, _UserState] = OrderedDict()
        self._users_lock = threading.Lock()

    def acquire_token(self, user: EntraAccessToken, claims_challenge: str | None = None) -> str:
        """A Graph token for ``user``; with ``claims_challenge``, always a fresh one."""
        partition = partition_key(user.oid, user.tid)
        if claims_challenge is None:
            cache = self._load(partition, user)
            try:
                result = self._silent(self._application(cache, partition, offline=True), user)
            except _NetworkNeeded:
                result = None
            if result:
                return result["access_token"]
        with self._store.lock(partition) as guard:
            cache = self._load(partition, user)  # another request may have filled it
            app = self._application(cache, partition, offline=False)
            result = None if claims_challenge else self._silent(app, user)
            if not result:
                log.info("on-behalf-of exchange for partition %s", partition)
                result = app.acquire_token_on_behalf_of(
                    user.raw, self._scopes, claims_challenge=claims_challenge
                )
            self._save_if_changed(partition, cache, guard)
        return _access_token_or_raise(result, partition)

    def _silent(self, app: msal.ConfidentialClientApplication,
                user: EntraAccessToken) -> dict[str, Any] | None:
        wanted = home_account_id(user.oid, user.tid)
        account = next(
            (a for a in app.get_accounts() if a.get("home_account_id") == wanted), None
        )
        return app.acquire_token_silent(self._scopes, account) if account else None

    def _application(self, cache: UserTokenCache, partition: str,
                     offline: bool) -> msal.ConfidentialClientApplication:
        user_state = self._user_state(partition)
        try:
            return msal.ConfidentialClientApplication(
                self._settings.client_id,
                client_credential=self._settings.client_credential,
                authority=self._settings.authority,
                token_cache=cache,
                http_client=_MsalHttpClient(self._session, self._metadata, user_state, offline),
                http_cache=user_state.http_cache,
                instance_discovery=False,
            )
        except AuthorityUnavailable:
            raise IdentityProviderUnavailable() from None

    def _load(self, partition: str, user: EntraAccessToken) -> UserTokenCache:
        cache = UserTokenCache()
        blob = self._store.load(partition)
        serialized = self._codec.open(partition, blob) if blob else None
        if serialized:
            try:
                cache.deserialize(serialized)
            except ValueError:
                log.warning("token cache for partition %s is not JSON; ignoring it", partition)
                return UserTokenCache()
            if cache.foreign_accounts(home_account_id(user.oid, user.tid)):
                log.warning("token cache for partition %s holds another account; ignoring it",
                            partition)
                return UserTokenCache()
        return cache

    def _save_if_changed(self, partition: str, cache: UserTokenCache, guard: Guard) -> None:
        if cache.has_state_changed:
            self._store.save(partition, self._codec.seal(partition, cache.serialize()), guard)

    def _user_state(self, partition: str) -> _UserState:
        with self._users_lock:
            state = self._users.pop(partition, None) or _UserState()
            self._users[partition] = state
            while len(self._users) > USER_STATES:
                self._users.popitem(last=False)
            return state


def _access_token_or_raise(result: dict[str, Any], partition: str) -> str:
    if "access_token" in result:
        return result["access_token"]
    error = str(result.get("error", ""))
    codes = [c for c in result.get("error_codes") or [] if isinstance(c, int)]
    log.warning(
        "token request for partition %s failed: %s %s (correlation id %s)",
        partition, error, codes, result.get("correlation_id"),
    )
    claims = result.get("claims")
    if (error in ("interaction_required", "invalid_grant") and isinstance(claims, str)
            and InsufficientClaims.is_claims_json(claims)):
        raise InsufficientClaims(claims)
    if 65001 in codes or "consent_required" in (error, result.get("suberror")):
        raise ConsentRequired()
    if error == "interaction_required":
        raise ApiError(
            "The user must sign in again interactively.",
            status=401,
            error="interaction_required",
            headers={"WWW-Authenticate": bearer_challenge(error="invalid_token")},
        )
    if error == "invalid_grant":
        raise ApiError(
            "The identity provider no longer accepts this access token; get a new one.",
            status=401,
            error="invalid_token",
            headers={"WWW-Authenticate": bearer_challenge(error="invalid_token")},
        )
    if error == "temporarily_unavailable":
        raise IdentityProviderUnavailable()
    raise TokenAcquisitionFailed()


def _retry_after(value: str | None) -> int:
    try:
        seconds = int(value) if value is not None else DEFAULT_RETRY_AFTER
    except ValueError:
        seconds = DEFAULT_RETRY_AFTER
    return min(max(seconds, 1), MAX_RETRY_AFTER)

