"""Bulkheads: one deadline per request, single flight per key, a waiting room that follows
Entra ID's pace, and a worker's retirement.

Threads are lined up with Events and Barriers; a waiter is known to be waiting on an
exchange once it asks its deadline whether it expired (the room does that before each
wait). The room's clock is a ``FixedPace``: "on time" is a patience of a minute, "overdue"
one of zero.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from flask_obo.bulkhead import (
    LIVE_WINDOW,
    PATIENCE_CAP,
    PATIENCE_FLOOR,
    PATIENCE_PRIOR,
    Deadline,
    EntraPace,
    ExchangeThreads,
    SingleFlight,
    TokenAcquisitionBusy,
    TooManyWaiting,
    WaitingRoom,
    WorkerRetirement,
    held,
)
from flask_obo.errors import ApiError, WorkerRetiring
from flask_obo.store_errors import LockBusy
from tests.support.servers import wait_until

WAIT = 5.0  # bound on any wait for another thread here; none should come close


class Private(Exception):
    """An error about the leader's own input (as a refused assertion)."""


class SignallingDeadline(Deadline):
    """A deadline that tells the test when its owner asks how long it may wait."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.asked = threading.Event()

    @property
    def expired(self) -> bool:
        self.asked.set()
        return super().expired


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


class FixedPace(EntraPace):
    """A pace whose patience the test sets."""

    def __init__(self, patience: float) -> None:
        super().__init__()
        self.fixed = patience

    def patience(self) -> float:
        return self.fixed


ON_TIME, OVERDUE = 60.0, 0.0


def room(capacity: int = 2, patience: float = ON_TIME) -> WaitingRoom:
    return WaitingRoom(capacity, FixedPace(patience), WorkerRetirement())


def flights(capacity: int = 2, patience: float = ON_TIME, private: tuple = ()) -> SingleFlight:
    return SingleFlight(room(capacity, patience), private_errors=private)


def result_of(flight: SingleFlight, key: str, call: Callable[[], Any], seconds: float = WAIT) -> Any:
    """What ``run`` gave a request: the result alone (whether it started the flight aside)."""
    return flight.run(key, call, Deadline(seconds))[0]


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


def results(futures: list[Future]) -> list[Any]:
    """Each future's result without the "started it" flag, or the exception it raised."""
    out = []
    for future in futures:
        value = outcome(future)
        out.append(value[0] if isinstance(value, tuple) else value)
    return out


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


def test_held_gives_up_with_lock_busy_when_the_lock_stays_taken() -> None:
    """The memory store's lock says so as the store's signal, not as an HTTP answer: the
    provider decides what a request answers."""
    lock = threading.Lock()
    lock.acquire()
    started = time.monotonic()
    with pytest.raises(LockBusy) as busy, held(lock, 0.05):
        pass
    assert time.monotonic() - started < 1.0
    assert not isinstance(busy.value, ApiError)


# --- SingleFlight -----------------------------------------------------------------------------------


def test_followers_share_the_leaders_result() -> None:
    flight = flights()
    leader = Leader(result="graph-token")
    lead, follows = lead_and_follow(flight, leader, 5)
    leader.release.set()
    assert results([lead, *follows]) == ["graph-token"] * 6
    assert outcome(lead)[1] is True and all(outcome(f)[1] is False for f in follows)
    assert leader.calls == 1


def test_followers_share_the_leaders_exception() -> None:
    flight = flights()
    error = RuntimeError("entra said no")
    leader = Leader(error=error)
    lead, follows = lead_and_follow(flight, leader, 3)
    leader.release.set()
    assert all(r is error for r in results([lead, *follows]))
    assert leader.calls == 1


def test_a_private_error_sends_followers_to_try_for_themselves() -> None:
    flight = flights(private=(Private,))
    leader = Leader(error=Private())
    own_calls: list[int] = []

    def own() -> str:
        own_calls.append(1)
        return "own-token"

    lead, follows = lead_and_follow(flight, leader, 3, own)
    leader.release.set()
    assert isinstance(outcome(lead), Private)  # the leader's own problem stays its own
    assert results(follows) == ["own-token"] * 3
    assert 1 <= len(own_calls) <= 3  # one new leader, or more if they did not overlap


def test_a_follower_waits_no_longer_than_its_deadline() -> None:
    flight = flights()
    leader = Leader()
    with ThreadPoolExecutor(1) as pool:
        lead = pool.submit(flight.run, "user", leader, Deadline(WAIT))
        assert leader.entered.wait(WAIT)
        started = time.monotonic()
        with pytest.raises(TokenAcquisitionBusy):
            flight.run("user", lambda: "own", Deadline(0.05))
        waited = time.monotonic() - started
        leader.release.set()
        assert lead.result(timeout=WAIT) == ("token", True)
    assert 0.04 <= waited < 1.0
    assert leader.calls == 1


def test_the_starter_may_leave_and_the_exchange_still_lands() -> None:
    """An exchange runs in its own thread: the request that started it can give up (its
    deadline) without cutting it, and the next request finds the outcome."""
    flight = flights()
    leader = Leader(result="late-token")
    with pytest.raises(TokenAcquisitionBusy):
        flight.run("user", leader, Deadline(0.05))
    assert leader.entered.wait(WAIT)
    with ThreadPoolExecutor(1) as pool:
        joined = pool.submit(flight.run, "user", lambda: "own", Deadline(WAIT))
        leader.release.set()
        assert joined.result(timeout=WAIT) == ("late-token", False)
    assert leader.calls == 1


def test_a_finished_flight_is_not_reused() -> None:
    flight = flights()
    calls = iter(range(10))
    assert result_of(flight, "user", lambda: next(calls)) == 0
    wait_for(lambda: not flight.running("user"))
    assert result_of(flight, "user", lambda: next(calls)) == 1


def test_a_failed_flight_is_not_reused() -> None:
    flight = flights()

    def fail() -> str:
        raise RuntimeError

    with pytest.raises(RuntimeError):
        flight.run("user", fail, Deadline(1))
    wait_for(lambda: not flight.running("user"))
    assert result_of(flight, "user", lambda: "next") == "next"


def test_different_keys_fly_separately() -> None:
    flight = flights()
    leader = Leader(result="adele")
    with ThreadPoolExecutor(1) as pool:
        lead = pool.submit(flight.run, "adele", leader, Deadline(WAIT))
        assert leader.entered.wait(WAIT)
        assert result_of(flight, "bob", lambda: "bob", 0.5) == "bob"  # not behind Adele's
        leader.release.set()
        assert lead.result(timeout=WAIT) == ("adele", True)


def test_the_exchange_sees_the_starters_context() -> None:
    """The request id (a context variable) rides along to the exchange's thread."""
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
    var.set("req-42")
    assert result_of(flights(), "user", var.get) == "req-42"


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.005)  # polling another thread's bookkeeping, bounded


# --- WaitingRoom ------------------------------------------------------------------------------------


def test_on_time_waiters_take_no_seat_however_many() -> None:
    """A burst of one user (here 12 waiters, 1 seat) is answered while the exchange is on
    time: followers of an exchange in flight are not Entra callers."""
    flight = flights(capacity=1, patience=ON_TIME)
    leader = Leader(result="graph-token")
    lead, follows = lead_and_follow(flight, leader, 11)
    leader.release.set()
    assert results([lead, *follows]) == ["graph-token"] * 12
    assert leader.calls == 1


def test_many_on_time_exchanges_start_however_few_the_seats() -> None:
    """A login wave: distinct users' exchanges run side by side while on time."""
    flight = flights(capacity=1, patience=ON_TIME)
    leaders = [Leader(result=f"token-{n}") for n in range(6)]
    with ThreadPoolExecutor(6) as pool:
        runs = [pool.submit(flight.run, f"user-{n}", leader, Deadline(WAIT))
                for n, leader in enumerate(leaders)]
        for leader in leaders:
            assert leader.entered.wait(WAIT)
            leader.release.set()
        assert results(runs) == [f"token-{n}" for n in range(6)]


def test_overdue_waiters_beyond_the_seats_are_refused_at_once() -> None:
    """Entra ID hangs: 2 seats, 6 waiters of an overdue exchange; 4 are answered 503 at
    once, 2 keep waiting (and get the token when it comes)."""
    flight = flights(capacity=2, patience=OVERDUE)
    leader = Leader(result="late")
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(flight.run, "user", leader, Deadline(WAIT))
        assert leader.entered.wait(WAIT)
        started = time.monotonic()
        rest = [pool.submit(flight.run, "user", lambda: "own", Deadline(WAIT)) for _ in range(5)]
        wait_for(lambda: sum(f.done() for f in rest) >= 4)
        refused_within = time.monotonic() - started
        assert flight._room.seated == 2
        with pytest.raises(TooManyWaiting):  # no new exchange either while the seats are taken
            flight.run("another-user", lambda: "x", Deadline(WAIT))
        leader.release.set()
        outcomes = results([first, *rest])
    refused = [o for o in outcomes if isinstance(o, TooManyWaiting)]
    assert len(refused) == 4 and outcomes.count("late") == 2
    assert all(r.status == 503 and r.headers["Retry-After"] == "1" for r in refused)
    assert refused_within < 1.0
    assert flight._room.seated == 0


def test_a_waiter_becomes_overdue_when_the_exchange_does() -> None:
    """On time at first, then overdue: the waiters then need seats (1 here)."""
    flight = flights(capacity=1, patience=0.2)
    leader = Leader(result="late")
    with ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(flight.run, "user", leader, Deadline(WAIT))]
        assert leader.entered.wait(WAIT)
        runs += [pool.submit(flight.run, "user", lambda: "own", Deadline(WAIT)) for _ in range(2)]
        wait_for(lambda: sum(f.done() for f in runs) >= 2)  # ~0.2 s: two of three refused
        assert flight._room.seated == 1
        leader.release.set()
        outcomes = results(runs)
    assert outcomes.count("late") == 1
    assert sum(isinstance(o, TooManyWaiting) for o in outcomes) == 2


# --- pace ---------------------------------------------------------------------------------------


def test_patience_follows_the_slowest_recent_exchange_within_bounds() -> None:
    pace = EntraPace()
    assert pace.patience() == PATIENCE_PRIOR  # nothing seen yet
    pace.observe(0.01)
    assert pace.patience() == PATIENCE_FLOOR  # fast: overdue soon after a hang starts
    pace.observe(0.2)
    assert pace.patience() == pytest.approx(0.6)
    pace.observe(PATIENCE_CAP)
    assert pace.patience() == PATIENCE_CAP  # slow: never longer than the cap
    assert pace.answering_until() == pace.last_answer + LIVE_WINDOW  # silence past it: hung
    pace.observe(4.0)  # answers take seconds (a loaded host): they come seconds apart
    assert pace.answering_until() == pace.last_answer + 4.0


def test_a_pace_shared_across_forks_is_what_a_process_forked_later_starts_from() -> None:
    """A worker recycled during a hang knows its siblings' pace (share_across_workers):
    Entra ID answered them lately, and its own first exchanges get PATIENCE_CAP (not the
    PATIENCE_PRIOR of a server that saw no answer) for its cold start."""
    shared, own = EntraPace(shared=True), EntraPace()
    shared.observe(0.2)
    pid = os.fork()
    if pid == 0:  # a recycled sibling: Entra ID answers its siblings, not yet itself
        knows = shared.answering_until() > time.monotonic() and shared.patience() == PATIENCE_CAP
        shared.observe(0.25)  # its own first answer: from now on, the pace
        own.observe(0.25)
        os._exit(0 if knows and shared.patience() == pytest.approx(0.75) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert shared.patience() == pytest.approx(0.75)  # the child's observation reached us
    assert shared.last_answer > time.monotonic() - WAIT
    assert own.patience() == PATIENCE_PRIOR  # a process's own pace stays its own


def test_only_answered_exchanges_set_the_pace() -> None:
    flight = SingleFlight(WaitingRoom(2, EntraPace(), WorkerRetirement()))

    def fail() -> str:
        time.sleep(0.01)
        raise RuntimeError

    with pytest.raises(RuntimeError):
        flight.run("user", fail, Deadline(WAIT))
    assert flight._room.pace.patience() == PATIENCE_PRIOR
    assert result_of(flight, "other", lambda: "ok") == "ok"
    assert flight._room.pace.patience() < PATIENCE_PRIOR  # (its exact value: the host's load)


def test_an_overdue_exchange_waits_seat_free_while_entra_answers_others() -> None:
    """A login wave on a busy host: exchanges take longer than the patience, but Entra ID
    keeps answering the others, so it is slow, not hung: nobody is refused for a seat."""
    pace = FixedPace(0.05)
    flight = SingleFlight(WaitingRoom(1, pace, WorkerRetirement()))
    stop = threading.Event()

    def others_answer() -> None:
        while not stop.wait(0.01):
            pace.observe(0.01)

    answering = threading.Thread(target=others_answer)
    answering.start()
    try:
        leader = Leader()
        lead, follows = lead_and_follow(flight, leader, 3)
        assert not stop.wait(0.3)  # six patiences pass while the exchange is in flight
        assert not any(f.done() for f in [lead, *follows])  # none refused, none seated
        leader.release.set()
        assert results([lead, *follows]) == ["token"] * 4
    finally:
        stop.set()
        answering.join(WAIT)


def test_seated_waiters_give_their_seats_back_when_entra_answers_again() -> None:
    """A login wave on a loaded host: one exchange ran late while nothing answered, so its
    waiter took the only seat; once another user's exchange gets its answer, the seat is
    free again and a new user's exchange is admitted instead of refused."""
    pace = FixedPace(OVERDUE)
    room = WaitingRoom(1, pace, WorkerRetirement())
    flight = SingleFlight(room)
    leader = Leader()
    lead = ThreadPoolExecutor(1).submit(flight.run, "user", leader, Deadline(WAIT))
    assert leader.entered.wait(WAIT)
    wait_for(lambda: room.seated == 1)  # overdue, nothing answering: seated
    with pytest.raises(TooManyWaiting):
        room.admit()  # the room is full and Entra ID answers nobody
    answered = SingleFlight(WaitingRoom(1, pace, WorkerRetirement()))
    assert result_of(answered, "someone", lambda: "fast") == "fast"  # an answer lands...
    room.wake()  # (in the product the same room's land() wakes its waiters)
    wait_for(lambda: room.seated == 0)  # ...so the seat is given back
    room.admit()  # and a new exchange may start
    leader.release.set()
    assert results([lead]) == ["token"]


# --- retirement -------------------------------------------------------------------------------------


def test_retirement_ends_overdue_waits_at_once_and_on_time_ones_by_their_patience() -> None:
    """A retiring worker holds nobody for a slow or hanging Entra ID: overdue waits end at
    once, on-time ones when their patience runs out; an answer that comes in time still
    reaches its waiters, and a new exchange may start (its waits are bounded alike)."""
    retirement = WorkerRetirement()
    overdue = SingleFlight(WaitingRoom(1, FixedPace(OVERDUE), retirement))
    leader = Leader()
    lead, follows = lead_and_follow(overdue, leader, 3)  # 1 seated, 3 refused already...
    wait_for(lambda: sum(f.done() for f in [lead, *follows]) >= 3)
    patience = 0.5
    on_time = SingleFlight(WaitingRoom(1, FixedPace(patience), retirement))
    hanging = Leader()
    hang_lead, hang_follows = lead_and_follow(on_time, hanging, 2)  # ...3 seat-free on a hang
    answering_room = SingleFlight(WaitingRoom(1, FixedPace(WAIT), retirement))
    answering = Leader(result="fresh")
    answer_lead, answer_follows = lead_and_follow(answering_room, answering, 2)  # ...3 on a healthy one
    started = time.monotonic()
    retirement.begin()
    ended = results([lead, *follows])
    overdue_took = time.monotonic() - started
    assert sum(isinstance(e, WorkerRetiring) for e in ended) == 1  # the seated one, at once
    assert sum(isinstance(e, TooManyWaiting) for e in ended) == 3
    assert overdue_took < patience
    answering.release.set()  # Entra ID answers in time: the retiring worker serves it
    assert results([answer_lead, *answer_follows]) == ["fresh"] * 3
    hung = results([hang_lead, *hang_follows])
    hang_took = time.monotonic() - started
    assert all(isinstance(e, WorkerRetiring) and e.status == 503 and e.error == "temporarily_unavailable"
               and e.headers["Retry-After"] == "1" for e in hung)
    assert hang_took < patience + 1.0  # by the patience, not the deadline (WAIT)
    assert result_of(on_time, "someone-else", lambda: "x") == "x"  # a quick new exchange is served
    leader.release.set()
    hanging.release.set()


def test_retirement_leaves_other_rooms_of_other_processes_alone() -> None:
    """Each ``WorkerRetirement`` is one process's; a test's own does not touch the
    process's (which ``retire_worker`` begins)."""
    from flask_obo.bulkhead import process_retirement

    WorkerRetirement().begin()
    assert not process_retirement().begun
    assert result_of(SingleFlight(WaitingRoom(1)), "user", lambda: "ok") == "ok"


# --- ExchangeThreads: a thread per exchange, reused once idle ------------------------------------
def test_exchanges_one_after_another_reuse_one_thread() -> None:
    threads = ExchangeThreads()
    ran: list[threading.Thread] = []
    for _ in range(3):
        done = threading.Event()
        threads.run(lambda done=done: (ran.append(threading.current_thread()), done.set()))
        assert done.wait(5)
        wait_until(lambda: len(threads._idle) == 1)  # back to idle before the next one starts
    assert len(set(ran)) == 1 and ran[0].name == "flask-obo-exchange" and ran[0].daemon


def test_a_users_exchanges_run_in_the_thread_an_earlier_exchange_left() -> None:
    flights: SingleFlight[threading.Thread] = SingleFlight(WaitingRoom(2, EntraPace(), WorkerRetirement()))
    first, _ = flights.run("alice", threading.current_thread, Deadline(5))
    wait_until(lambda: len(flights._threads._idle) == 1)
    second, _ = flights.run("bob", threading.current_thread, Deadline(5))
    assert first is second is not threading.current_thread()


def test_an_exchange_never_waits_for_a_busy_thread() -> None:
    """A hanging exchange holds its thread; the next one gets another at once."""
    threads = ExchangeThreads()
    hanging, release = threading.Event(), threading.Event()
    threads.run(lambda: (hanging.set(), release.wait(10)))
    assert hanging.wait(5)
    done = threading.Event()
    threads.run(done.set)
    assert done.wait(5)
    release.set()


def test_an_idle_exchange_thread_ends() -> None:
    threads = ExchangeThreads(idle_seconds=0.05)
    ran: list[threading.Thread] = []
    threads.run(lambda: ran.append(threading.current_thread()))
    wait_until(lambda: bool(ran))
    ran[0].join(timeout=5)
    assert not ran[0].is_alive() and threads._idle == []
    done = threading.Event()
    threads.run(done.set)  # a new one, then
    assert done.wait(5)


def test_a_forked_process_starts_its_own_exchange_threads() -> None:
    """The parent's idle threads do not exist in a forked child (a gunicorn worker)."""
    threads = ExchangeThreads()
    done = threading.Event()
    threads.run(done.set)
    assert done.wait(5)
    wait_until(lambda: len(threads._idle) == 1)
    pid = os.fork()
    if pid == 0:  # the child: its exchange must run, not sit in a dead thread's inbox
        ran = threading.Event()
        threads.run(ran.set)
        os._exit(0 if ran.wait(5) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

