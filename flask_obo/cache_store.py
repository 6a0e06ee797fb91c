"""Where sealed token caches live: Redis (shared by workers and instances) or memory.

Both stores offer the same operations: ``load``; a per-partition ``lock`` that makes
token acquisition single-flight across processes; ``save``, which only writes while the
caller still holds that lock, so two writers never lose each other's update; and
``save_unless_changed`` for an entry acquired while Redis was down; ``remove`` (sign-out),
also under the lock. Each also says how far a copy held in memory can be trusted
(``coherence``) and tells its ``watcher`` of changes.

A removed entry leaves a *tombstone* (an empty value with the entry's TTL) rather than
nothing: ``load`` reads it as a miss, but a compare-and-set from a worker that acquired a
token while Redis was away, against the entry being absent, no longer matches, so a
sign-out is never undone by such a write-back.

Redis failures never reach the user from here as such: every call goes through a
circuit breaker, and ``StoreUnavailable`` tells the caller to go on without Redis (or,
where it cannot, to answer 503 itself). ``LockBusy`` says a user's lock stayed taken, or
was lost. Both are plain exceptions (``flask_obo.store_errors``), not HTTP answers. A
request also keeps a ``StoreBudget``: after one failed call it makes no other (the rest
of the request goes on without Redis), and it stops calling once its calls took
``REDIS_TIMEOUT_SECONDS`` in all.

A store reports changes to any number of watchers (every application in the process
that uses it). ``flask_obo.testing.TokenCacheStoreContract`` is the contract every store
passes, the ones here and any other.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from redis.cluster import RedisCluster
from redis.exceptions import LockError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from .breaker import CircuitBreaker, State
from .bulkhead import Deadline, held
from .diagnosis import Diagnosis
from .metrics import Metrics
from .redis_topology import RedisClient, invalidation_for, redis_client
from .settings import DEFAULT_REDIS_TIMEOUT, Settings
from .store_errors import LockBusy, StoreUnavailable
from .worker_state import redis_health

log = logging.getLogger(__name__)

LOCK_POLL_SECONDS = 0.02
LOCK_TTL_MARGIN = 10  # the lock outlives the longest work under it (the acquisition timeout)
MEMORY_PRUNE_ABOVE = 10_000
TOMBSTONE = b""  # what ``remove`` leaves: never a sealed blob (those are Fernet tokens)
SCAN_BATCH = 500

# RedisClusterException (no node reachable, say) is not a RedisError.
REDIS_FAILURES = (RedisError, RedisClusterException)

_SCRIPTS = {
    # Taking a partition's lock (KEYS[2]) and reading its entry (KEYS[1]) in one step, for
    # ``EntryLock``: 0 when someone else holds the lock; once ours, {1, entry or '', pttl}, or
    # {2} for an entry of the wrong Redis type. A lock already carrying our token is ours: the
    # script sent again after a lost reply (redis-py retries a timed-out command) must not
    # wait for its own lock until the deadline.
    "lock_and_read": """
if not redis.call('set', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
    and redis.call('get', KEYS[2]) ~= ARGV[1] then return 0 end
local ok, blob = pcall(redis.call, 'get', KEYS[1])
if not ok then return {2} end
return {1, blob or '', redis.call('pttl', KEYS[1])}
""",
    # Write only while the lock still carries our token (it may have expired meanwhile).
    # SET replaces a key of any type, so an entry of the wrong Redis type is overwritten too.
    "save_if_locked": """
if redis.call('get', KEYS[2]) == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
""",
    # The same, as the holder's last write: the lock is released in the same step. Sent
    # again after a lost reply (redis-py retries a timed-out command), it finds its own
    # write (a sealed blob is unique: Fernet's IV) and answers as the first run did.
    "save_and_unlock": """
if redis.call('get', KEYS[2]) == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3])
  redis.call('del', KEYS[2])
  return 1
end
local ok, current = pcall(redis.call, 'get', KEYS[1])
if ok and current == ARGV[2] then return 1 end
return 0
""",
    # Write only if the entry is still the one the caller started from (ARGV[4] = 0: absent).
    "save_if_unchanged": """
local ok, current = pcall(redis.call, 'get', KEYS[1])
if not ok then current = nil end
if (ARGV[4] == '0' and not current) or (ARGV[4] == '1' and current == ARGV[1]) then
  redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
""",
    # Sign-out: replace the entry with a tombstone while the lock carries our token.
    # -1: the lock was lost; 0: there was no entry; 1: an entry was removed.
    "remove_if_locked": """
if redis.call('get', KEYS[2]) ~= ARGV[1] then return -1 end
local ok, current = pcall(redis.call, 'get', KEYS[1])
redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3])
if ok and current and current ~= ARGV[2] then return 1 end
return 0
""",
    # Re-keying: swap the entry for the same one sealed anew, keeping its remaining TTL,
    # if it is still what was read and the lock carries our token.
    # -1: the lock was lost; 0: the entry changed meanwhile; 1: written.
    "replace_if_locked": """
if redis.call('get', KEYS[2]) ~= ARGV[1] then return -1 end
local ok, current = pcall(redis.call, 'get', KEYS[1])
if not ok or current ~= ARGV[2] then return 0 end
redis.call('set', KEYS[1], ARGV[3], 'KEEPTTL')
return 1
""",
}


# Re-keying many entries at once: the same swap for an entry whose lock nobody holds. A
# script runs atomically, so this is taking the lock, comparing, writing and releasing it
# in one step: no request can be between its lock and its save meanwhile.
# -1: a request holds the lock (retry under the lock); 0: the entry changed; 1: written.
_REPLACE_IF_UNLOCKED = """
if redis.call('exists', KEYS[2]) == 1 then return -1 end
local ok, current = pcall(redis.call, 'get', KEYS[1])
if not ok or current ~= ARGV[1] then return 0 end
redis.call('set', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""


@dataclass(frozen=True)
class StoredEntry:
    blob: bytes
    expires_at: float | None  # time.monotonic() when the store drops it; None: never


class StoreBudget:
    """How long one request may wait on the store: after one failed call, no more calls
    (the rest of the request treats the store as unreachable: it does not wait for a
    timeout a second time, for the lock or the write); and no call starts once its calls
    took ``seconds`` in all (``REDIS_TIMEOUT_SECONDS``). A call in flight is bounded by
    the client's own timeout (the same setting). Waiting for another holder of a user's
    lock is not waiting on the store: the request's deadline bounds that."""

    def __init__(self, seconds: float) -> None:
        self._left = seconds
        self.failed = False

    @property
    def exhausted(self) -> bool:
        return self.failed or self._left <= 0

    @contextmanager
    def call(self, timed: bool = True) -> Iterator[None]:
        """One call to the store (``timed``: its time counts); raises ``StoreUnavailable``
        at once when the budget is exhausted, and marks it failed when the call raises it."""
        if self.exhausted:
            raise StoreUnavailable()
        started = time.monotonic()
        try:
            yield
        except StoreUnavailable:
            self.failed = True
            raise
        finally:
            if timed:
                self._left -= time.monotonic() - started


class Guard(Protocol):
    """Proof of holding a partition's lock, handed back to ``save``."""


class Coherence(Protocol):
    """How far memory copies of entries can be trusted (see ``flask_obo.invalidation``)."""

    connected: bool  # changes are being reported now
    epoch: int  # changes before the current epoch were not reported


class Watcher(Protocol):
    def invalidate(self, partitions: list[str] | None) -> None:
        """These entries changed (None: all of them)."""

    def resync(self) -> None:
        """Changes may have gone unreported; entries written while the store was away
        may be written now."""


class TokenCacheStore(Protocol):
    """What flask-obo needs of a store of sealed token caches (one entry per partition).

    Every operation but ``coherence``, ``watch``, ``status``, ``losses`` and ``healthy``
    raises ``flask_obo.StoreUnavailable`` when the store cannot be reached; ``lock`` and
    ``remove`` raise ``flask_obo.LockBusy`` when the partition's lock stays taken or was
    lost. A store raises these plain exceptions, never an HTTP error: flask-obo decides
    whether a request goes on without the store or answers 503.
    ``flask_obo.testing.TokenCacheStoreContract`` holds the tests a store must pass."""

    def coherence(self) -> Coherence:
        """How far copies read now can be trusted; starts reporting changes if need be."""

    def watch(self, watcher: Watcher) -> None:
        """Report changes to ``watcher`` too (any number of them, each held weakly: as
        long as its owner keeps it)."""

    def load(self, partition: str) -> StoredEntry | None:
        """The entry, or None (absent, removed or expired)."""

    def lock(self, partition: str, deadline: Deadline) -> AbstractContextManager[Guard]:
        """The partition's lock, shared by every process; raises ``LockBusy`` if it stays
        taken until ``deadline``."""

    def save(self, partition: str, blob: bytes, guard: Guard) -> bool:
        """Write while ``guard`` still holds the lock; False (nothing written) otherwise."""

    def save_unless_changed(self, partition: str, blob: bytes, base: bytes | None) -> bool:
        """Write if the entry is still ``base`` (None: absent, never removed); else False."""

    def remove(self, partition: str, guard: Guard) -> bool:
        """Remove the entry (sign-out) while holding its lock, leaving a tombstone that no
        ``save_unless_changed`` against an absent entry overwrites; was there one? Raises
        ``LockBusy`` if the lock was lost meanwhile."""

    def partitions(self) -> list[str]:
        """Every partition with an entry (removed ones may be listed too), once each."""

    def status(self) -> str:
        """``ok``, ``degraded`` or ``not_configured`` (for /readyz)."""

    @property
    def losses(self) -> int:
        """How many times the store was seen to lose its data (restart, failover)."""

    @property
    def healthy(self) -> bool:
        """False while the store is known to be down (no I/O to find out)."""


def _entry(blob: bytes | None, ttl_ms: Any) -> StoredEntry | None:
    """An entry as Redis gave it (its value and PTTL); absent and tombstones are None."""
    if blob is None or blob == TOMBSTONE:
        return None
    expires_at = time.monotonic() + ttl_ms / 1000 if isinstance(ttl_ms, int) and ttl_ms >= 0 else None
    return StoredEntry(blob, expires_at)


def _wrong_type(partition: str) -> None:
    log.warning("token cache for partition %s is not a string in Redis; treating it as a miss", partition)


class EntryLock(redis.lock.Lock):
    """redis-py's ``Lock`` on a partition whose taking also reads the partition's entry, in
    the same round trip (one script: ``SET NX PX`` on the lock, then ``GET`` and ``PTTL``
    on the entry).

    Whoever takes a user's lock reads the entry first, since another worker may have
    written it while this one waited; on a user's first request that was a read, then a
    lock, then the read again. The read that comes with the lock is as recent as the lock:
    no writer that takes the lock can have written since. One writer needs no lock (the
    write-back of an entry acquired while Redis was away, ``save_unless_changed``), so a
    holder that has since learnt of a change, a reconnection or a loss reads again
    (``OnBehalfOfTokenProvider._reload``). ``do_acquire`` is redis-py's step for one
    attempt to take the lock; the rest (waiting, the token, release, extend) is
    redis-py's."""

    def __init__(self, client: Any, name: str, entry_key: str, lock_and_read: Any, partition: str,
                 **kwargs: Any) -> None:
        super().__init__(client, name, **kwargs)
        if self.timeout is None:
            raise ValueError("an EntryLock needs a timeout: a lock its holder never releases must expire")
        self._ttl_ms = int(self.timeout * 1000)
        self._entry_key, self._lock_and_read, self._partition = entry_key, lock_and_read, partition
        self._read: tuple[StoredEntry | None] | None = None  # (entry,) until taken
        self._unlocked_by_save = False

    def do_acquire(self, token: str) -> bool:
        reply = self._lock_and_read(keys=[self._entry_key, self.name],
                                    args=[token, self._ttl_ms])
        if not reply:
            return False
        if reply[0] == 2:  # WRONGTYPE: not ours to read; a miss
            _wrong_type(self._partition)
            self._read = (None,)
        else:
            self._read = (_entry(reply[1], reply[2]),)
        return True

    def release(self) -> None:
        """redis-py's release, unless a save already released the lock (``save_and_unlock``)."""
        if not self._unlocked_by_save:
            super().release()

    def unlocked_by_save(self) -> None:
        self._unlocked_by_save = True

    def take_entry(self) -> tuple[StoredEntry | None] | None:
        """``(entry,)`` as read when the lock was taken, the first time only (the holder's
        own writes come after it); None afterwards."""
        read, self._read = self._read, None
        return read


def save_and_unlock(store: TokenCacheStore, partition: str, blob: bytes, guard: Guard) -> bool:
    """``store.save`` as the holder's last write under the lock. The Redis store releases
    the lock in the same script (a round trip less; leaving the lock then sends nothing);
    any other store saves, and its lock is released as the holder leaves it."""
    if isinstance(store, RedisTokenCacheStore) and isinstance(guard, EntryLock):
        return store.save_and_unlock(partition, blob, guard)
    return store.save(partition, blob, guard)


def entry_under_lock(store: TokenCacheStore, partition: str, guard: Guard) -> StoredEntry | None:
    """The partition's entry for the holder of its lock, just taken: the one the Redis
    store read in the round trip that took the lock (``EntryLock``, handed out once), else
    the store's ``load``."""
    read = guard.take_entry() if isinstance(guard, EntryLock) else None
    return store.load(partition) if read is None else read[0]


class RedisTokenCacheStore:
    """Blobs under ``<prefix>:cache:{<partition>}``, locks under ``<prefix>:lock:{<partition>}``.

    The hash tag puts a user's entry and lock in one cluster slot, so the conditional
    write (a script over both keys) is allowed; key names carry only the partition hash.
    """

    #: Where a refused password or ACL is named (``FlaskOBO.init_app`` sets its application's).
    diagnosis: Diagnosis | None = None

    def __init__(self, client: RedisClient | Callable[[], RedisClient], prefix: str, ttl_seconds: int,
                 lock_ttl_seconds: float = 30.0, listen: bool = False,
                 timeout: float = DEFAULT_REDIS_TIMEOUT, metrics: Metrics | None = None) -> None:
        """``client`` may be a function that makes one on first use: ``RedisCluster``
        connects as it is built, and a worker must start while the cluster is down.
        ``metrics``: where failed operations count (``FlaskOBO.init_app`` sets its
        application's, see ``report_to``)."""
        self._make_client = client if callable(client) else (lambda: client)
        self._client: RedisClient | None = None
        self._client_lock = threading.Lock()
        self._prefix = prefix
        self._ttl = ttl_seconds
        self._lock_ttl = lock_ttl_seconds
        self._listen, self._pong_timeout = listen, 1.0 + timeout
        self._invalidation: Any = None
        self.breaker = CircuitBreaker("redis", health=redis_health(), probe=self._probe)
        self._watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()
        self.losses = 0  # times Redis was seen to lose its data (a restart, a failover)
        self._metrics = metrics

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> RedisTokenCacheStore:
        """The store for ``REDIS_URL`` and its topology, with its invalidation listener."""
        return cls(
            lambda: redis_client(settings), settings.token_cache_prefix,
            settings.token_cache_ttl_seconds,
            lock_ttl_seconds=settings.token_acquisition_timeout + LOCK_TTL_MARGIN,
            listen=True, timeout=settings.redis_timeout, metrics=metrics,
        )

    def report_to(self, metrics: Metrics) -> None:
        """Count failed operations in ``metrics`` (``flask_obo_cache_errors_total``):
        ``init_app`` calls this (a store shared by several applications counts in the last
        one's)."""
        self._metrics = metrics

    def _failed(self, operation: str) -> None:
        if self._metrics is not None:
            self._metrics.cache_error(operation)

    @property
    def _redis(self) -> RedisClient:
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    client = self._make_client()
                    self._scripts = {name: client.register_script(text) for name, text in _SCRIPTS.items()}
                    self._client = client
        return self._client

    def _script(self, name: str) -> Any:
        self._redis  # noqa: B018 - makes the client and registers the scripts
        return self._scripts[name]

    def key(self, partition: str) -> str:
        return f"{self._prefix}:cache:{{{partition}}}"

    def lock_key(self, partition: str) -> str:
        return f"{self._prefix}:lock:{{{partition}}}"

    # --- coherence -----------------------------------------------------------------------
    def coherence(self) -> Coherence:
        if not self._listen:
            return _NEVER_COHERENT
        if self._invalidation is None:
            # Not through ``_call``: making the client sends no command, so it must not be
            # the open breaker's probe (it would close it while Redis still hangs). The
            # listener starts once a real command found Redis answering.
            if not self.healthy:
                return _NEVER_COHERENT
            try:
                client = self._redis
            except REDIS_FAILURES as exc:
                self._report_failure("connect", exc)
                return _NEVER_COHERENT
            with self._client_lock:
                if self._invalidation is None:
                    self._invalidation = invalidation_for(
                        client, f"{self._prefix}:cache:", self._invalidated, self._resync,
                        self._lost_data, self.breaker.trip, self.breaker.success,
                        pong_timeout=self._pong_timeout,
                    )
        self._invalidation.ensure_running()
        return self._invalidation  # type: ignore[no-any-return]

    def watch(self, watcher: Watcher) -> None:
        self._watchers.add(watcher)

    def close(self) -> None:
        """Stop listening for changes: the listener threads end within a second (for
        tests and tools; an application's store lives as long as its process)."""
        if self._invalidation is not None:
            self._invalidation.stop()

    def _invalidated(self, keys: list[bytes] | None) -> None:
        partitions = None if keys is None else [p for key in keys if (p := _partition_of(key))]
        for watcher in list(self._watchers):
            watcher.invalidate(partitions)

    def _resync(self) -> None:
        self.breaker.success()  # the listener just talked to Redis: it is back
        for watcher in list(self._watchers):
            watcher.resync()

    def _lost_data(self) -> None:
        self.losses += 1

    @property
    def healthy(self) -> bool:
        """Is Redis answering, as far as anyone here knows? (No I/O.)"""
        return self.breaker.state is State.CLOSED

    # --- entries ---------------------------------------------------------------------------
    def load(self, partition: str) -> StoredEntry | None:
        with self._call("load"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(self.key(partition))
            pipe.pttl(self.key(partition))
            blob, ttl_ms = pipe.execute(raise_on_error=False)
            for result in (blob, ttl_ms):  # a cluster pipeline returns failures unraised
                if isinstance(result, Exception) and not isinstance(result, ResponseError):
                    raise result
        if isinstance(blob, ResponseError):  # WRONGTYPE: not ours to read; a miss
            _wrong_type(partition)
            return None
        return _entry(blob, ttl_ms)

    @contextmanager
    def lock(self, partition: str, deadline: Deadline) -> Iterator[EntryLock]:
        """The partition's lock (redis-py's, see ``EntryLock``): taking it also reads the
        entry, which ``entry_under_lock`` hands to the holder."""
        with self._call("lock"):
            lock = EntryLock(
                self._redis,
                self.lock_key(partition),
                entry_key=self.key(partition),
                lock_and_read=self._script("lock_and_read"),
                partition=partition,
                timeout=self._lock_ttl,
                sleep=LOCK_POLL_SECONDS,
                blocking_timeout=max(deadline.remaining(), 0.01),
                thread_local=False,
            )
            acquired = lock.acquire()
        if not acquired:
            log.warning("partition %s stayed locked past this request's deadline", partition)
            raise LockBusy()
        try:
            yield lock
        finally:
            try:
                lock.release()
            except LockError:
                log.warning("lock for partition %s expired before release", partition)
            except REDIS_FAILURES as exc:
                self._failed("unlock")
                log.warning("redis unlock failed: %s", type(exc).__name__)

    def save(self, partition: str, blob: bytes, guard: Guard) -> bool:
        return self._save("save_if_locked", partition, blob, guard)

    def save_and_unlock(self, partition: str, blob: bytes, guard: EntryLock) -> bool:
        """``save``, releasing the lock in the same script: for the holder's last write
        (the module's ``save_and_unlock``). Leaving the lock then sends nothing."""
        written = self._save("save_and_unlock", partition, blob, guard)
        if written:
            guard.unlocked_by_save()
        return written

    def _save(self, script: str, partition: str, blob: bytes, guard: Guard) -> bool:
        token = self._lock_token(guard)
        with self._call("save"):
            written = self._script(script)(
                keys=[self.key(partition), self.lock_key(partition)],
                args=[token, blob, self._ttl],
            )
        if not written:
            log.warning("lost the lock for partition %s; not writing its cache", partition)
        return bool(written)

    def save_unless_changed(self, partition: str, blob: bytes, base: bytes | None) -> bool:
        """Write ``blob`` if the entry is still ``base`` (None: absent), without the lock:
        for what was acquired while Redis was away, which must neither be lost nor
        overwrite what another worker wrote meanwhile."""
        with self._call("save"):
            written = self._script("save_if_unchanged")(
                keys=[self.key(partition)], args=[base or b"", blob, self._ttl, 0 if base is None else 1],
            )
        return bool(written)

    def remove(self, partition: str, guard: Guard) -> bool:
        """Leave a tombstone for the entry, with a full TTL (see the module's docstring)."""
        token = self._lock_token(guard)
        with self._call("write"):
            result = self._script("remove_if_locked")(
                keys=[self.key(partition), self.lock_key(partition)], args=[token, TOMBSTONE, self._ttl],
            )
        if result == -1:
            log.warning("lost the lock for partition %s; its entry was not removed", partition)
            raise LockBusy()
        return bool(result == 1)

    def replace(self, partition: str, blob: bytes, new_blob: bytes, guard: Guard) -> bool:
        """Write ``new_blob`` in place of ``blob``, keeping the remaining TTL, if the entry
        is still ``blob``; False if it changed. Raises ``LockBusy`` if the lock was lost
        meanwhile."""
        token = self._lock_token(guard)
        with self._call("write"):
            result = self._script("replace_if_locked")(
                keys=[self.key(partition), self.lock_key(partition)], args=[token, blob, new_blob],
            )
        if result == -1:
            log.warning("lost the lock for partition %s; its entry was not rewritten", partition)
            raise LockBusy()
        return bool(result == 1)

    @staticmethod
    def _lock_token(guard: Guard) -> Any:
        if not isinstance(guard, redis.lock.Lock):
            raise TypeError("guard must come from this store's lock()")
        # A released lock has no token: b"" matches no lock's value (a uuid), so the
        # script answers "lock lost" rather than failing as if Redis were down.
        return guard.local.token or b""

    # --- for operators (the token-cache CLI) -------------------------------------------------
    def partitions(self) -> list[str]:
        """Every partition with a key under ``<prefix>:cache:``, once each, by SCAN (never
        KEYS, which blocks the server): on a cluster, on every primary. Held in memory, about
        100 bytes a user."""
        pattern = f"{self._prefix}:cache:{{*}}"
        found: dict[str, None] = {}  # SCAN returns a key at least once, maybe more
        with self._call("SCAN"):
            client = self._redis
            if isinstance(client, RedisCluster):
                keys = client.scan_iter(match=pattern, count=1000, target_nodes=RedisCluster.PRIMARIES)
            else:
                keys = client.scan_iter(match=pattern, count=1000)
            for key in keys:
                partition = _partition_of(key)
                if partition:
                    found[partition] = None
        return list(found)

    def sizes(self, partitions: list[str]) -> list[int | None]:
        """Each entry's size in bytes (STRLEN; 0: absent or a tombstone; None: not a string)."""
        results = self._batch("STRLEN", [("strlen", self.key(p)) for p in partitions])
        return [r if isinstance(r, int) else None for r in results]

    def load_many(self, partitions: list[str]) -> list[bytes | None]:
        """Each entry's blob (None: absent, a tombstone or not a string), in one round trip."""
        results = self._batch("GET", [("get", self.key(p)) for p in partitions])
        return [r if isinstance(r, bytes) and r != TOMBSTONE else None for r in results]

    def replace_many(self, swaps: list[tuple[str, bytes, bytes]]) -> list[int]:
        """For each ``(partition, blob, new_blob)``, ``replace`` without waiting for the
        lock, in one round trip: 1 written, 0 the entry changed, -1 its lock is held (then
        ``lock`` and ``replace`` it)."""
        results = self._batch("write", [
            ("eval", _REPLACE_IF_UNLOCKED, 2, self.key(p), self.lock_key(p), blob, new_blob)
            for p, blob, new_blob in swaps
        ])
        for result in results:
            if isinstance(result, Exception):  # a script error: not Redis being down
                raise result
        return [int(result) for result in results]

    def _batch(self, what: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        with self._call(what):
            pipe = self._redis.pipeline(transaction=False)
            for name, *args in commands:
                getattr(pipe, name)(*args)
            results = pipe.execute(raise_on_error=False)
            for result in results:
                if isinstance(result, Exception) and not isinstance(result, ResponseError):
                    raise result
        return list(results)

    def status(self) -> str:
        """``ok`` or ``degraded``: one PING (bounded by the socket timeout), none while
        the circuit is open."""
        try:
            with self._call("ping"):
                self._redis.ping()
        except StoreUnavailable:
            return "degraded"
        return "ok"

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        """Run one Redis operation through the breaker; a failure is ``StoreUnavailable``
        (and counts in ``flask_obo_cache_errors_total{operation=what}``; a call the open
        breaker turns away does not: nothing was tried)."""
        if not self.breaker.allow():
            raise StoreUnavailable()
        try:
            yield
        except REDIS_FAILURES as exc:
            self._report_failure(what, exc)
            raise StoreUnavailable() from None
        except BaseException:
            self.breaker.success()  # Redis answered; the caller failed for its own reasons
            raise
        self.breaker.success()

    def _probe(self) -> bool:
        """The open circuit's probe, in a thread of its own (``CircuitBreaker``): one PING,
        bounded by the socket timeout, so that no request waits on a Redis known to hang."""
        try:
            self._redis.ping()
        except REDIS_FAILURES as exc:
            self._failed("ping")
            log.error("redis probe failed: %s", type(exc).__name__)
            self._diagnose(exc)
            return False
        return True

    def _report_failure(self, what: str, exc: Exception) -> None:
        """Count, log and diagnose a failed call, and tell the breaker: a call that waited
        its whole timeout opens the circuit at once (Redis hangs: the next caller would
        wait as long), any other failure counts towards its threshold."""
        self._failed(what)
        if isinstance(exc, RedisTimeout):
            self.breaker.timed_out()
        else:
            self.breaker.failure()
        log.error("redis %s failed: %s", what, type(exc).__name__)
        self._diagnose(exc)

    def _diagnose(self, exc: Exception) -> None:
        if self.diagnosis is not None:  # a wrong password is named, not taken for an outage
            self.diagnosis.failed("redis", "REDIS_URL", exc)


def _partition_of(key: bytes) -> str | None:
    """The partition in ``<prefix>:cache:{<partition>}``."""
    start, end = key.rfind(b"{"), key.rfind(b"}")
    if start < 0 or end < start:
        return None
    return key[start + 1:end].decode("ascii", "replace")


class _NeverCoherent:
    connected = False
    epoch = 0


_NEVER_COHERENT = _NeverCoherent()


class _AlwaysCoherent:
    """The memory store is in this process and reports every change to its watchers as it
    makes it, so nothing can change behind a copy's back."""

    connected = True
    epoch = 0


class MemoryTokenCacheStore:
    """In-process store for local use: one process, nothing shared, lost on restart.

    Several applications in the process may share one (each watching it): every write
    and removal is reported to all of them at once."""

    losses = 0
    healthy = True

    def __init__(self, ttl_seconds: int) -> None:
        self._ttl = ttl_seconds
        self._blobs: dict[str, tuple[bytes, float]] = {}  # TOMBSTONE: removed
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.RLock()  # for changes to _blobs and _locks
        self._watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()

    def coherence(self) -> Coherence:
        return _AlwaysCoherent()

    def watch(self, watcher: Watcher) -> None:
        self._watchers.add(watcher)

    def load(self, partition: str) -> StoredEntry | None:
        entry = self._blobs.get(partition)
        if entry is None or entry[1] < time.monotonic() or entry[0] == TOMBSTONE:
            return None
        return StoredEntry(entry[0], entry[1])

    @contextmanager
    def lock(self, partition: str, deadline: Deadline) -> Iterator[threading.Lock]:
        with self._guard:
            lock = self._locks.setdefault(partition, threading.Lock())
        with held(lock, deadline.remaining()):
            yield lock

    def save(self, partition: str, blob: bytes, guard: Guard) -> bool:
        with self._guard:
            if not self._holds(partition, guard):
                return False
            self._put(partition, blob)
        self._changed(partition)
        return True

    def save_unless_changed(self, partition: str, blob: bytes, base: bytes | None) -> bool:
        with self._guard:
            entry = self._blobs.get(partition)
            current = entry[0] if entry is not None and entry[1] >= time.monotonic() else None
            if current != base:  # a tombstone is neither ``base`` nor absent
                return False
            self._put(partition, blob)
        self._changed(partition)
        return True

    def remove(self, partition: str, guard: Guard) -> bool:
        """Leave a tombstone for the entry, with a full TTL, as the Redis store does."""
        with self._guard:
            if not self._holds(partition, guard):
                raise LockBusy()
            removed = self.load(partition) is not None
            self._put(partition, TOMBSTONE)
        self._changed(partition)
        return removed

    def partitions(self) -> list[str]:
        now = time.monotonic()
        with self._guard:
            return [p for p, (_, expires) in self._blobs.items() if expires >= now]

    def _holds(self, partition: str, guard: Guard) -> bool:
        lock = self._locks.get(partition)
        return lock is not None and guard is lock and lock.locked()

    def _changed(self, partition: str) -> None:
        for watcher in list(self._watchers):
            watcher.invalidate([partition])

    def _put(self, partition: str, blob: bytes) -> None:
        now = time.monotonic()
        self._blobs[partition] = (blob, now + self._ttl)
        if len(self._blobs) > MEMORY_PRUNE_ABOVE:  # drop expired users now and then
            for key in [k for k, (_, expires) in self._blobs.items() if expires < now]:
                del self._blobs[key]
                lock = self._locks.get(key)
                if lock is not None and not lock.locked():
                    del self._locks[key]

    def status(self) -> str:
        """``not_configured``: this process's own store, no Redis to report on."""
        return "not_configured"
