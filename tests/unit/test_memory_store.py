"""The in-process store (no REDIS_URL) under concurrent writers: its prune of expired
users once it holds many runs under its lock, so a save never meets a dictionary that
another thread is changing (it used to raise ``RuntimeError: dictionary changed size
during iteration`` with 8 threads above 10,000 entries)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from flask_obo import MemoryTokenCacheStore
from flask_obo import cache_store as cache_store_module

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
