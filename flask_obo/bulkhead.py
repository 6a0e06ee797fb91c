"""Bulkheads: what keeps one user's or one dependency's trouble from taking every thread.

* ``Deadline``: one budget per request for everything a downstream token may wait on
  (an exchange in flight, the user's Redis lock, each call to Entra ID).
* ``SingleFlight``: one exchange per user (and scopes) at a time in this process. The
  exchange runs in a thread of its own; every request that needs its result, the one
  that started it included, *waits* for it in the ``WaitingRoom``, and may leave.
* ``WaitingRoom``: how long, and how many, of a worker's threads may wait on Entra ID.
* ``EntraPace``: how long exchanges take while Entra ID answers (the room's clock), and
  when one last got an answer (a slow Entra ID still answers; a hanging one does not).
* ``WorkerRetirement`` / ``retire_worker()``: the process is going away; nobody waits
  on Entra ID any longer.

Why waiting, not calling, is what is bounded
--------------------------------------------
A worker has a few threads (gunicorn gthread: 8). A thread waiting on Entra ID, calling it
or waiting for another request's exchange, serves nobody else meanwhile. While Entra ID
answers at its usual pace that costs nothing worth refusing anyone for: an SPA's first
page load fires several calls of one user at once, a login wave many users' first calls;
they are all answered a few hundred milliseconds later. While Entra ID hangs, the same
waits would take every thread until the deadline, and warm users, who need no Entra ID
at all, would queue behind them.

So the room follows Entra ID's observed pace (``EntraPace``): a wait is *on time* while
the exchange it waits for is younger than the pace's ``patience()`` (a few times the
slowest recent exchange, between ``PATIENCE_FLOOR`` and ``PATIENCE_CAP``; ``PATIENCE_PRIOR``
before the server saw its first answer). On-time waits take no seat and are never
refused, however many there are: one user's burst and a login wave are answered,
however large. An exchange past its patience while other exchanges keep getting
answers (one landed within ``LIVE_WINDOW``, or the slowest recent exchange's time) is
slow, not hung: a busy Entra ID, or a login wave on a loaded host, and its waiters stay
seat-free too. Only while an exchange is *overdue* and Entra ID answers nobody must each
of its waiters hold one of the ``capacity`` seats (``ENTRA_MAX_WAITING_THREADS``) to go
on waiting, until its deadline or until answers come again (then it gives the seat
back); a waiter that finds none is answered 503 with ``Retry-After`` at once, and while
every seat is taken and nothing answers no new exchange starts (503 at once as well).
So a hanging Entra ID holds at most ``capacity`` threads of a worker past the patience,
and the others only for the patience (at most ``PATIENCE_CAP``, and ``PATIENCE_FLOOR``
after fast exchanges).

An exchange runs in its own (daemon) thread so that a waiter can always leave: at its
deadline, when the exchange is overdue and the room is full, or at once when the worker
retires. A request thread blocked in a socket read could not. The exchange itself is
bounded by the deadline of the request that started it, and writes its token back to the
cache even when nobody waits for it any more, so the user's retry finds it.

A worker that retires (gunicorn's ``max_requests``, SIGTERM, SIGHUP) waits for its
requests in flight before it exits, and gunicorn forks its replacement only then. So
``retire_worker()`` (call it from the server's hooks: ``config/gunicorn.conf.py``) ends
every overdue wait on Entra ID in the process at once with 503 ``temporarily_unavailable``
and ``Retry-After``, and any other at its exchange's patience at the latest: a healthy
Entra ID's answer, due in a moment, still reaches its requests (a fresh worker recycled
during a Redis pause exchanges for its warm users, say), a slow or hanging one holds
nobody. Requests served from the cache go on as before.
"""

from __future__ import annotations

import contextvars
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from .errors import TokenAcquisitionBusy, TooManyWaiting, WorkerRetiring
from .shared_memory import doubles
from .store_errors import LockBusy
from .tracing import WAIT_SPAN, span

T = TypeVar("T")

#: How long an exchange may take before it is overdue: ``PATIENCE_FACTOR`` times the slowest
#: of the last ``PACE_WINDOW`` exchanges that got an answer, kept within these bounds.
#: Before the first answer (a fresh worker), ``PATIENCE_PRIOR``.
PATIENCE_FLOOR = 0.25  # scheduling noise on a busy host must not make a fast exchange overdue
# The longest a slow or hanging Entra ID holds threads beyond the seats: every thread of a
# worker may be waiting on time meanwhile (one user's burst), so warm users wait as long.
# Issue 15 bounds their worst latency during a hang by max(3 x their usual p99, 1 s).
PATIENCE_CAP = 0.75
# A fresh worker has not seen Entra ID's pace yet: it gives its first exchanges longer
# rather than refuse a healthy Entra ID's callers because the host is busy (a login wave
# or a recycled worker's first users); its first answer sets the pace.
PATIENCE_PRIOR = 3.0
PATIENCE_FACTOR = 3.0
PACE_WINDOW = 32
# While Entra ID keeps answering other exchanges (one landed within this window, or within
# the slowest recent exchange's time if longer), an exchange past its patience is slow, not
# hung: a login wave on a busy host. Its waiters stay seat-free; a hanging Entra ID answers
# nobody, so it gets no such grace once that much silence has passed.
LIVE_WINDOW = 1.0
# An exchange's thread, its exchange done, waits this long for the next one before it ends.
IDLE_EXCHANGE_THREAD_SECONDS = 30.0


class Deadline:
    """A point in (monotonic) time by which a request must have its answer."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at


@contextmanager
def held(lock: threading.Lock, seconds: float) -> Iterator[threading.Lock]:
    """Hold an in-process lock (the memory store's partition locks), or raise ``LockBusy``
    when it stays taken for ``seconds``."""
    if not lock.acquire(timeout=max(seconds, 0.0)):
        raise LockBusy()
    try:
        yield lock
    finally:
        lock.release()


class WorkerRetirement:
    """Whether this process is going away; once it is, every ``WaitingRoom`` watching it
    wakes its waiters (who leave with ``WorkerRetiring``) and admits nobody.

    One per process (``retire_worker`` begins it); tests make their own."""

    def __init__(self) -> None:
        self._begun = threading.Event()
        self._rooms: weakref.WeakSet[WaitingRoom] = weakref.WeakSet()
        self._lock = threading.Lock()

    @property
    def begun(self) -> bool:
        return self._begun.is_set()

    def begin(self) -> None:
        """Idempotent; safe from any thread (not from a signal handler: it takes locks)."""
        with self._lock:
            self._begun.set()
            rooms = list(self._rooms)
        for room in rooms:
            room.wake()

    def watch(self, room: WaitingRoom) -> None:
        with self._lock:
            self._rooms.add(room)


_process_retirement = WorkerRetirement()


def process_retirement() -> WorkerRetirement:
    """This process's ``WorkerRetirement``: the one ``retire_worker`` begins."""
    return _process_retirement


def retire_worker() -> None:
    """Tell flask-obo that this worker process has begun to retire.

    Call it from the server's hooks as soon as the worker stops taking new connections
    (gunicorn: its ``alive`` flag turned false after ``max_requests``, SIGTERM or SIGHUP;
    see ``config/gunicorn.conf.py``). From then on, in every ``FlaskOBO`` application of
    the process, each request that waits on an overdue exchange with Entra ID (its own or
    another request's) ends at once with 503 ``temporarily_unavailable`` and
    ``Retry-After: 1``, and one whose exchange is still on time when its patience runs
    out (``EntraPace``, at most ``PATIENCE_CAP``). Requests served from the token cache,
    and everything else, run to their end as before. So a hanging Entra ID cannot keep the
    worker, and its replacement, from starting anew.
    """
    _process_retirement.begin()


class EntraPace:
    """How long exchanges take while Entra ID answers: the room's clock.

    Exchanges that got an answer are observed (ones that timed out are not: they say
    nothing about the pace of a working Entra ID). See the module's docstring.

    Its record is a few numbers in a buffer: the count of observations, when the last
    answer came (``time.monotonic()``, one clock for every process of the host), and the
    ring of recent durations. ``EntraPace()`` keeps them in this process;
    ``EntraPace(shared=True)`` in memory that the processes it forks afterwards share
    (``flask_obo.shared_memory``), so a worker forked during a hang (a recycled one)
    starts from its server's pace instead of ``PATIENCE_PRIOR``: see
    ``flask_obo.share_across_workers()``. Two workers writing at once lose at most one
    observation.
    """

    _CELLS = 2 + PACE_WINDOW  # count, last answer, the ring

    def __init__(self, shared: bool = False) -> None:
        self._record = doubles(self._CELLS, shared=shared)
        self._lock = threading.Lock()  # this process's threads; processes take none
        # Not in the shared record: each process's own (a fork copies the object).
        self._pid_answered: int | None = None

    @property
    def last_answer(self) -> float:
        """When an exchange last got an answer (monotonic; -inf before the first)."""
        return self._record[1] if self._record[0] else float("-inf")

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._pid_answered = os.getpid()
            count = int(self._record[0])
            self._record[2 + count % PACE_WINDOW] = seconds
            self._record[1] = time.monotonic()
            self._record[0] = count + 1

    def slowest(self) -> float:
        """The slowest of the recent exchanges that got an answer (0 before the first)."""
        count = min(int(self._record[0]), PACE_WINDOW)
        return max(self._record[2:2 + count]) if count else 0.0

    def patience(self) -> float:
        """How old an exchange may get before its waiters need seats: ``PATIENCE_PRIOR``
        before any answer; ``PATIENCE_CAP`` in a process whose own exchanges got no answer
        yet while its siblings' did (its first exchanges pay its cold start: a new
        connection, msal's set-up, a host busy forking it); else from the recent pace."""
        if not self._record[0]:
            return PATIENCE_PRIOR
        if self._pid_answered != os.getpid():
            return PATIENCE_CAP
        return min(PATIENCE_CAP, max(PATIENCE_FLOOR, PATIENCE_FACTOR * self.slowest()))

    def answering_until(self) -> float:
        """Until when (monotonic) Entra ID counts as answering: its last answer plus
        ``LIVE_WINDOW``, or plus the slowest recent exchange's time if longer (answers
        that take seconds on a loaded host come seconds apart)."""
        return self.last_answer + max(LIVE_WINDOW, self.patience(), self.slowest())


class Flight(Generic[T]):
    """One exchange in flight: when it started and, once it landed, how it ended."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.landed = False
        self._result: T | None = None
        self._error: BaseException | None = None

    def land(self, result: T | None, error: BaseException | None) -> None:
        self._result, self._error, self.landed = result, error, True

    def outcome(self) -> T:
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]  # landed without error: a T


class WaitingRoom:
    """Where a worker's threads wait for exchanges: on time without a seat, overdue with
    one of ``capacity`` seats or not at all (see the module's docstring)."""

    def __init__(self, capacity: int, pace: EntraPace | None = None,
                 retirement: WorkerRetirement | None = None) -> None:
        self.capacity = capacity
        self.pace = pace or EntraPace()
        self._retirement = retirement or _process_retirement
        self._changed = threading.Condition()
        self._seated = 0
        self._retirement.watch(self)

    @property
    def seated(self) -> int:
        """Threads waiting on an overdue exchange."""
        with self._changed:
            return self._seated

    def admit(self) -> None:
        """May a new exchange start? Not while every seat is taken and Entra ID answers
        nobody (it is slow or hanging right now). A retiring worker may still start one:
        its waiters leave at the patience at the latest (``wait``), so a healthy Entra
        ID's answer is not thrown away."""
        with self._changed:
            if self._seated >= self.capacity and not self._answering(time.monotonic()):
                raise TooManyWaiting()

    def _answering(self, now: float) -> bool:
        """Did an exchange get an answer lately (``EntraPace.answering_until``)? Then
        Entra ID is slow, perhaps, but not hung."""
        return now < self.pace.answering_until()

    def wait(self, flight: Flight[T], deadline: Deadline) -> T:
        """The exchange's outcome, or 503 when the deadline passes, the exchange is overdue
        with no seat free, or the worker retires.

        A waiter needs a seat only while its exchange is overdue *and* Entra ID answers
        nobody; when an answer lands anywhere (``land`` wakes every waiter) it gives its
        seat back and waits seat-free again. So a busy Entra ID's callers, a login wave
        on a loaded host whose exchanges all run late, are never refused, and a hanging
        one holds at most ``capacity`` threads past the patience."""
        seated = False
        try:
            with self._changed:
                while not flight.landed:
                    if deadline.expired:
                        raise TokenAcquisitionBusy()
                    now = time.monotonic()
                    overdue_at = flight.started + self.pace.patience()
                    # A retiring worker holds nobody for an overdue exchange (a slow or
                    # hanging Entra ID); one still on time may answer in a moment.
                    if self._retirement.begun and now >= overdue_at:
                        raise WorkerRetiring()
                    if now < overdue_at or self._answering(now):
                        if seated:  # Entra ID answers again: the seat is not needed
                            self._seated -= 1
                            seated = False
                            self._changed.notify_all()
                        until = overdue_at if now < overdue_at else self.pace.answering_until()
                    else:
                        if not seated:
                            if self._seated >= self.capacity:
                                raise TooManyWaiting()
                            self._seated += 1
                            seated = True
                        until = deadline.at
                    self._changed.wait(max(0.0, min(deadline.at, until) - time.monotonic()))
            return flight.outcome()
        finally:
            if seated:
                with self._changed:
                    self._seated -= 1
                    self._changed.notify_all()

    def land(self, flight: Flight[T], result: T | None, error: BaseException | None) -> None:
        """The exchange ended: hand its outcome to its waiters."""
        if error is None:
            self.pace.observe(time.monotonic() - flight.started)
        with self._changed:
            flight.land(result, error)
            self._changed.notify_all()

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()


class ExchangeThreads:
    """Runs each exchange at once in a thread of its own (see the module's docstring),
    reusing a thread whose earlier exchange has ended: starting a thread costs about a
    tenth of a millisecond of CPU, a fair share of what an exchange itself costs us. An
    exchange never waits for a busy thread, so a hanging one holds up no other. A thread
    left idle for ``idle_seconds`` ends; a forked process (a gunicorn worker) starts with
    none, as threads do not survive a fork.

    (``concurrent.futures.ThreadPoolExecutor`` queues work once ``max_workers`` threads
    are busy, and only reuses a thread before it starts a new one; here nothing may queue.)
    """

    def __init__(self, idle_seconds: float = IDLE_EXCHANGE_THREAD_SECONDS) -> None:
        self._idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[Callable[[], None]]] = []  # each idle thread's inbox
        self._pid = os.getpid()

    def run(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._pid != os.getpid():  # forked: the idle threads stayed in the parent
                self._idle, self._pid = [], os.getpid()
            inbox = self._idle.pop() if self._idle else None
        if inbox is not None:
            inbox.put(job)
        else:
            threading.Thread(target=self._serve, args=(job,), name="flask-obo-exchange", daemon=True).start()

    def _serve(self, job: Callable[[], None] | None) -> None:
        inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        while job is not None:
            job()
            job = None  # nothing of it is kept while idle
            with self._lock:
                self._idle.append(inbox)
            try:
                job = inbox.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    if inbox in self._idle:  # not handed a job meanwhile: end
                        self._idle.remove(inbox)
                        return
                job = inbox.get()  # ``run`` took this inbox just now: its job is on its way


class SingleFlight(Generic[T]):
    """One exchange per key at a time in this process, run in a thread of its own
    (``ExchangeThreads``); the requests that need it wait for it in ``room``.

    Its outcome (result or error) is every waiter's, except errors of the types in
    ``private_errors``: they concern the starter's own input (say, its incoming token was
    refused), so another waiter that sees one starts (or joins) an exchange anew.
    """

    def __init__(self, room: WaitingRoom,
                 private_errors: tuple[type[BaseException], ...] = ()) -> None:
        self._room = room
        self._lock = threading.Lock()
        self._flights: dict[Hashable, Flight[T]] = {}
        self._private_errors = private_errors
        self._threads = ExchangeThreads()

    def run(self, key: Hashable, call: Callable[[], T], deadline: Deadline) -> tuple[T, bool]:
        """``call``'s result, from this request's exchange or the one in flight for ``key``;
        and whether this request started it."""
        while True:
            with self._lock:
                flight = self._flights.get(key)
                started = flight is None
                if flight is None:
                    self._room.admit()
                    flight = self._flights[key] = Flight()
                    self._launch(key, flight, call)
            try:
                with span(WAIT_SPAN):  # waiting on the exchange's thread
                    return self._room.wait(flight, deadline), started
            except self._private_errors:
                if started:
                    raise
                continue  # the starter's own problem: try again, starting or joining anew

    def _launch(self, key: Hashable, flight: Flight[T], call: Callable[[], T]) -> None:
        context = contextvars.copy_context()  # the request's id, for the log and Entra ID

        def fly() -> None:
            result: T | None = None
            error: BaseException | None = None
            try:
                result = context.run(call)
            except BaseException as exc:  # every outcome goes to the waiters
                error = exc
            self._room.land(flight, result, error)
            with self._lock:
                del self._flights[key]

        self._threads.run(fly)

    def running(self, first: Hashable) -> bool:
        """Is a call running whose key is ``first`` or a tuple starting with it?"""
        with self._lock:
            return any(key == first or (isinstance(key, tuple) and key[0] == first)
                       for key in self._flights)
