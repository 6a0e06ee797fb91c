"""Per-app runtime state: directory, keys, minted refresh tokens, counters, switches.

One :class:`Runtime` hangs off ``app.extensions["devtenant"]`` so several apps (e.g.
one per test) can coexist in a process without sharing state. Everything mutable is
guarded by locks because the server is threaded.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from flask import current_app, request

from devtenant.directory import App, Directory, User
from devtenant.keys import KeyStore
from devtenant.state import StatePaths
from devtenant.tokens import TokenMinter

REFRESH_TOKEN_LIFETIME = 90 * 24 * 3600
REFRESH_TOKEN_PREFIX = "1.AdevT"
TOKEN_COUNTER_KEYS = ("on_behalf_of", "refresh_token", "client_credentials", "other", "errors")


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
    """A refresh token bound to client + user + granted (canonical) scope."""

    client_id: str
    principal: Principal
    scope: str
    expires_at: float

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
class Counters:
    """Thread-safe request counters exposed at ``/_devtenant/counters``."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    token: Counter[str] = field(default_factory=Counter)
    token_errors: Counter[str] = field(default_factory=Counter)
    graph: Counter[str] = field(default_factory=Counter)
    graph_errors: Counter[str] = field(default_factory=Counter)
    tasks_api: Counter[str] = field(default_factory=Counter)
    tasks_api_errors: Counter[str] = field(default_factory=Counter)

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

    def count_graph(self, path: str, status: int) -> None:
        self._count_call(self.graph, self.graph_errors, path, status)

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
                "tasks_api": {
                    "/tasks-api/v1/me/tasks": 0,
                    **self.tasks_api,
                    "errors": sum(self.tasks_api_errors.values()),
                },
                "tasks_api_errors": dict(self.tasks_api_errors),
            }

    def reset(self) -> None:
        with self._lock:
            for counter in (value for value in vars(self).values() if isinstance(value, Counter)):
                counter.clear()


class Runtime:
    """Everything a request handler needs, built once per Flask app."""

    def __init__(self, paths: StatePaths, public_url: str | None, short_scopes: bool) -> None:
        self.paths = paths
        self.public_url = public_url.rstrip("/") if public_url else None
        self.short_scopes = short_scopes
        self.directory = Directory.load(paths.root)
        self.keys = KeyStore(paths.signing_keys)
        self.minter = TokenMinter(self.keys, self.directory)
        self.counters = Counters()
        self._lock = threading.Lock()
        self._refresh: dict[str, RefreshRecord] = {}

    @staticmethod
    def new_refresh_token() -> str:
        """Opaque value; it only means something once :meth:`save_refresh_token` ran."""
        return REFRESH_TOKEN_PREFIX + secrets.token_urlsafe(48)

    def save_refresh_token(self, token: str, client_id: str, principal: Principal, scope: str) -> None:
        record = RefreshRecord(client_id, principal, scope, time.time() + REFRESH_TOKEN_LIFETIME)
        with self._lock:
            self._refresh[token] = record

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


def current() -> Runtime:
    return current_app.extensions["devtenant"]


def base_url() -> str:
    """``--public-url`` if configured, else scheme://host[:port] as the client saw it."""
    configured = current().public_url
    return configured or request.host_url.rstrip("/")


def issuer() -> str:
    return f"{base_url()}/{current().directory.tenant_id}/v2.0"
