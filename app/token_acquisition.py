"""Acquiring Graph tokens on behalf of the signed-in user (msal's OBO grant).

msal binds a token cache to a ``ConfidentialClientApplication`` at construction, and
``acquire_token_on_behalf_of`` never reads the cache. So each user gets, per process and
built on their first request, an application around their own cache object; every
request re-reads the user's blob from the store (other workers may have written it)
and goes: silent lookup → only on a miss, OBO → write back if changed. The first look
is offline and lock-free; anything that needs Entra ID runs under the user's store
lock, so a burst of cold requests makes one call, whichever worker or instance serves it.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msal
import requests

from .authority import AuthorityUnavailable, OpenIdConfiguration
from .cache_store import Guard, TokenCacheStore, held
from .errors import ApiError, InsufficientClaims, ServiceUnavailable, bearer_challenge
from .msal_http import EntraUnavailable, MsalHttpClient, NetworkNeeded
from .protector import EntraAccessToken
from .settings import Settings
from .token_cache import TokenCacheCodec, UserTokenCache, partition_key

log = logging.getLogger(__name__)

USER_SESSIONS = 512  # about 40 KiB each: the msal application and the user's cache


class ConsentRequired(ApiError):
    status = 403
    error = "consent_required"
    description = "An administrator must grant this API consent to call Microsoft Graph."


class IdentityProviderUnavailable(ServiceUnavailable):
    description = "The identity provider is unavailable; retry later."


class TokenAcquisitionFailed(ApiError):
    status = 502
    error = "token_acquisition_failed"
    description = "The identity provider refused to issue a token for Microsoft Graph."


class _UserSession:
    """One user's msal application in this process, and the store blob its cache holds.

    Per-user state also isolates throttling: msal's ``http_cache`` keeps its throttling
    entries, which for OBO are not keyed by user, so a shared one would replay one
    user's 429 or 400 to everyone.
    """

    def __init__(self, http: MsalHttpClient) -> None:
        self.lock = threading.Lock()
        self.http = http
        self.http_cache: dict[str, Any] = {}
        self.cache = UserTokenCache()
        self.blob: bytes | None = None  # what ``cache`` was last loaded from or saved as
        self.app: msal.ConfidentialClientApplication | None = None


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
        self._users: OrderedDict[str, _UserSession] = OrderedDict()
        self._users_lock = threading.Lock()
        _skip_msal_extension_probe()

    def acquire_token(self, user: EntraAccessToken, claims_challenge: str | None = None) -> str:
        """A Graph token for ``user``; with ``claims_challenge``, always a fresh one."""
        partition = partition_key(user.oid, user.tid)
        session = self._user_session(partition)
        with held(session.lock):  # one request per user at a time in this process
            if claims_challenge is None:
                self._load(session, partition, user)
                result = self._silent(session, user, offline=True)
                if result:
                    return result["access_token"]
            with self._store.lock(partition) as guard, _entra_unavailable_is_503():
                self._load(session, partition, user)  # another request may have filled it
                result = None if claims_challenge else self._silent(session, user)
                if not result:
                    log.info("on-behalf-of exchange for partition %s", partition)
                    result = self._app(session).acquire_token_on_behalf_of(
                        user.raw, self._scopes, claims_challenge=claims_challenge
                    )
                self._save_if_changed(session, partition, guard)
        return _access_token_or_raise(result, partition)

    def _silent(self, session: _UserSession, user: EntraAccessToken,
                offline: bool = False) -> dict[str, Any] | None:
        app = self._app(session)
        account = session.cache.account_of(user.oid, user.tid)
        if account is None:
            return None
        session.http.offline = offline
        try:
            return app.acquire_token_silent(self._scopes, account)
        except NetworkNeeded:  # expired or aging: renew under the lock
            return None
        finally:
            session.http.offline = False
            if session.cache.has_state_changed:  # e.g. msal dropped an expired token
                session.blob = None  # reload before the next use

    def _app(self, session: _UserSession) -> msal.ConfidentialClientApplication:
        if session.app is None:
            try:
                session.app = msal.ConfidentialClientApplication(
                    self._settings.client_id,
                    client_credential=self._settings.client_credential,
                    authority=self._settings.authority,
                    token_cache=session.cache,
                    http_client=session.http,
                    http_cache=session.http_cache,
                    instance_discovery=False,
                )
            except AuthorityUnavailable:
                raise IdentityProviderUnavailable() from None
        return session.app

    def _load(self, session: _UserSession, partition: str, user: EntraAccessToken) -> None:
        """Make ``session.cache`` hold what the store holds now (skipped if unchanged)."""
        blob = self._store.load(partition)
        if blob is not None and blob == session.blob:
            return
        serialized = self._codec.open(partition, blob) if blob else None
        try:
            session.cache.deserialize(serialized)
        except ValueError:
            log.warning("token cache for partition %s is not JSON; ignoring it", partition)
            session.cache.deserialize(None)
        if not session.cache.belongs_to(user.oid, user.tid):
            log.warning("token cache for partition %s holds another account; ignoring it", partition)
            session.cache.deserialize(None)
        session.blob = blob if serialized else None

    def _save_if_changed(self, session: _UserSession, partition: str, guard: Guard) -> None:
        if not session.cache.has_state_changed:
            return
        blob = self._codec.seal(partition, session.cache.serialize())
        session.blob = blob if self._store.save(partition, blob, guard) else None

    def _user_session(self, partition: str) -> _UserSession:
        with self._users_lock:
            session = self._users.pop(partition, None) or _UserSession(
                MsalHttpClient(self._session, self._metadata)
            )
            self._users[partition] = session
            while len(self._users) > USER_SESSIONS:
                self._users.popitem(last=False)
            return session


@contextmanager
def _entra_unavailable_is_503() -> Iterator[None]:
    try:
        yield
    except EntraUnavailable as exc:
        raise IdentityProviderUnavailable(retry_after=exc.retry_after) from None


def _skip_msal_extension_probe() -> None:
    """msal tries ``import msal_extensions`` on every application it builds; when that
    package is absent each failed import searches sys.path (about 40% of building an
    application per request). A ``None`` entry makes the import fail at once, as it
    would anyway."""
    try:
        import msal_extensions  # noqa: F401
    except ImportError:
        sys.modules.setdefault("msal_extensions", None)  # type: ignore[arg-type]


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

