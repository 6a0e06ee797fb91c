"""Where sealed token caches live: Redis (shared by workers and instances) or memory.

Both stores offer the same three operations: ``load``, a per-partition ``lock`` that
makes token acquisition single-flight, and ``save``, which only writes while the
caller still holds that lock, so two writers can never lose each other's update.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import redis
from redis.exceptions import LockError, RedisError

from .errors import ServiceUnavailable

log = logging.getLogger(__name__)

LOCK_TTL_SECONDS = 45  # longer than the work under it: a refresh and an OBO, ~13 s each at worst
LOCK_WAIT_SECONDS = 20
LOCK_POLL_SECONDS = 0.02
REDIS_TIMEOUT_SECONDS = 2.0
MEMORY_PRUNE_ABOVE = 10_000

# Write only while the lock still carries our token (it may have expired meanwhile).
_SAVE_IF_LOCK_HELD = """
if redis.call('get', KEYS[2]) == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""


@contextmanager
def held(lock: threading.Lock, seconds: float = LOCK_WAIT_SECONDS) -> Iterator[threading.Lock]:
    """Hold an in-process lock, or answer 503 when it stays taken for ``seconds``."""
    if not lock.acquire(timeout=seconds):
        raise ServiceUnavailable("Token acquisition for this user is busy; retry shortly.", 1)
    try:
        yield lock
    finally:
        lock.release()


class CacheUnavailable(ServiceUnavailable):
    description = "The token cache is unavailable; retry later."


class Guard(Protocol):
    """Proof of holding a partition's lock, handed back to ``save``."""


class TokenCacheStore(Protocol):
    def load(self, partition: str) -> bytes | None: ...

    def lock(self, partition: str) -> AbstractContextManager[Guard]: ...

    def save(self, partition: str, blob: bytes, guard: Guard) -> bool: ...

    def ping(self) -> None: ...


class RedisTokenCacheStore:
    """Blobs under ``<prefix>:tokencache:<partition>`` with a TTL renewed on write."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_seconds: int) -> None:
        self._redis = client
        self._prefix = prefix
        self._ttl = ttl_seconds
        self._save_script = client.register_script(_SAVE_IF_LOCK_HELD)

    @classmethod
    def from_url(cls, url: str, prefix: str, ttl_seconds: int) -> RedisTokenCacheStore:
        client = redis.Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            health_check_interval=30,
        )
        return cls(client, prefix, ttl_seconds)

    def key(self, partition: str) -> str:
        return f"{self._prefix}:tokencache:{partition}"

    def lock_key(self, partition: str) -> str:
        return f"{self._prefix}:lock:{partition}"

    def load(self, partition: str) -> bytes | None:
        try:
            return self._redis.get(self.key(partition))
        except RedisError as exc:
            log.error("redis GET failed: %s", type(exc).__name__)
            raise CacheUnavailable() from None

    @contextmanager
    def lock(self, partition: str) -> Iterator[redis.lock.Lock]:
        lock = self._redis.lock(
            self.lock_key(partition),
            timeout=LOCK_TTL_SECONDS,
            sleep=LOCK_POLL_SECONDS,
            blocking_timeout=LOCK_WAIT_SECONDS,
            thread_local=False,
        )
        try:
            acquired = lock.acquire()
        except RedisError as exc:
            log.error("redis lock failed: %s", type(exc).__name__)
            raise CacheUnavailable() from None
        if not acquired:
            log.warning("partition %s stayed locked for %ss", partition, LOCK_WAIT_SECONDS)
            raise ServiceUnavailable("Token acquisition for this user is busy; retry shortly.", 1)
        try:
            yield lock
        finally:
            try:
                lock.release()
            except LockError:
                log.warning("lock for partition %s expired before release", partition)
            except RedisError as exc:
                log.warning("redis unlock failed: %s", type(exc).__name__)

    def save(self, partition: str, blob: bytes, guard: redis.lock.Lock) -> bool:
        try:
            written = self._save_script(
                keys=[self.key(partition), self.lock_key(partition)],
                args=[guard.local.token, blob, self._ttl],
            )
        except RedisError as exc:
            log.error("redis write failed: %s", type(exc).__name__)
            raise CacheUnavailable() from None
        if not written:
            log.warning("lost the lock for partition %s; not writing its cache", partition)
        return bool(written)

    def ping(self) -> None:
        self._redis.ping()


class MemoryTokenCacheStore:
    """In-process store for local use: one process, nothing shared, lost on restart."""

    def __init__(self, ttl_seconds: int) -> None:
        self._ttl = ttl_seconds
        self._blobs: dict[str, tuple[bytes, float]] = {}
        # Weak values: a partition's lock lives while a request holds it, then goes away.
        self._locks: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
        self._guard = threading.Lock()

    def load(self, partition: str) -> bytes | None:
        entry = self._blobs.get(partition)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    @contextmanager
    def lock(self, partition: str) -> Iterator[threading.Lock]:
        with self._guard:
            lock = self._locks.get(partition)
            if lock is None:
                lock = self._locks[partition] = threading.Lock()
        with held(lock):
            yield lock

    def save(self, partition: str, blob: bytes, guard: threading.Lock) -> bool:
        if guard is not self._locks.get(partition) or not guard.locked():
            return False
        now = time.monotonic()
        self._blobs[partition] = (blob, now + self._ttl)
        if len(self._blobs) > MEMORY_PRUNE_ABOVE:  # drop expired users now and then
            for key in [k for k, (_, expires) in self._blobs.items() if expires < now]:
                self._blobs.pop(key, None)
        return True

    def ping(self) -> None:
        return None
