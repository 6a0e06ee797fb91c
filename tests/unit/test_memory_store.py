"""The in-process store (no REDIS_URL) under concurrent writers: its prune of expired
users once it holds many runs under its lock, so a save never meets a dictionary that
another thread is changing (it used to raise ``RuntimeError: dictionary changed size
during iteration`` with 8 threads above 10,000 entries)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from flask_obo import MemoryTokenCacheStore
from flask_obo import cache_store as cache_store_module
from flask_obo.bulkhead import Deadline
from flask_obo.cache_store import entry_under_lock, save_and_unlock

THREADS = 8
USERS_PER_THREAD = 400


def test_concurrent_saves_above_the_prune_threshold_all_land(monkeypatch):
    monkeypatch.setattr(cache_store_module, "MEMORY_PRUNE_ABOVE", 500)  # prune on every save
    store = MemoryTokenCacheStore(ttl_seconds=3600)

    def writer(thread: int) -> None:
        for user in range(USERS_PER_THREAD):
            assert store.save_unless_changed(f"{thread:02d}{user:062d}", b"blob", None)

    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(writer, thread) for thread in range(THREADS)]:
            future.result()  # re-raises what a writer met

    assert all(store.load(f"{thread:02d}{user:062d}") is not None
               for thread in range(THREADS) for user in range(USERS_PER_THREAD))


def test_the_holder_of_a_memory_lock_reads_the_entry_from_the_store():
    """Only the Redis store reads the entry as it takes the lock; any other store's holder
    gets its ``load`` (the latest entry, never a stale one)."""
    store = MemoryTokenCacheStore(ttl_seconds=3600)
    partition = "m" * 64
    with store.lock(partition, Deadline(5)) as guard:
        assert entry_under_lock(store, partition, guard) is None
        assert store.save(partition, b"sealed", guard)
        entry = entry_under_lock(store, partition, guard)
        assert entry is not None and entry.blob == b"sealed"


def test_a_last_save_to_the_memory_store_is_a_save_and_the_lock_frees_on_leaving():
    store = MemoryTokenCacheStore(ttl_seconds=3600)
    partition = "n" * 64
    with store.lock(partition, Deadline(5)) as guard:
        assert save_and_unlock(store, partition, b"sealed", guard)
        assert guard.locked()  # held until the holder leaves
    assert not guard.locked()
    entry = store.load(partition)
    assert entry is not None and entry.blob == b"sealed"
