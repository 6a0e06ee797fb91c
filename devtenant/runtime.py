"""Per-app runtime state: directory, keys, minted refresh tokens, authorization codes,
sign-in sessions, counters, switches.

One :class:`Runtime` hangs off ``app.extensions["devtenant"]`` so several apps (e.g.
one per test) can coexist in a process without sharing state. Everything mutable is
guarded by locks because the server is threaded.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from flask import current_app, g, has_app_context, request

from devtenant import pki
from devtenant.directory import App, Directory, User
from devtenant.keys import KeyStore
from devtenant.revocation import RevocationStore
from devtenant.state import StatePaths
from devtenant.tokens import TokenMinter, v1_issuer_for

REFRESH_TOKEN_LIFETIME = 90 * 24 * 3600
#: Entra: refresh tokens of the 'Single-Page Application' client-type live 24 h, and
#: rotated ones keep the first one's expiry (the SPA must sign in again daily).
SPA_REFRESH_TOKEN_LIFETIME = 24 * 3600
REFRESH_TOKEN_PREFIX = "1.AdevT"
#: Authorization codes: single-use, 10 minutes (Entra's are shorter-lived still).
AUTHORIZATION_CODE_LIFETIME = 600
AUTHORIZATION_CODE_PREFIX = "1.AdevC"
TOKEN_COUNTER_KEYS = (
    "authorization_code", "on_behalf_of", "refresh_token", "client_credentials", "other", "errors",
)  # fmt: skip
GRAPH_TRACEPARENTS_KEPT = 100


@dataclass(frozen=True)
class Principal:
    """The signed-in user behind a delegated token, as Authlib's ``request.user``.

    ``amr`` travels from the OBO assertion into refreshed tokens, so a user who did
    MFA keeps satisfying the MFA policy when the API refreshes.
    """

    user: User
    amr: tuple[str, ...] = ()


@dataclass
class RefreshRecord:
    """A refresh token bound to client + user + granted (canonical) scope.

    ``spa``: issued to a SPA redirect URI, so only redeemable cross-origin, and its
    rotated successors inherit ``expires_at``.
    """

    client_id: str
    principal: Principal
    scope: str
    expires_at: float
    spa: bool = False
    tenant_id: str = ""
    issued_at: float = field(default_factory=time.time)

    # --- authlib TokenMixin ---------------------------------------------------------
    def check_client(self, client: App) -> bool:
        return client.client_id == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def is_expired(self) -> bool:
        return time.time() > self.expires_at

    def is_revoked(self) -> bool:
        return False


@dataclass
class AuthorizationCodeRecord:
    """An authorization code bound to client, redirect URI, PKCE challenge and nonce."""

    client_id: str
    redirect_uri: str
    scope: str
    principal: Principal
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    spa: bool
    expires_at: float
    redeemed: bool = False

    # --- authlib AuthorizationCodeMixin (+ the attributes CodeChallenge reads) -------
    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def is_expired(self) -> bool:
        return time.time() > self.expires_at


@dataclass(frozen=True)
class SignInSession:
    """The dev tenant's browser session (cookie): who signed in, and how."""

    principal: Principal
    auth_time: int


@dataclass
class Counters:
    """Thread-safe request counters exposed at ``/_devtenant/counters``."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    token: Counter[str] = field(default_factory=Counter)
    token_errors: Counter[str] = field(default_factory=Counter)
    graph: Counter[str] = field(default_factory=Counter)
    graph_errors: Counter[str] = field(default_factory=Counter)
    tasks_api: Counter[str] = field(default_factory=Counter)
    tasks_api_errors: Counter[str] = field(default_factory=Counter)
    #: Client certificates that signed an accepted assertion, by SHA-256 thumbprint.
    certificates: Counter[str] = field(default_factory=Counter)
    #: Tokens the managed identity endpoint issued, by the identity's client id.
    managed_identity: Counter[str] = field(default_factory=Counter)
    #: The W3C ``traceparent`` header of Graph's latest calls (None: the call had none),
    #: so tests see that a caller's trace went on to Graph.
    graph_traceparents: deque[str | None] = field(
        default_factory=lambda: deque(maxlen=GRAPH_TRACEPARENTS_KEPT))

    def count_managed_identity(self, client_id: str) -> None:
        with self._lock:
            self.managed_identity[client_id] += 1

    def count_certificate(self, thumbprint: str) -> None:
        with self._lock:
            self.certificates[thumbprint] += 1

    def count_token(self, kind: str, error: str | None = None) -> None:
        with self._lock:
            self.token[kind] += 1
            if error:
                self.token["errors"] += 1
                self.token_errors[error] += 1

    def _count_call(self, calls: Counter[str], errors: Counter[str], path: str, status: int) -> None:
        with self._lock:
            calls[path] += 1
            if status >= 400:
                errors[str(status)] += 1

    def count_graph(self, path: str, status: int, traceparent: str | None = None) -> None:
        self._count_call(self.graph, self.graph_errors, path, status)
        with self._lock:
            self.graph_traceparents.append(traceparent)

    def count_tasks_api(self, path: str, status: int) -> None:
        self._count_call(self.tasks_api, self.tasks_api_errors, path, status)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "token": {k: self.token.get(k, 0) for k in TOKEN_COUNTER_KEYS},
                "token_errors": dict(self.token_errors),
                "graph": {
                    "/v1.0/me": 0,
                    "/v1.0/me/manager": 0,
                    **self.graph,
                    "errors": sum(self.graph_errors.values()),
                },
                "graph_errors": dict(self.graph_errors),
                "graph_traceparents": list(self.graph_traceparents),
                "tasks_api": {
                    "/tasks-api/v1/me/tasks": 0,
                    **self.tasks_api,
                    "errors": sum(self.tasks_api_errors.values()),
                },
                "tasks_api_errors": dict(self.tasks_api_errors),
                "certificates": dict(self.certificates),
                "managed_identity": dict(self.managed_identity),
            }

    def reset(self) -> None:
        with self._lock:
            for counter in (value for value in vars(self).values() if isinstance(value, Counter)):
                counter.clear()
            self.graph_traceparents.clear()


class Runtime:
    """Everything a request handler needs, built once per Flask app."""

    def __init__(self, paths: StatePaths, public_url: str | None, short_scopes: bool) -> None:
        self.paths = paths
        self.public_url = public_url.rstrip("/") if public_url else None
        self.short_scopes = short_scopes
        #: Flagged users (``mfa_required``) do MFA when they sign in. Off (a test switch,
        #: ``/_devtenant/mfa``), they sign in with a password alone and Conditional Access
        #: bites later, at the OBO for Graph: the claims challenge an SPA has to answer.
        self.mfa_at_sign_in = True
        #: Seconds that issued access tokens live (``/_devtenant/config``); None: Entra's
        #: randomised 60-90 minutes. Short-lived, a client finds its cached token aged at
        #: once and must redeem its refresh token: "two hours later" without a clock.
        self.access_token_lifetime: int | None = None
        #: Client-credentials tokens: their lifetime in seconds (None: Entra's 60-90 min) and
        #: how long the token endpoint takes to issue one (``/_devtenant/app-tokens``), so a
        #: test can hand out a token already close to its expiry and watch a slow renewal.
        self.app_token_lifetime: int | None = None
        self.app_token_delay = 0.0
        self.directories = Directory.load_all(paths.root)
        self.home = self.directories[0]
        self.keys = KeyStore(paths.signing_keys)
        self.revocations = RevocationStore(paths.revocations)
        self.minters = {
            d.tenant_id: TokenMinter(self.keys, d) for d in self.directories
        }
        self.federation_keys = {
            name: KeyStore(paths.federation_keys(name)) for name in self.home.federation_issuers
        }
        self.counters = Counters()
        self._lock = threading.Lock()
        self._refresh: dict[str, RefreshRecord] = {}
        self._codes: dict[str, AuthorizationCodeRecord] = {}
        self._sessions: dict[str, SignInSession] = {}

    # --- tenants ---------------------------------------------------------------------
    def tenant(self, ref: str | None) -> Directory | None:
        """A hosted tenant by GUID or verified domain."""
        return next((d for d in self.directories if ref and d.is_tenant(ref)), None)

    @property
    def directory(self) -> Directory:
        """The tenant of the current request (its URL's tenant segment, or for Graph the
        token's ``tid``); the home tenant outside a request or when none was chosen."""
        if has_app_context():
            chosen = g.get("devtenant_tid")
            if chosen:
                return self.tenant(chosen) or self.home
        return self.home

    @property
    def minter(self) -> TokenMinter:
        return self.minters[self.directory.tenant_id]

    @property
    def tenant_ids(self) -> list[str]:
        return [d.tenant_id for d in self.directories]

    def apps(self, client_id: str) -> list[App]:
        """The app ``client_id`` in every hosted tenant (each has its own copy)."""
        return [app for d in self.directories if (app := d.client(client_id)) is not None]

    def add_certificate(self, client_id: str, certificate: x509.Certificate) -> bool:
        """Register one more certificate on the app (as uploading one to the app
        registration does; Entra accepts any registered one). False: unknown app."""
        apps = self.apps(client_id)
        with self._lock:
            for app in apps:
                if certificate not in app.certificates:  # a new list: readers iterate the old one
                    app.certificates = [*app.certificates, certificate]
        return bool(apps)

    def remove_certificate(self, client_id: str, thumbprint: str) -> bool:
        """Un-register the certificate with this SHA-256 (or SHA-1) thumbprint."""
        removed = False
        with self._lock:
            for app in self.apps(client_id):
                kept = [c for c in app.certificates
                        if thumbprint not in {pki.thumbprint(c, "sha256"), pki.thumbprint(c, "sha1")}]
                removed |= len(kept) != len(app.certificates)
                app.certificates = kept
        return removed

    @staticmethod
    def use_tenant(tenant_id: str) -> None:
        """Scope the rest of this request to ``tenant_id``."""
        g.devtenant_tid = tenant_id

    @staticmethod
    def new_refresh_token() -> str:
        """Opaque value; it only means something once :meth:`save_refresh_token` ran."""
        return REFRESH_TOKEN_PREFIX + secrets.token_urlsafe(48)

    def save_refresh_token(
        self,
        token: str,
        client_id: str,
        principal: Principal,
        scope: str,
        *,
        spa: bool = False,
        expires_at: float | None = None,
    ) -> RefreshRecord:
        if expires_at is None:
            lifetime = SPA_REFRESH_TOKEN_LIFETIME if spa else REFRESH_TOKEN_LIFETIME
            expires_at = time.time() + lifetime
        record = RefreshRecord(client_id, principal, scope, expires_at, spa, self.directory.tenant_id)
        with self._lock:
            self._refresh[token] = record
        return record

    def find_refresh_token(self, token: str) -> RefreshRecord | None:
        with self._lock:
            record = self._refresh.get(token)
        return None if record is None or record.is_expired() else record

    def revoke_refresh_token(self, record: RefreshRecord) -> None:
        """Rotation: once redeemed, a refresh token cannot be redeemed again."""
        with self._lock:
            for token, candidate in list(self._refresh.items()):
                if candidate is record:
                    del self._refresh[token]

    # --- authorization codes -----------------------------------------------------------
    def save_code(self, record: AuthorizationCodeRecord) -> str:
        code = AUTHORIZATION_CODE_PREFIX + secrets.token_urlsafe(48)
        now = time.time()
        with self._lock:
            for stale in [c for c, r in self._codes.items() if r.expires_at < now]:
                del self._codes[stale]
            self._codes[code] = record
        return code

    def find_code(self, code: str) -> AuthorizationCodeRecord | None:
        """The record even when redeemed or expired: the grant tells those apart."""
        with self._lock:
            return self._codes.get(code)

    def redeem_code(self, record: AuthorizationCodeRecord) -> bool:
        """Single use (check-and-set, so two racing redemptions cannot both win); a
        redeemed code is kept until it expires only to say so."""
        with self._lock:
            if record.redeemed:
                return False
            record.redeemed = True
            return True

    # --- sign-in sessions ------------------------------------------------------------
    def start_session(self, principal: Principal) -> str:
        session_id = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[session_id] = SignInSession(principal, int(time.time()))
        return session_id

    def find_session(self, session_id: str | None) -> SignInSession | None:
        with self._lock:
            return self._sessions.get(session_id or "")

    def end_session(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)


def current() -> Runtime:
    return current_app.extensions["devtenant"]


def base_url() -> str:
    """``--public-url`` if configured, else scheme://host[:port] as the client saw it."""
    configured = current().public_url
    return configured or request.host_url.rstrip("/")


def issuer() -> str:
    return f"{base_url()}/{current().directory.tenant_id}/v2.0"


def v1_issuer() -> str:
    return v1_issuer_for(base_url(), current().directory.tenant_id)
