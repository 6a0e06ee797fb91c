"""Bulkheads: one deadline per request, single flight per key, a bounded waiting room.

Threads are lined up with Events and Barriers; a follower is known to be waiting on the
leader once it asks its deadline how long it may wait (``run`` does that just before it
blocks on the leader's result).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from flask_obo.bulkhead import Deadline, SingleFlight, TokenAcquisitionBusy, TooManyWaiting, WaitingRoom, held

WAIT = 5.0  # bound on any wait for another thread here; none should come close


class Private(Exception):
    """An error about the leader's own input (as a refused assertion)."""


class SignallingDeadline(Deadline):
    """A deadline that tells the test when its owner asks how long it may wait."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.asked = threading.Event()

    def remaining(self) -> float:
        self.asked.set()
        return super().remaining()


class Leader:
    """A call that blocks until released, then returns ``result`` or raises ``error``."""

    def __init__(self, result: Any = "token", error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(WAIT)
        if self.error is not None:
            raise self.error
        return self.result


def outcome(future: Future) -> Any:
    """The future's result, or the exception it raised."""
    try:
        return future.result(timeout=WAIT)
    except Exception as exc:
        return exc


def lead_and_follow(flight: SingleFlight, leader: Leader, followers: int,
                    follower_call: Callable[[], Any] = lambda: "own") -> tuple[Future, list[Future]]:
    """Start the leader, then ``followers`` threads that join its flight; return once all of
    them wait on it (the leader is still blocked)."""
    pool = ThreadPoolExecutor(followers + 1)
    lead = pool.submit(flight.run, "user", leader, Deadline(WAIT))
    assert leader.entered.wait(WAIT)
    deadlines = [SignallingDeadline(WAIT) for _ in range(followers)]
    follows = [pool.submit(flight.run, "user", follower_call, d) for d in deadlines]
    for deadline in deadlines:
        assert deadline.asked.wait(WAIT)
    pool.shutdown(wait=False)
    return lead, follows


# --- Deadline ---------------------------------------------------------------------------------------


def test_a_deadline_counts_down_to_zero_and_expires() -> None:
    deadline = Deadline(60)
    assert 59 < deadline.remaining() <= 60
    assert not deadline.expired
    past = Deadline(-1)
    assert past.remaining() == 0.0
    assert past.expired


def test_a_deadline_is_a_point_in_time() -> None:
    deadline = Deadline(0.05)
    first = deadline.remaining()
    time.sleep(0.06)  # time passing, not synchronisation
    assert deadline.remaining() == 0.0 < first
    assert deadline.expired


# --- held -------------------------------------------------------------------------------------------


def test_held_takes_and_releases_the_lock() -> None:
    lock = threading.Lock()
    with held(lock, 1.0):
        assert lock.locked()
    assert not lock.locked()


def test_held_releases_the_lock_on_an_exception() -> None:
    lock = threading.Lock()
    with pytest.raises(ValueError), held(lock, 1.0):
        raise ValueError
    assert not lock.locked()


def test_held_gives_up_with_503_when_the_lock_stays_taken() -> None:
    lock = threading.Lock()
    lock.acquire()
    started = time.monotonic()
    with pytest.raises(TokenAcquisitionBusy) as busy, held(lock, 0.05):
        pass
    assert time.monotonic() - started < 1.0
    assert busy.value.status == 503
    assert busy.value.headers["Retry-After"] == "1"


# --- SingleFlight -----------------------------------------------------------------------------------


def test_followers_share_the_leaders_result() -> None:
    flight: SingleFlight[str] = SingleFlight()
    leader = Leader(result="graph-token")
    lead, follows = lead_and_follow(flight, leader, 5)
    leader.release.set()
    assert [outcome(f) for f in [lead, *follows]] == ["graph-token"] * 6
    assert leader.calls == 1


def test_followers_share_the_leaders_exception() -> None:
    flight: SingleFlight[str] = SingleFlight()
    error = RuntimeError("entra said no")
    leader = Leader(error=error)
    lead, follows = lead_and_follow(flight, leader, 3)
    leader.release.set()
    assert all(outcome(f) is error for f in [lead, *follows])
    assert leader.calls == 1


def test_a_private_error_sends_followers_to_try_for_themselves() -> None:
    flight: SingleFlight[str] = SingleFlight(private_errors=(Private,))
    leader = Leader(error=Private())
    own_calls: list[int] = []

    def own() -> str:
        own_calls.append(1)
        return "own-token"

    lead, follows = lead_and_follow(flight, leader, 3, own)
    leader.release.set()
    assert isinstance(outcome(lead), Private)  # the leader's own problem stays its own
    assert [outcome(f) for f in follows] == ["own-token"] * 3
    assert 1 <= len(own_calls) <= 3  # one new leader, or more if they did not overlap


def test_a_follower_waits_no_longer_than_its_deadline() -> None:
    flight: SingleFlight[str] = SingleFlight()
    leader = Leader()
    with ThreadPoolExecutor(1) as pool:
        lead = pool.submit(flight.run, "user", leader, Deadline(WAIT))
        assert leader.entered.wait(WAIT)
        started = time.monotonic()
        with pytest.raises(TokenAcquisitionBusy):
            flight.run("user", lambda: "own", Deadline(0.05))
        waited = time.monotonic() - started
        leader.release.set()
        assert lead.result(timeout=WAIT) == "token"
    assert 0.04 <= waited < 1.0
    assert leader.calls == 1


def test_a_finished_flight_is_not_reused() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = iter(range(10))
    assert flight.run("user", lambda: next(calls), Deadline(1)) == 0
    assert flight.run("user", lambda: next(calls), Deadline(1)) == 1


def test_a_failed_flight_is_not_reused() -> None:
    flight: SingleFlight[str] = SingleFlight()

    def fail() -> str:
        raise RuntimeError

    with pytest.raises(RuntimeError):
        flight.run("user", fail, Deadline(1))
    assert flight.run("user", lambda: "next", Deadline(1)) == "next"


def test_different_keys_fly_separately() -> None:
    flight: SingleFlight[str] = SingleFlight()
    leader = Leader(result="adele")
    with ThreadPoolExecutor(1) as pool:
        lead = pool.submit(flight.run, "adele", leader, Deadline(WAIT))
        assert leader.entered.wait(WAIT)
        assert flight.run("bob", lambda: "bob", Deadline(0.5)) == "bob"  # not behind Adele's
        leader.release.set()
        assert lead.result(timeout=WAIT) == "adele"


# --- WaitingRoom ------------------------------------------------------------------------------------


def occupy(room: WaitingRoom, seats: int) -> tuple[threading.Event, ThreadPoolExecutor, list[Future]]:
    """``seats`` threads sitting in ``room`` until the returned event is set."""
    leave, seated = threading.Event(), threading.Barrier(seats + 1)
    pool = ThreadPoolExecutor(seats)

    def sit() -> None:
        with room.seat():
            seated.wait(WAIT)
            assert leave.wait(WAIT)

    futures = [pool.submit(sit) for _ in range(seats)]
    seated.wait(WAIT)
    return leave, pool, futures


def test_the_waiting_room_turns_away_the_one_too_many_at_once() -> None:
    room = WaitingRoom(3)
    leave, pool, futures = occupy(room, 3)
    started = time.monotonic()
    with pytest.raises(TooManyWaiting) as refused, room.seat():
        pass
    assert time.monotonic() - started < 0.5
    assert refused.value.status == 503
    assert refused.value.headers["Retry-After"] == "1"
    leave.set()
    pool.shutdown(wait=True)
    assert all(f.exception() is None for f in futures)
    with room.seat():  # the seats are free again
        pass


def test_a_seat_is_released_when_its_holder_fails() -> None:
    room = WaitingRoom(1)
    for _ in range(3):
        with pytest.raises(RuntimeError), room.seat():
            raise RuntimeError("entra exploded")
    with room.seat(), pytest.raises(TooManyWaiting), room.seat():
        pass
