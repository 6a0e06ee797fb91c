"""The contract of ``flask_obo.cache_store.TokenCacheStore``, as a base class of tests.

Subclass it in a test module (pytest collects ``Test*`` classes and runs the inherited
``test_*`` methods) and implement ``make_store``; override ``other_client`` when another
process can reach the same data (Redis), and ``close`` to stop what a store started. It
needs no test framework of its own: plain ``assert``s, pytest's ``teardown_method`` hook.

Each test states one rule flask-obo relies on:

* ``load``: None for an absent, removed or expired entry; what was saved otherwise.
* ``lock``: one holder per partition across every client; others wait until their
  deadline, then ``flask_obo.LockBusy``; partitions do not block each other.
* ``save``: writes only while its guard still holds the lock (compare-and-set on the lock).
* ``save_unless_changed``: writes only if the entry is still ``base`` (None: absent).
* ``remove``: a tombstone, so no write-back against an absent entry undoes a sign-out;
  ``LockBusy`` when the guard's lock was released.

A store raises ``flask_obo.StoreUnavailable`` when it cannot be reached (a test that stops
the store's server can assert it); never an HTTP error of ``flask_obo.errors``.
* ``watch``: every watcher (any number) hears of every change by any client, within
  ``change_bound`` seconds, while ``coherence().connected``.
* ``partitions``: the admin scan lists each partition with an entry, once.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from ..bulkhead import Deadline
from ..cache_store import TokenCacheStore
from ..store_errors import LockBusy

LOCK_WAIT = 0.3  # how long a second client waits for a held lock in these tests


class RecordingWatcher:
    """A watcher that records what it is told (``None``: everything changed)."""

    def __init__(self) -> None:
        self.invalidated: list[list[str] | None] = []
        self.resyncs = 0
        self._changed = threading.Condition()

    def invalidate(self, partitions: list[str] | None) -> None:
        with self._changed:
            self.invalidated.append(None if partitions is None else list(partitions))
            self._changed.notify_all()

    def resync(self) -> None:
        with self._changed:
            self.resyncs += 1
            self._changed.notify_all()

    def heard(self, partition: str) -> int:
        """How many reports named ``partition`` (or everything)."""
        with self._changed:
            return sum(1 for report in self.invalidated if report is None or partition in report)

    def wait_for(self, partition: str, count: int, timeout: float) -> bool:
        """Wait until ``count`` reports named ``partition``; whether they came in time."""
        with self._changed:
            return self._changed.wait_for(lambda: self._heard_locked(partition) >= count, timeout)

    def _heard_locked(self, partition: str) -> int:
        return sum(1 for report in self.invalidated if report is None or partition in report)


class TokenCacheStoreContract:
    """Tests every ``TokenCacheStore`` must pass; see the module's docstring."""

    #: Seconds within which every watcher hears of a change (an asynchronous channel).
    change_bound = 2.0
    #: Seconds within which ``coherence()`` reports connected after the first call.
    connect_bound = 5.0

    # --- hooks ------------------------------------------------------------------------------------
    def make_store(self) -> TokenCacheStore:
        """A new store on an empty namespace of its own (say, a fresh key prefix)."""
        raise NotImplementedError

    def other_client(self, store: TokenCacheStore) -> TokenCacheStore:
        """Another client of ``store``'s data, as another process would have (default:
        ``store`` itself, for a store that lives in one process)."""
        return store

    def close(self, store: TokenCacheStore) -> None:
        """Stop what ``store`` started (listeners, connections)."""

    # --- plumbing ---------------------------------------------------------------------------------
    @property
    def store(self) -> TokenCacheStore:
        """This test's store, made on first use (so fixtures have run by then)."""
        if getattr(self, "_store", None) is None:
            self._store: TokenCacheStore | None = self.make_store()
            self._opened: list[TokenCacheStore] = [self._store]
        assert self._store is not None
        return self._store

    @property
    def other(self) -> TokenCacheStore:
        other = self.other_client(self.store)
        if other is not self.store and other not in self._opened:
            self._opened.append(other)
        return other

    def teardown_method(self, method: Any = None) -> None:
        for store in getattr(self, "_opened", []):
            self.close(store)
        self._store, self._opened = None, []

    @staticmethod
    def partition() -> str:
        """A partition no other test uses (64 hex digits, as ``partition_key`` makes)."""
        return uuid.uuid4().hex * 2

    @staticmethod
    def blob(label: str) -> bytes:
        """An opaque sealed-blob stand-in (never empty: empty is the tombstone)."""
        return f"gAAAAA-{label}-{uuid.uuid4().hex}".encode()

    def saved(self, partition: str, blob: bytes, store: TokenCacheStore | None = None) -> None:
        store = store or self.store
        with store.lock(partition, Deadline(5)) as guard:
            assert store.save(partition, blob, guard), "save under the lock wrote nothing"

    # --- load and save ----------------------------------------------------------------------------
    def test_an_unknown_partition_loads_as_none(self) -> None:
        assert self.store.load(self.partition()) is None

    def test_a_save_under_the_lock_is_what_load_returns(self) -> None:
        partition, blob = self.partition(), self.blob("first")
        self.saved(partition, blob)
        entry = self.store.load(partition)
        assert entry is not None and entry.blob == blob
        assert entry.expires_at is None or entry.expires_at > time.monotonic()
        other = self.other.load(partition)
        assert other is not None and other.blob == blob, "another client does not see the entry"

    def test_a_save_whose_lock_was_released_writes_nothing(self) -> None:
        partition, first = self.partition(), self.blob("first")
        self.saved(partition, first)
        with self.store.lock(partition, Deadline(5)) as guard:
            pass
        assert self.store.save(partition, self.blob("late"), guard) is False
        entry = self.store.load(partition)
        assert entry is not None and entry.blob == first

    # --- the lock ---------------------------------------------------------------------------------
    def test_the_lock_has_one_holder_across_clients(self) -> None:
        partition = self.partition()
        with self.store.lock(partition, Deadline(5)):
            started = time.monotonic()
            try:
                with self.other.lock(partition, Deadline(LOCK_WAIT)):
                    raise AssertionError("a second client took a held lock")
            except LockBusy:
                waited = time.monotonic() - started
            assert LOCK_WAIT * 0.5 <= waited < LOCK_WAIT + 2.0, f"waited {waited:.2f} s for {LOCK_WAIT} s"
            with self.other.lock(self.partition(), Deadline(LOCK_WAIT)):
                pass  # another partition's lock is free
        with self.other.lock(partition, Deadline(5)) as guard:  # released: free again
            assert self.other.save(partition, self.blob("next"), guard)

    # --- compare-and-set without the lock ----------------------------------------------------------
    def test_save_unless_changed_writes_only_over_its_base(self) -> None:
        partition, first, second = self.partition(), self.blob("first"), self.blob("second")
        assert self.store.save_unless_changed(partition, first, None) is True  # absent: written
        assert self.store.save_unless_changed(partition, second, None) is False  # not absent now
        assert self.store.save_unless_changed(partition, second, self.blob("other")) is False
        entry = self.store.load(partition)
        assert entry is not None and entry.blob == first
        assert self.other.save_unless_changed(partition, second, first) is True
        entry = self.store.load(partition)
        assert entry is not None and entry.blob == second

    # --- remove (sign-out) ------------------------------------------------------------------------
    def test_remove_leaves_a_tombstone_no_write_back_undoes(self) -> None:
        partition, blob = self.partition(), self.blob("signed-in")
        self.saved(partition, blob)
        with self.store.lock(partition, Deadline(5)) as guard:
            assert self.store.remove(partition, guard) is True
        assert self.store.load(partition) is None
        assert self.other.load(partition) is None
        # A worker that acquired a token while the store was away writes it back against
        # "absent": the sign-out must win.
        assert self.other.save_unless_changed(partition, blob, None) is False
        assert self.store.load(partition) is None
        with self.store.lock(partition, Deadline(5)) as guard:
            assert self.store.remove(partition, guard) is False  # nothing left to remove
        fresh = self.blob("signed-in-again")
        self.saved(partition, fresh)  # the user's next acquisition, under the lock
        entry = self.store.load(partition)
        assert entry is not None and entry.blob == fresh

    def test_remove_whose_lock_was_released_is_busy(self) -> None:
        partition = self.partition()
        self.saved(partition, self.blob("kept"))
        with self.store.lock(partition, Deadline(5)) as guard:
            pass
        try:
            self.store.remove(partition, guard)
        except LockBusy:
            pass
        else:
            raise AssertionError("remove without the lock did not raise LockBusy")
        assert self.store.load(partition) is not None

    # --- watch ------------------------------------------------------------------------------------
    def test_every_watcher_hears_of_every_change_by_any_client(self) -> None:
        watchers = [RecordingWatcher(), RecordingWatcher(), RecordingWatcher()]
        for watcher in watchers:
            self.store.watch(watcher)
        deadline = time.monotonic() + self.connect_bound
        while not self.store.coherence().connected:
            assert time.monotonic() < deadline, f"not connected within {self.connect_bound} s"
            time.sleep(0.02)
        partition, other = self.partition(), self.other
        one, two = self.blob("one"), self.blob("two")
        changes = [  # a save under the lock, a compare-and-set, a removal
            lambda: self.saved(partition, one, other),
            lambda: other.save_unless_changed(partition, two, one),
            lambda: self._remove(partition, other),
        ]
        for count, change in enumerate(changes, start=1):
            started = time.monotonic()
            change()
            for n, watcher in enumerate(watchers):
                assert watcher.wait_for(partition, count, self.change_bound), (
                    f"watcher {n} did not hear of change {count} within {self.change_bound} s")
            assert time.monotonic() - started <= self.change_bound

    def _remove(self, partition: str, store: TokenCacheStore) -> None:
        with store.lock(partition, Deadline(5)) as guard:
            store.remove(partition, guard)

    # --- the admin scan and health ----------------------------------------------------------------
    def test_partitions_lists_each_entry_once(self) -> None:
        partitions = [self.partition() for _ in range(3)]
        for partition in partitions:
            self.saved(partition, self.blob("a"))
        self.saved(partitions[0], self.blob("b"))  # written twice: listed once
        listed = self.store.partitions()
        assert len(listed) == len(set(listed)), "a partition is listed twice"
        assert set(partitions) <= set(listed)

    def test_status_and_health_need_no_entry(self) -> None:
        assert self.store.status() in ("ok", "degraded", "not_configured")
        assert self.store.healthy is True
        assert isinstance(self.store.losses, int) and self.store.losses >= 0
