"""The memory tier: each worker keeps its recent users' msal state, so a warm request
sends no command to Redis.

A user's ``UserSession`` holds their msal application, their token cache and the blob it
was loaded from or saved as. It may be used without asking Redis only while it is
*current*: read while the invalidation channel was connected, at the channel's present
epoch, not invalidated since, and not past the entry's TTL in Redis. Otherwise it is
re-read before use, except while Redis is unreachable, when it is served as it is.

A session also remembers msal's last offline answer (``HotToken``): while its cache is
the one that answer came from and msal would still give the same one, a warm request
skips msal's lookup.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import msal

from .cache_store import Coherence
from .msal_http import MsalHttpClient
from .token_cache import UserTokenCache


class HotToken(NamedTuple):
    """msal's silent answer for ``scopes`` from a session's cache as it was ``blob``, and
    until when (wall clock, as msal reckons it) msal would give the same answer from it."""

    blob: bytes
    scopes: tuple[str, ...]
    access_token: str
    good_until: float


class UserSession:
    """One user's msal state in this process. Only a thread holding ``lock`` touches it.

    Per-user state also isolates throttling: msal's ``http_cache`` keeps its throttling
    entries, which for OBO are not keyed by user, so a shared one would replay one user's
    429 or 400 to everyone.
    """

    def __init__(self, http: MsalHttpClient) -> None:
        self.lock = threading.Lock()
        self.http = http
        self.http_cache: dict[str, Any] = {}
        self.cache = UserTokenCache()
        self.app: msal.ConfidentialClientApplication | None = None
        self.credential_version = 0  # the API credential's version ``app`` was built with
        self.blob: bytes | None = None  # what ``cache`` was last loaded from or saved as
        self.stored: bytes | None = None  # what the store held when last read or written
        self.losses_seen = 0  # the store's data losses known when ``stored`` was read
        self.expires_at: float | None = None  # when the store drops ``blob``
        self.verified_epoch = -1  # the coherence epoch ``blob`` was read at; -1: unverified
        self.changes = 0  # invalidations seen, so a read racing one is not trusted
        self.changed_in_store = False  # an invalidation since the last read: honour it
        self.unsaved = False  # ``blob`` was acquired while the store was down: write it back
        # msal's last answer per scopes (one per downstream API): valid only while
        # ``blob`` is the answer's ``blob``.
        self.hot: dict[tuple[str, ...], HotToken] = {}

    def forget(self) -> None:
        """Hold nothing of the user any more (sign-out): no token, nothing to write back,
        and re-read from the store before the next use."""
        self.cache.load(None)
        self.http_cache.clear()
        self.blob = self.stored = None
        self.expires_at = None
        self.verified_epoch = -1
        self.unsaved = False

    def is_current(self, coherence: Coherence) -> bool:
        """Usable without asking Redis? (An unsaved session asks, to write itself back.)"""
        return (coherence.connected and self.verified_epoch == coherence.epoch and not self.unsaved
                and (self.expires_at is None or time.monotonic() < self.expires_at))


class MemoryTier:
    """Users' sessions, least recently used dropped beyond ``limit``."""

    def __init__(self, limit: int, new_session: Callable[[], UserSession]) -> None:
        self.limit = limit
        self._new_session = new_session
        self._sessions: OrderedDict[str, UserSession] = OrderedDict()
        self._lock = threading.Lock()

    def session(self, partition: str) -> UserSession:
        with self._lock:
            session = self._sessions.get(partition)
            if session is None:
                session = self._sessions[partition] = self._new_session()
                if len(self._sessions) > self.limit:
                    self._sessions.popitem(last=False)
            else:
                self._sessions.move_to_end(partition)
            return session

    def invalidate(self, partitions: list[str] | None) -> None:
        """The store reports these entries changed (None: all of them)."""
        with self._lock:
            sessions = (list(self._sessions.values()) if partitions is None
                        else [s for p in partitions if (s := self._sessions.get(p)) is not None])
            for session in sessions:
                session.changes += 1
                session.verified_epoch = -1
                session.changed_in_store = True

    def mark_read(self, session: UserSession, changes: int, epoch: int | None) -> None:
        """``session`` now reflects the store, as read when it had seen ``changes``
        invalidations at ``epoch`` (None: the channel was down): trust it unless an
        invalidation came in meanwhile. Under the tier's lock, as ``invalidate`` is."""
        with self._lock:
            if session.changes != changes:
                return
            session.changed_in_store = False
            if epoch is not None:
                session.verified_epoch = epoch

    def unsaved(self) -> list[tuple[str, UserSession]]:
        with self._lock:
            return [(p, s) for p, s in self._sessions.items() if s.unsaved]
