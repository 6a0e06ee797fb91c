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

**What a user costs.** Between requests a session keeps what a warm request needs and no
more: the sealed blob (the cache's only copy: compressed and encrypted), the hot tokens
and the bookkeeping below, about 6 KiB with real-sized tokens. msal's objects (the
application, its token cache, its ``http_cache`` and our ``MsalHttpClient``) form a
``Workbench``, lent to a held session when it first needs msal, loaded from the blob,
and given back on release to a small pool of such benches, so neither a warm nor a
re-loaded user builds an application. Per-user state of those objects travels with
the session: the throttling entries of msal's ``http_cache`` and the user's Retry-After
gate. A session whose tokens are in no blob (its write lost a race) keeps its bench
until it is read again.

**One lock, one rule.** Every session's bookkeeping (who holds it, who waits for it,
what it last read or wrote, whether Redis reported a change, whether it holds tokens
Redis does not have yet) changes only through ``UserSession``'s methods, under the
tier's one lock, which is never held across I/O. A request *holds* a session
(``MemoryTier.hold``) to use its msal objects (``bench``, ``cache``, ``hot``): one
request at a time, the others wait for it. The invalidation listener, the
write-back and eviction never hold a session; they only take the lock for a moment.

**Eviction.** Beyond ``TOKEN_MEMORY_CACHE_USERS`` the least recently used users are
dropped, except *pinned* ones: held or waited for by a request, or holding tokens that
are not in Redis yet (acquired while it was unreachable). Those stay, above the cap if
need be, until released or written back (``flask_obo_memory_tier_pinned_users`` counts
the users above the cap), so no user ever has two sessions in a process and no token is
dropped before it reaches Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import msal

from .cache_store import Coherence, StoredEntry, TokenCacheStore
from .errors import TokenAcquisitionBusy
from .invalidation import ThreadPerProcess
from .metrics import Metrics
from .msal_http import MsalHttpClient
from .store_errors import StoreUnavailable
from .token_cache import UserTokenCache

log = logging.getLogger(__name__)

WRITE_BACK_RETRY = (1.0, 5.0)  # seconds between write-back rounds while tokens wait for Redis


class HotToken(NamedTuple):
    """msal's silent answer for ``scopes`` from a session's cache as it was ``blob``, and
    until when (wall clock, as msal reckons it) msal would give the same answer from it."""

    blob: bytes
    scopes: tuple[str, ...]
    access_token: str
    good_until: float


class Workbench:
    """msal's objects for one user at a time: an application bound (as msal binds them,
    at construction) to a token cache, an ``http_cache`` and an ``MsalHttpClient``.
    Lent to a held session, which loads its user's state into them, and given back
    emptied; ``authority`` and ``credential_version`` say what ``app`` was built for."""

    def __init__(self, http: MsalHttpClient) -> None:
        self.http = http
        self.http_cache: dict[str, Any] = {}
        self.cache = UserTokenCache()
        self.app: msal.ConfidentialClientApplication | None = None
        self.authority: str | None = None  # what ``app`` was built for
        self.credential_version = 0


class Workbenches:
    """The pool of free ``Workbench``es (as many as sessions were held at once, up to
    ``keep``), and how a session's blob is opened into one (``open``: partition, blob ->
    the serialized cache, or None)."""

    def __init__(self, new_http: Callable[[], MsalHttpClient],
                 open_blob: Callable[[str, bytes], str | None] | None, lock: threading.Lock,
                 keep: int = 64) -> None:
        self._new_http, self.open = new_http, open_blob
        self._lock, self._keep = lock, keep
        self._free: list[Workbench] = []

    def take(self) -> Workbench:
        with self._lock:
            if self._free:
                return self._free.pop()
        return Workbench(self._new_http())

    def put(self, bench: Workbench) -> None:
        """Under the lock: ``bench`` is free again (emptied by its last user)."""
        if len(self._free) < self._keep:
            self._free.append(bench)


class UserSession:
    """One user's state in this process (see the module's docstring for its rule).

    Per-user state also isolates throttling: msal's ``http_cache`` keeps its throttling
    entries, which for OBO are not keyed by user, so a shared one would replay one user's
    429 or 400 to everyone. So its entries (``throttled``) and the user's Retry-After gate
    (``gate``) travel with the session, and a bench's are emptied when it is given back.
    """

    __slots__ = ("_bench", "_benches", "_free", "_lock", "blob", "changed_in_store", "changes",
                 "expires_at", "gate", "holder", "hot", "losses_seen", "partition", "pins", "stored",
                 "throttled", "unsaved", "verified_epoch")  # no __dict__: ~100 bytes less per user

    def __init__(self, partition: str, benches: Workbenches, lock: threading.Lock) -> None:
        self.partition = partition
        # The holder's alone: the memo of msal's answers, and msal's objects while held.
        self.hot: dict[tuple[str, ...], HotToken] = {}  # valid while ``blob`` is the answer's
        self.throttled: dict[str, Any] | None = None  # msal's http_cache entries of this user
        self.gate = 0.0  # the user's MsalHttpClient.blocked_until
        self._bench: Workbench | None = None
        self._benches = benches
        # Bookkeeping: changed by the methods below, under ``_lock`` (the tier's).
        self._lock = lock
        self._free: threading.Condition | None = None  # made when a request first waits
        self.holder: int | None = None  # the thread of the request using the session now
        self.pins = 0  # requests holding or waiting for it: it must not be evicted
        self.blob: bytes | None = None  # what ``cache`` was last loaded from or saved as
        self.stored: bytes | None = None  # what the store held when last read or written
        self.losses_seen = 0  # the store's data losses known when ``stored`` was read
        self.expires_at: float | None = None  # when the store drops ``blob``
        self.verified_epoch = -1  # the coherence epoch ``blob`` was read at; -1: unverified
        self.changes = 0  # invalidations seen, so a read racing one is not trusted
        self.changed_in_store = False  # an invalidation since the last read: honour it
        self.unsaved = False  # ``blob`` is not in the store yet: write it back

    # --- msal's objects, for the holder ---------------------------------------------------------
    @property
    def bench(self) -> Workbench:
        """msal's objects holding this user's state (lent on first use while held)."""
        if self._bench is None:
            self._bench = self._lend(self.blob)
        return self._bench

    @property
    def cache(self) -> UserTokenCache:
        return self.bench.cache

    def blank_cache(self) -> UserTokenCache:
        """The cache, about to be replaced: a bench not lent yet is not loaded first."""
        if self._bench is None:
            self._bench = self._lend(None)
        return self._bench.cache

    def _lend(self, blob: bytes | None) -> Workbench:
        bench = self._benches.take()
        serialized = None
        if blob is not None and self._benches.open is not None:
            serialized = self._benches.open(self.partition, blob)  # as it was read: it opens
        bench.cache.load(serialized)
        if self.throttled:
            bench.http_cache.update(self.throttled)
        bench.http.blocked_until = self.gate
        return bench

    def _give_back(self) -> None:
        """Under the lock, on release: keep what is the user's, empty the bench, pool it;
        unless the cache holds tokens that no blob holds (see ``outdated``)."""
        bench = self._bench
        if bench is None or (self.blob is None and _holds_tokens(bench.cache)):
            return
        self._bench = None
        self.throttled = dict(bench.http_cache) if bench.http_cache else None
        self.gate = bench.http.blocked_until
        bench.http_cache.clear()
        bench.cache.load(None)
        self._benches.put(bench)

    def is_current(self, coherence: Coherence) -> bool:
        """Usable without asking Redis? (An unsaved session asks, to write itself back.)"""
        return (coherence.connected and self.verified_epoch == coherence.epoch and not self.unsaved
                and (self.expires_at is None or time.monotonic() < self.expires_at))

    @property
    def evictable(self) -> bool:
        return self.pins == 0 and not self.unsaved

    # --- what the holder learnt -----------------------------------------------------------------
    def read(self, entry: StoredEntry | None, blob: bytes | None, losses: int, changes: int,
             epoch: int | None) -> None:
        """The store held ``entry`` (read when the session had seen ``changes``
        invalidations, at ``epoch``; None: the channel was down); the session now holds
        ``blob`` (the entry's, or None when it was not usable). Trusted as current unless
        an invalidation came in meanwhile."""
        with self._lock:
            self.blob = blob
            self.stored = entry.blob if entry else None
            self.losses_seen = losses
            self.expires_at = entry.expires_at if entry else None
            self.unsaved = False
            if self.changes == changes:
                self.changed_in_store = False
                if epoch is not None:
                    self.verified_epoch = epoch

    def acquired(self, blob: bytes) -> None:
        """The holder sealed a new cache state; not in the store yet."""
        with self._lock:
            self.blob = blob

    def saved(self, blob: bytes) -> None:
        """``blob`` is what the store holds now."""
        with self._lock:
            self.stored = blob
            if self.blob is blob:
                self.unsaved = False

    def not_saved(self) -> None:
        """The store could not be written (unreachable): write ``blob`` back later."""
        with self._lock:
            self.unsaved = True

    def outdated(self) -> None:
        """Someone else's write won: read the store again before the next use."""
        with self._lock:
            self.blob, self.verified_epoch = None, -1
            self.unsaved = False

    def cleared(self) -> None:
        """msal could not read the cache, which is now empty (the next acquisition replaces
        it): nothing to write back."""
        with self._lock:
            self.blob = None
            self.unsaved = False

    def forget(self) -> None:
        """Hold nothing of the user any more (sign-out): no token, nothing to write back,
        and re-read from the store before the next use."""
        if self._bench is not None:
            self._bench.cache.load(None)
            self._bench.http_cache.clear()
        self.throttled = None
        self.hot.clear()
        with self._lock:
            self.blob = self.stored = None
            self.expires_at = None
            self.verified_epoch = -1
            self.unsaved = False

    # --- what others tell it (under the tier's lock) ------------------------------------------
    def _invalidated(self) -> None:
        if self.holder == threading.get_ident():
            return  # the holder's own write (a store in this process reports it at once)
        self.changes += 1
        self.verified_epoch = -1
        self.changed_in_store = True

    def _written_back(self, blob: bytes, written: bool) -> None:
        """The write-back of ``blob`` ended: written, or the store holds another entry (a
        newer token of another worker, or a sign-out), which wins."""
        if self.blob is blob and self.unsaved:
            self.unsaved = False
            if written:
                self.stored = blob


def _holds_tokens(cache: UserTokenCache) -> bool:
    return any(True for kind in (cache.CredentialType.REFRESH_TOKEN, cache.CredentialType.ACCESS_TOKEN)
               for _ in cache.search(kind))


class MemoryTier:
    """Users' sessions, least recently used dropped beyond ``limit`` unless pinned."""

    def __init__(self, limit: int, new_http: Callable[[], MsalHttpClient],
                 metrics: Metrics | None = None,
                 open_blob: Callable[[str, bytes], str | None] | None = None) -> None:
        self.limit = limit
        self._metrics = metrics or Metrics()
        self._sessions: OrderedDict[str, UserSession] = OrderedDict()
        self._lock = threading.Lock()  # the one lock: the map, the benches, every session's bookkeeping
        self.benches = Workbenches(new_http, open_blob, self._lock)

    def session(self, partition: str) -> UserSession:
        """The user's session, not held (to look at it: a request uses ``hold``)."""
        with self._lock:
            return self._get(partition)

    def hold(self, partition: str, timeout: float) -> UserSession | None:
        """The user's session, held by the caller (``release`` it); None if another
        request kept it for ``timeout`` seconds."""
        with self._lock:
            session = self._get(partition)
            if session.holder is not None:
                session.pins += 1
                if session._free is None:
                    session._free = threading.Condition(self._lock)
                free = session._free.wait_for(lambda: session.holder is None, max(timeout, 0.0))
                session.pins -= 1
                if not free:
                    if len(self._sessions) > self.limit:
                        self._evict()
                    return None
            session.holder = threading.get_ident()
            session.pins += 1
            return session

    def release(self, session: UserSession) -> None:
        with self._lock:
            session._give_back()
            session.holder = None
            session.pins -= 1
            if session._free is not None:
                session._free.notify()
            if len(self._sessions) > self.limit:
                self._evict()

    @contextmanager
    def held(self, partition: str, seconds: float) -> Iterator[UserSession]:
        """Hold the user's session for the block, or answer 503 when it stays taken for
        ``seconds`` (``TokenAcquisitionBusy``)."""
        session = self.hold(partition, seconds)
        if session is None:
            raise TokenAcquisitionBusy()
        try:
            yield session
        finally:
            self.release(session)

    def _get(self, partition: str) -> UserSession:
        session = self._sessions.get(partition)
        if session is None:
            session = self._sessions[partition] = UserSession(partition, self.benches, self._lock)
            if len(self._sessions) > self.limit:
                self._evict(keep=session)
        else:
            self._sessions.move_to_end(partition)
        return session

    def _evict(self, keep: UserSession | None = None) -> None:
        """Under the lock: drop least recently used sessions down to ``limit``, skipping
        pinned ones (moved to the recent end, so the next pass does not look at them
        first) and ``keep`` (just handed out), and count what stays above the cap."""
        for _ in range(len(self._sessions)):
            if len(self._sessions) <= self.limit:
                break
            partition, session = next(iter(self._sessions.items()))
            if session.evictable and session is not keep:
                del self._sessions[partition]
            else:
                self._sessions.move_to_end(partition)
        self._metrics.memory_tier_pinned_users.set(max(0, len(self._sessions) - self.limit))

    # --- the store's reports --------------------------------------------------------------------
    def invalidate(self, partitions: list[str] | None) -> None:
        """The store reports these entries changed (None: all of them)."""
        with self._lock:
            sessions = (list(self._sessions.values()) if partitions is None
                        else [s for p in partitions if (s := self._sessions.get(p)) is not None])
            for session in sessions:
                session._invalidated()

    def unsaved(self) -> int:
        """How many users hold tokens that are not in the store yet."""
        with self._lock:
            return sum(session.unsaved for session in self._sessions.values())

    def write_back(self, store: TokenCacheStore) -> int:
        """Write every unsaved session's tokens to ``store``, unless another worker wrote
        that user's entry meanwhile or it was removed (then the store's entry wins: the
        user's next request reads it). Never holds a session, so no request waits for
        this; a request that changes a session meanwhile keeps its own state. Returns how
        many users are still unsaved (the store is unreachable)."""
        with self._lock:
            pending = [(s, s.blob, s.stored) for s in self._sessions.values() if s.unsaved and s.blob]
        for session, blob, stored in pending:
            assert blob is not None
            try:
                written = store.save_unless_changed(session.partition, blob, stored)
            except StoreUnavailable:
                break
            with self._lock:
                session._written_back(blob, written)
        with self._lock:
            if len(self._sessions) > self.limit:
                self._evict()
        return self.unsaved()


class WriteBack:
    """A daemon thread per process that writes unsaved sessions back while there are
    any: at once when woken (Redis answers again, a write just failed), then every
    second or so, up to five, until none is left. Off the request path: no request waits
    for these writes."""

    def __init__(self, tier: MemoryTier, store: TokenCacheStore) -> None:
        self._tier, self._store = tier, store
        self._wake = threading.Event()
        self._thread = ThreadPerProcess(self._run, "flask-obo-write-back")

    def wake(self) -> None:
        self._thread.ensure_running()
        self._wake.set()

    def _run(self) -> None:
        pending, delay = 0, WRITE_BACK_RETRY[0]
        while True:
            woken = self._wake.wait(timeout=delay if pending else None)
            self._wake.clear()
            try:
                pending = self._tier.write_back(self._store)
            except Exception:  # the thread must outlive any failure
                log.exception("writing tokens back to the token cache failed")
                pending = self._tier.unsaved()
            delay = WRITE_BACK_RETRY[0] if woken else min(delay * 2, WRITE_BACK_RETRY[1])
