"""The memory tier's rules (flask_obo.memory_tier): one session per user, never evicted
while a request holds or waits for it or while it holds tokens not yet in the store;
``flask_obo_memory_tier_pinned_users`` counts those kept above the cap; the write-back
brings the tier back to its cap."""

from __future__ import annotations

import threading
from typing import Any

from flask_obo.bulkhead import Deadline
from flask_obo.cache_store import MemoryTokenCacheStore
from flask_obo.memory_tier import MemoryTier
from flask_obo.metrics import Metrics


def tier(limit: int) -> tuple[MemoryTier, Metrics]:
    metrics = Metrics()
    http: Any = object()  # msal's HTTP client: not used by the tier itself
    return MemoryTier(limit, lambda: http, metrics), metrics


def pinned(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("flask_obo_memory_tier_pinned_users")


def test_least_recently_used_users_are_evicted_beyond_the_cap() -> None:
    memory, metrics = tier(2)
    first = memory.session("a")
    memory.session("b")
    memory.session("c")
    assert memory.session("a") is not first  # evicted: a new, empty session
    assert pinned(metrics) == 0


def test_a_held_user_is_never_evicted_and_never_gets_a_second_session() -> None:
    memory, metrics = tier(1)
    held = memory.hold("a", 1.0)
    assert held is not None
    for other in "bcdef":
        memory.session(other)
    assert memory.session("a") is held
    assert pinned(metrics) == 1  # "a" and the newest user: one above the cap
    memory.release(held)
    memory.session("g")
    assert pinned(metrics) == 0
    assert memory.session("a") is not held  # released: evictable like any other


def test_a_request_waiting_for_a_user_pins_them_too() -> None:
    memory, _ = tier(1)
    held = memory.hold("a", 1.0)
    assert held is not None
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(memory.hold("a", 5.0)))
    waiter.start()
    while held.pins < 2:  # the waiter is in
        threading.Event().wait(0.005)
    memory.release(held)
    for other in "bcd":
        memory.session(other)  # would evict "a" if the waiter did not pin it
    waiter.join(5)
    assert got == [held]
    memory.release(held)


def test_hold_gives_up_after_its_timeout() -> None:
    memory, _ = tier(5)
    held = memory.hold("a", 1.0)
    assert memory.hold("a", 0.05) is None
    assert held is not None
    memory.release(held)
    again = memory.hold("a", 0.05)
    assert again is held
    memory.release(again)


def test_unsaved_users_stay_above_the_cap_until_written_back() -> None:
    memory, metrics = tier(1)
    store = MemoryTokenCacheStore(ttl_seconds=600)
    blobs = {}
    for user in "abc":  # three users served while the store could not be written
        session = memory.hold(user, 1.0)
        assert session is not None
        blobs[user] = f"gAAAAA-{user}".encode()
        session.acquired(blobs[user])
        session.not_saved()
        memory.release(session)
    assert memory.unsaved() == 3
    assert pinned(metrics) == 2
    assert all(memory.session(user).blob == blobs[user] for user in "abc")  # none dropped

    assert memory.write_back(store) == 0
    for user in "abc":
        entry = store.load(user)
        assert entry is not None and entry.blob == blobs[user]
    assert pinned(metrics) == 0  # back to the cap


def test_a_write_back_never_overwrites_a_newer_entry_or_a_sign_out() -> None:
    memory, _ = tier(5)
    store = MemoryTokenCacheStore(ttl_seconds=600)
    for user in ("newer", "signed-out"):
        session = memory.hold(user, 1.0)
        assert session is not None
        session.acquired(b"gAAAAA-mine")
        session.not_saved()
        memory.release(session)
    assert store.save_unless_changed("newer", b"gAAAAA-theirs", None)
    with store.lock("signed-out", Deadline(1)) as guard:
        store.remove("signed-out", guard)
    assert memory.write_back(store) == 0  # nothing left to write: the store's entries win
    newer = store.load("newer")
    assert newer is not None and newer.blob == b"gAAAAA-theirs"
    assert store.load("signed-out") is None
