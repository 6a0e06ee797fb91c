"""Tokens for the API itself: client credentials, for downstream calls no user is behind.

Microsoft.Identity.Web's ``GetAccessTokenForAppAsync``: a nightly job, a CLI command or a
route answering a daemon calls another API *as the app*. One token serves every caller of
a tenant and resource, so it is worth more care than a user's:

* **Cached in two tiers.** Each worker keeps the tokens it has (no I/O on a hit); Redis
  keeps one entry per tenant and resource, sealed with the token cache's codec (bound to
  its partition, encrypted with ``TOKEN_CACHE_KEYS``) under a hashed partition key: the
  key name says nothing about the app, the tenant or the token.
* **Single flight everywhere.** Concurrent callers in a worker share one leader
  (``SingleFlight``); leaders in other workers and instances queue on the partition's
  Redis lock and, once they hold it, find the leader's token in Redis instead of asking
  Entra ID again.
* **Renewed ahead.** A token is due for renewal ``RENEW_AHEAD_SECONDS`` before it expires
  (earlier if Entra ID says so with ``refresh_in``). The request that finds it due is
  still served that token, and starts the renewal in the background: no caller waits on
  Entra ID while a valid token exists. A failed renewal is retried
  ``RENEWAL_RETRY_SECONDS`` later, by the next request that finds the token still due.
* **Served through outages.** While Entra ID or Redis is down, a token is served until
  ``EXPIRY_MARGIN_SECONDS`` before its expiry.

The token request itself is msal's ``acquire_token_for_client`` over the same HTTP client
as the On-Behalf-Of exchanges (``MsalHttpClient``: pooled session, bounded timeouts,
counted in the token-endpoint metrics), with the API's own credential.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from typing import Any, NamedTuple

import msal
import requests

from .authority import AuthorityUnavailable, TenantConfigurations
from .bulkhead import Deadline, SingleFlight, WaitingRoom
from .cache_store import Guard, TokenCacheStore, entry_under_lock
from .credentials import CREDENTIAL_ERROR_CODES, ClientCredential
from .errors import (
    IdentityProviderUnavailable,
    TokenAcquisitionBusy,
    TokenAcquisitionFailed,
)
from .metrics import Metrics
from .msal_http import EntraUnavailable, MsalHttpClient, within
from .settings import Settings
from .store_errors import LockBusy, StoreUnavailable
from .token_cache import TokenCacheCodec
from .worker_state import entra_pace

log = logging.getLogger(__name__)

#: A token is renewed from this long before it expires (msal's own margin for user tokens).
RENEW_AHEAD_SECONDS = 5 * 60
#: A token this close to its expiry is never handed out: it could expire on its way.
EXPIRY_MARGIN_SECONDS = 30
#: After a background renewal (failed, or one that brought a token already due), the next
#: one waits this long: an outage or a tenant issuing short-lived tokens is no storm.
RENEWAL_RETRY_SECONDS = 10
DEFAULT_SUFFIX = "/.default"


class AppTokenKey(NamedTuple):
    tenant: str
    resource: str


@dataclass(frozen=True)
class AppToken:
    """One app token and its timetable (wall-clock seconds, as ``exp`` is)."""

    access_token: str
    expires_at: float
    renew_at: float
    fetched_at: float

    def usable(self, now: float) -> bool:
        return now < self.expires_at - EXPIRY_MARGIN_SECONDS

    def due(self, now: float) -> bool:
        return now >= self.renew_at

    @classmethod
    def from_result(cls, result: dict[str, Any], asked_at: float) -> AppToken | None:
        """From msal's answer, or None when it holds no token (or no usable lifetime)."""
        token, expires_in = result.get("access_token"), result.get("expires_in")
        if not isinstance(token, str) or not isinstance(expires_in, int) or isinstance(expires_in, bool):
            return None
        expires_at = asked_at + expires_in
        renew_at = expires_at - RENEW_AHEAD_SECONDS
        refresh_in = result.get("refresh_in")
        if isinstance(refresh_in, int) and not isinstance(refresh_in, bool):
            renew_at = min(renew_at, asked_at + refresh_in)
        return cls(token, expires_at, renew_at, asked_at)

    def serialized(self) -> str:
        # Compact: the codec seals what it is given (TokenCacheCodec.seal) as it is.
        return json.dumps({"access_token": self.access_token, "expires_at": self.expires_at,
                           "renew_at": self.renew_at, "fetched_at": self.fetched_at}, separators=(",", ":"))

    @classmethod
    def parse(cls, serialized: str) -> AppToken | None:
        """None when ``serialized`` is not an entry of ours (then it is replaced)."""
        try:
            fields = json.loads(serialized)
            token = cls(fields["access_token"], float(fields["expires_at"]), float(fields["renew_at"]),
                        float(fields["fetched_at"]))
        except (ValueError, TypeError, KeyError, RecursionError):
            return None
        return token if isinstance(token.access_token, str) else None


def app_partition(client_id: str, key: AppTokenKey) -> str:
    """The store partition of the API's token for ``key``: a SHA-256, like a user's, of a
    string no user's partition can have (those hash ``<oid>.<tid>``)."""
    return hashlib.sha256(f"app:{client_id}:{key.tenant}:{key.resource}".lower().encode()).hexdigest()


def resource_of(scopes: Sequence[str]) -> str:
    """The resource of a client-credentials request: ``scopes`` must be exactly one
    ``<resource>/.default`` (Entra ID refuses anything else for this grant)."""
    if isinstance(scopes, str):
        raise TypeError("scopes must be a list of scopes, not one string")
    scopes = list(scopes)
    if len(scopes) != 1 or not isinstance(scopes[0], str) or not scopes[0].endswith(DEFAULT_SUFFIX) \
            or len(scopes[0]) == len(DEFAULT_SUFFIX):
        raise ValueError("app tokens take exactly one scope, <resource>/.default "
                         "(e.g. https://graph.microsoft.com/.default)")
    return scopes[0][: -len(DEFAULT_SUFFIX)]


class AppTokenProvider:
    """Client-credentials tokens of the API, per tenant and resource (see the module)."""

    def __init__(self, settings: Settings, store: TokenCacheStore, codec: TokenCacheCodec,
                 session: requests.Session, tenants: TenantConfigurations,
                 credential: ClientCredential, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._store, self._codec = store, codec
        self._credential = credential
        timeout = settings.entra_timeout
        # One client for all app tokens: its Retry-After gate is the app's, as throttling is.
        self._http = MsalHttpClient(session, tenants, timeout, metrics or Metrics())
        self._tokens: dict[AppTokenKey, AppToken] = {}
        self._next_attempt: dict[AppTokenKey, float] = {}  # monotonic: no renewal before
        self._scheduled: set[AppTokenKey] = set()
        self._lock = threading.Lock()
        # App tokens wait in a room of their own: a slow renewal must not take the seats
        # that users' exchanges wait in (and the reverse).
        self._waiting_room = WaitingRoom(settings.entra_max_waiting_threads, entra_pace())
        self._flights: SingleFlight[AppToken] = SingleFlight(self._waiting_room)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid = 0

    def tenant_of(self, tenant: str | None) -> str:
        """The tenant to ask: ``tenant`` (a GUID), or the API's own. Raises ``ValueError``
        for a tenant the settings do not serve (or none for a multi-tenant API)."""
        settings = self._settings
        if tenant is None:
            if settings.multi_tenant:
                raise ValueError("a multi-tenant API must name the tenant of its app token "
                                 "(acquire_app_token(scopes, tenant=<tenant id>))")
            return settings.tenant_id
        try:
            tid = str(uuid.UUID(tenant))
        except (ValueError, TypeError, AttributeError):
            raise ValueError("tenant must be a tenant id (GUID)") from None
        if not settings.tenant_allowed(tid):
            raise ValueError("tenant is not one this API serves (AZURE_TENANT_ID / AZURE_ALLOWED_TENANTS)")
        return tid

    def acquire(self, scopes: Sequence[str], tenant: str | None = None,
                claims_challenge: str | None = None) -> str:
        """The API's access token for ``scopes`` (one ``<resource>/.default``) in ``tenant``.
        With ``claims_challenge``, always a new one (a downstream API's claims challenge)."""
        key = AppTokenKey(self.tenant_of(tenant), resource_of(scopes))
        if claims_challenge is None:
            token = self._cached(key)
            if token is not None:
                return token.access_token
        deadline = Deadline(self._settings.token_acquisition_timeout)
        token, _ = self._flights.run((key, claims_challenge),
                                     lambda: self._renew(key, None, claims_challenge, deadline), deadline)
        return token.access_token

    # --- the cache ---------------------------------------------------------------------------
    def _cached(self, key: AppTokenKey) -> AppToken | None:
        """A usable token from memory or Redis, never waiting on Entra ID; a due one starts
        its renewal in the background. None: there is none, the caller must wait for one."""
        now = time.time()
        with self._lock:
            token = self._tokens.get(key)
        if token is not None and not token.due(now):
            return token  # the hot path: no I/O
        if token is not None and not self._may_attempt(key):
            return token if token.usable(now) else None  # a renewal is running or resting
        if self._store.healthy or token is None:
            stored = self._load(key)
            if stored is not None and (token is None or stored.fetched_at > token.fetched_at):
                token = self._keep(key, stored)
        if token is None or not token.usable(now):
            return None
        if token.due(now):
            self._renew_in_background(key, token)
        return token

    def _may_attempt(self, key: AppTokenKey) -> bool:
        with self._lock:
            return key not in self._scheduled and time.monotonic() >= self._next_attempt.get(key, 0.0)

    def _keep(self, key: AppTokenKey, token: AppToken) -> AppToken:
        with self._lock:
            held = self._tokens.get(key)
            if held is None or token.fetched_at >= held.fetched_at:
                self._tokens[key] = token
                return token
            return held

    def _load(self, key: AppTokenKey, guard: Guard | None = None) -> AppToken | None:
        """The token in Redis, if it is ours and readable; None on a miss or while Redis is
        down. Under the partition's lock (``guard``, just taken), the entry the store read
        as it took it (``entry_under_lock``)."""
        partition = app_partition(self._settings.client_id, key)
        try:
            entry = self._store.load(partition) if guard is None else \
                entry_under_lock(self._store, partition, guard)
        except StoreUnavailable:
            return None
        if entry is None:
            return None
        serialized = self._codec.open(partition, entry.blob)
        token = AppToken.parse(serialized) if serialized is not None else None
        if serialized is not None and token is None:
            log.warning("app token entry for partition %s is unreadable; it will be replaced", partition)
        return token

    # --- renewal -------------------------------------------------------------------------------
    def _renew_in_background(self, key: AppTokenKey, seen: AppToken) -> None:
        with self._lock:
            if key in self._scheduled:
                return
            self._scheduled.add(key)
            executor = self._executor_here()
        log.info("app token for %s is due; renewing it in the background", key.resource)
        try:
            executor.submit(self._background, key, seen)
        except RuntimeError:  # the interpreter is shutting down
            with self._lock:
                self._scheduled.discard(key)

    def _executor_here(self) -> ThreadPoolExecutor:
        """This process's renewal threads (made on first use: a forked worker makes its own)."""
        if self._executor is None or self._executor_pid != os.getpid():
            self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flask-obo-app-token")
            self._executor_pid = os.getpid()
        return self._executor

    def _background(self, key: AppTokenKey, seen: AppToken) -> None:
        deadline = Deadline(self._settings.token_acquisition_timeout)
        try:
            self._flights.run((key, None), lambda: self._renew(key, seen, None, deadline), deadline)
        except Exception as exc:  # served from the valid token meanwhile; logged, retried later
            log.warning("background renewal of the app token for %s failed: %s",
                        key.resource, type(exc).__name__)
        finally:
            with self._lock:
                self._scheduled.discard(key)
                self._next_attempt[key] = time.monotonic() + RENEWAL_RETRY_SECONDS

    def _renew(self, key: AppTokenKey, seen: AppToken | None, claims_challenge: str | None,
               deadline: Deadline) -> AppToken:
        """Under the partition's Redis lock: the token another leader just stored, else a new
        one from Entra ID, stored for everyone. ``seen``: the token the renewal replaces."""
        partition = app_partition(self._settings.client_id, key)
        with self._partition_lock(partition, deadline) as guard:
            stored = self._load(key, guard) if guard is not None and claims_challenge is None else None
            now = time.time()
            newer = seen is None or (stored is not None and stored.fetched_at > seen.fetched_at)
            if stored is not None and stored.usable(now) and newer and (
                    seen is not None or not stored.due(now)):
                return self._keep(key, stored)  # another leader renewed it meanwhile
            with within(deadline):
                token = self._from_entra(key, claims_challenge)
            self._save(partition, token, guard)
        return self._keep(key, token)

    @contextmanager
    def _partition_lock(self, partition: str, deadline: Deadline) -> Iterator[Guard | None]:
        """The partition's store lock; None (single flight per process only) while Redis is
        down. A lock that stays taken until the deadline is the caller's answer:
        ``TokenAcquisitionBusy`` (503)."""
        with ExitStack() as stack:
            try:
                guard: Guard | None = stack.enter_context(self._store.lock(partition, deadline))
            except LockBusy:
                raise TokenAcquisitionBusy() from None
            except StoreUnavailable:
                log.warning("renewing an app token without the shared lock: the store is down")
                guard = None
            yield guard

    def _save(self, partition: str, token: AppToken, guard: Guard | None) -> None:
        """Store the token for everyone, while this leader still holds the lock. Without
        the lock (Redis was down) it stays in this worker's memory: other workers fetch
        their own, and the next renewal stores one."""
        if guard is None:
            return
        with suppress(StoreUnavailable):
            self._store.save(partition, self._codec.seal(partition, token.serialized()), guard)

    def _from_entra(self, key: AppTokenKey, claims_challenge: str | None) -> AppToken:
        asked_at = time.time()
        scopes = [key.resource + DEFAULT_SUFFIX]
        try:
            result = self._client_app(key.tenant).acquire_token_for_client(
                scopes, claims_challenge=claims_challenge)
            codes = set(result.get("error_codes") or ())
            if codes & CREDENTIAL_ERROR_CODES and self._credential.reload():
                log.warning("Entra ID refused the API's credential (%s); retrying with the reloaded one",
                            sorted(codes & CREDENTIAL_ERROR_CODES))
                result = self._client_app(key.tenant).acquire_token_for_client(
                    scopes, claims_challenge=claims_challenge)
        except EntraUnavailable as exc:
            raise IdentityProviderUnavailable(retry_after=exc.retry_after) from None
        token = AppToken.from_result(result, asked_at)
        if token is None:
            error = str(result.get("error", ""))
            log.warning("client credentials for %s failed: %s %s (correlation id %s)", key.resource,
                        error, [c for c in result.get("error_codes") or [] if isinstance(c, int)],
                        result.get("correlation_id"))
            if error == "temporarily_unavailable":
                raise IdentityProviderUnavailable()
            raise TokenAcquisitionFailed()
        log.info("client credentials: a new app token for %s", key.resource)
        return token

    def _client_app(self, tenant: str) -> msal.ConfidentialClientApplication:
        """A new msal application with an empty cache, so that the call goes to Entra ID:
        this provider is the cache. (Built once per renewal: about once an hour.)"""
        try:
            return msal.ConfidentialClientApplication(
                self._settings.client_id,
                client_credential=self._credential.for_msal(),
                authority=f"{self._settings.authority_host}/{tenant}",
                token_cache=msal.TokenCache(),
                http_client=self._http,
                instance_discovery=False,
                client_capabilities=list(self._settings.client_capabilities) or None,
            )
        except AuthorityUnavailable:
            raise IdentityProviderUnavailable() from None

