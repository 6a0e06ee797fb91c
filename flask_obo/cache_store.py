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
circuit breaker, and ``CacheUnavailable`` tells the caller to go on without Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from redis.cluster import RedisCluster
from redis.exceptions import LockError, RedisClusterException, RedisError, ResponseError

from .breaker import CircuitBreaker, State
from .bulkhead import Deadline, TokenAcquisitionBusy, held
from .diagnosis import Diagnosis
from .errors import CacheUnavailable
from .metrics import Metrics
from .redis_topology import RedisClient, invalidation_for, redis_client
from .settings import DEFAULT_REDIS_TIMEOUT, Settings

log = logging.getLogger(__name__)

LOCK_POLL_SECONDS = 0.02
LOCK_TTL_MARGIN = 10  # the lock outlives the longest work under it (the acquisition timeout)
MEMORY_PRUNE_ABOVE = 10_000
TOMBSTONE = b""  # what ``remove`` leaves: never a sealed blob (those are Fernet tokens)
SCAN_BATCH = 500

# RedisClusterException (no node reachable, say) is not a RedisError.
REDIS_FAILURES = (RedisError, RedisClusterException)

_SCRIPTS = {
    # Write only while the lock still carries our token (it may have expired meanwhile).
    # SET replaces a key of any type, so an entry of the wrong Redis type is overwritten too.
    "save_if_locked": """
if redis.call('get', KEYS[2]) == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
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
    def coherence(self) -> Coherence: ...

    def watch(self, watcher: Watcher) -> None: ...

    def load(self, partition: str) -> StoredEntry | None: ...

    def lock(self, partition: str, deadline: Deadline) -> AbstractContextManager[Guard]: ...

    def save(self, partition: str, blob: bytes, guard: Guard) -> bool: ...

    def save_unless_changed(self, partition: str, blob: bytes, base: bytes | None) -> bool: ...

    def remove(self, partition: str, guard: Guard) -> bool:
        """Remove the entry (sign-out) while holding its lock; was there one? Raises
        ``TokenAcquisitionBusy`` if the lock was lost meanwhile."""

    def status(self) -> str: ...

    @property
    def losses(self) -> int:
        """How many times the store was seen to lose its data (restart, failover)."""

    @property
    def healthy(self) -> bool:
        """False while the store is known to be down (no I/O to find out)."""


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
        self.breaker = CircuitBreaker("redis")
        self._watcher: Watcher | None = None
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
        """Count failed operations in ``metrics`` (``flask_obo_cache_errors_total``). A store
        serves one application, like its ``watch``-er: ``init_app`` calls this."""
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
            try:
                with self._call("connect"):
                    client = self._redis
            except CacheUnavailable:
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
        self._watcher = watcher

    def _invalidated(self, keys: list[bytes] | None) -> None:
        if self._watcher is None:
            return
        if keys is None:
            self._watcher.invalidate(None)
            return
        partitions = [_partition_of(key) for key in keys]
        self._watcher.invalidate([p for p in partitions if p])

    def _resync(self) -> None:
        self.breaker.success()  # the listener just talked to Redis: it is back
        if self._watcher is not None:
            self._watcher.resync()

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
            log.warning("token cache for partition %s is not a string in Redis; treating it as a miss",
                        partition)
            return None
        if blob is None or blob == TOMBSTONE:
            return None
        expires_at = time.monotonic() + ttl_ms / 1000 if isinstance(ttl_ms, int) and ttl_ms >= 0 else None
        return StoredEntry(blob, expires_at)

    @contextmanager
    def lock(self, partition: str, deadline: Deadline) -> Iterator[redis.lock.Lock]:
        with self._call("lock"):
            lock = self._redis.lock(
                self.lock_key(partition),
                timeout=self._lock_ttl,
                sleep=LOCK_POLL_SECONDS,
                blocking_timeout=max(deadline.remaining(), 0.01),
                thread_local=False,
            )
            acquired = lock.acquire()
        if not acquired:
            log.warning("partition %s stayed locked past this request's deadline", partition)
            raise TokenAcquisitionBusy()
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
        token = self._lock_token(guard)
        with self._call("save"):
            written = self._script("save_if_locked")(
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
            raise TokenAcquisitionBusy()
        return bool(result == 1)

    def replace(self, partition: str, blob: bytes, new_blob: bytes, guard: Guard) -> bool:
        """Write ``new_blob`` in place of ``blob``, keeping the remaining TTL, if the entry
        is still ``blob``; False if it changed. Raises ``TokenAcquisitionBusy`` if the lock
        was lost meanwhile."""
        token = self._lock_token(guard)
        with self._call("write"):
            result = self._script("replace_if_locked")(
                keys=[self.key(partition), self.lock_key(partition)], args=[token, blob, new_blob],
            )
        if result == -1:
            log.warning("lost the lock for partition %s; its entry was not rewritten", partition)
            raise TokenAcquisitionBusy()
        return bool(result == 1)

    @staticmethod
    def _lock_token(guard: Guard) -> Any:
        if not isinstance(guard, redis.lock.Lock):
            raise TypeError("guard must come from this store's lock()")
        return guard.local.token

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
        except CacheUnavailable:
            return "degraded"
        return "ok"

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        """Run one Redis operation through the breaker; a failure is ``CacheUnavailable``
        (and counts in ``flask_obo_cache_errors_total{operation=what}``; a call the open
        breaker turns away does not: nothing was tried)."""
        if not self.breaker.allow():
            raise CacheUnavailable()
        try:
            yield
        except REDIS_FAILURES as exc:
            self._failed(what)
            self.breaker.failure()
            log.error("redis %s failed: %s", what, type(exc).__name__)
            if self.diagnosis is not None:  # a wrong password is named, not taken for an outage
                self.diagnosis.failed("redis", "REDIS_URL", exc)
            raise CacheUnavailable() from None
        except BaseException:
            self.breaker.success()  # Redis answered; the caller failed for its own reasons
            raise
        self.breaker.success()


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
    """The memory store is in this process: every change to it goes through the
    process's own users, so nothing can change behind a copy's back."""

    connected = True
    epoch = 0


class MemoryTokenCacheStore:
    """In-process store for local use: one process, nothing shared, lost on restart."""

    losses = 0
    healthy = True

    def __init__(self, ttl_seconds: int) -> None:
        self._ttl = ttl_seconds
        self._blobs: dict[str, tuple[bytes, float]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.RLock()  # for changes to _blobs and _locks

    def coherence(self) -> Coherence:
        return _AlwaysCoherent()

    def watch(self, watcher: Watcher) -> None:
        return None

    def load(self, partition: str) -> StoredEntry | None:
        entry = self._blobs.get(partition)
        if entry is None or entry[1] < time.monotonic():
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
            lock = self._locks.get(partition)
            if lock is None or guard is not lock or not lock.locked():
                return False
            self._put(partition, blob)
        return True

    def save_unless_changed(self, partition: str, blob: bytes, base: bytes | None) -> bool:
        with self._guard:
            current = self.load(partition)
            if (current.blob if current else None) != base:
                return False
            self._put(partition, blob)
        return True

    def remove(self, partition: str, guard: Guard) -> bool:
        """Drop the entry (one process: no other worker can write an old copy back)."""
        with self._guard:
            lock = self._locks.get(partition)
            if lock is None or guard is not lock or not lock.locked():
                raise TokenAcquisitionBusy()
            entry = self._blobs.pop(partition, None)
        return entry is not None and entry[1] >= time.monotonic()

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
