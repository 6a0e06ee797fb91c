"""A circuit breaker for the token-cache store: once Redis is known to be down or hanging,
no request waits on it; one probe at a time, off any request, finds out when it is back.

Why not pybreaker: its ``CircuitBreaker.call`` (1.4) holds the breaker's ``RLock`` for
the whole guarded call, so every Redis command of a worker would run one at a time, and
while Redis hangs every thread would queue behind the one call in flight: the opposite
of what a breaker is for. This one takes its lock only to change state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import Enum

from .shared_memory import doubles

log = logging.getLogger(__name__)


class State(Enum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls fail at once until the reset timeout has passed
    HALF_OPEN = "half_open"  # a probe is in flight; the others fail at once (a probe that
    # hangs past the reset timeout lets one more through, so a lost probe never sticks)


class Health:
    """When a dependency last failed, last answered and last had a circuit opened for it
    (``time.monotonic()``, one clock for every process of the host), as every breaker
    sharing it reported.

    ``Health()`` is a breaker's own; ``Health(shared=True)`` is the same memory in every
    worker forked afterwards (``flask_obo.share_across_workers()``), so a worker recycled
    while Redis hangs knows it at once instead of finding out by waiting a timeout, and a
    running worker's circuit opens as soon as a sibling's does."""

    def __init__(self, shared: bool = False) -> None:
        self._cells = doubles(3, shared=shared)  # last failure, last answer, last opening; 0.0: never

    def failed(self) -> None:
        self._cells[0] = time.monotonic()

    def answered(self) -> None:
        self._cells[1] = time.monotonic()

    def opened(self) -> None:
        self._cells[2] = time.monotonic()

    def down_since(self) -> float | None:
        """When it last failed, if it has not answered since."""
        failed, answered = self._cells[0], self._cells[1]
        return failed if failed > answered else None

    def open_since(self) -> float | None:
        """When a circuit last opened for it, if it has not answered since."""
        opened, answered = self._cells[2], self._cells[1]
        return opened if opened > answered else None


class CircuitBreaker:
    """Opens after ``failure_threshold`` failures in a row, or at once on a call that
    waited its whole timeout (``timed_out``); after ``reset_timeout`` seconds one probe
    finds out whether the dependency is back: closed on success, open again on failure.

    The probe is the ``probe`` function, in a thread of its own, when there is one: no
    caller waits on a dependency known to hang, they all go on without it until the probe
    has seen it answer. Without one the next caller is the probe.

    Breakers sharing a ``health`` (the workers of one server) follow each other: a new one
    starts open when the dependency failed and has not answered since (opened when that
    failure was seen), and a closed one opens when another opened after it last closed.
    A worker thus waits one timeout for a hanging Redis, not one per worker.
    """

    def __init__(self, name: str, failure_threshold: int = 3, reset_timeout: float = 2.0,
                 health: Health | None = None, probe: Callable[[], bool] | None = None) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self._health = health or Health()
        self._probe = probe
        self._lock = threading.Lock()
        self._state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._closed_at = 0.0  # when it last closed: a sibling's opening before then is old news
        down_since = self._health.down_since()
        if down_since is not None:
            self._state, self._opened_at = State.OPEN, down_since

    @property
    def state(self) -> State:
        if self._state is State.CLOSED:
            self._follow_siblings()
        return self._state

    def _follow_siblings(self) -> None:
        """Open, as of then, if another breaker of the same health opened since this one
        last closed and the dependency has not answered since (two reads of shared
        memory: this runs on every call)."""
        opened = self._health.open_since()
        if opened is None or opened <= self._closed_at:
            return
        with self._lock:
            if self._state is State.CLOSED:
                log.warning("%s: a sibling's circuit opened; this one follows", self.name)
                self._state, self._opened_at, self._failures = State.OPEN, opened, 0

    def allow(self) -> bool:
        """May the caller try the dependency now? (Then it must report the outcome.)"""
        if self.state is State.CLOSED:
            return True
        with self._lock:
            admitted, probing = self._admit(time.monotonic())
        if probing and self._probe is not None:
            threading.Thread(target=self._run_probe, name=f"{self.name}-probe", daemon=True).start()
            return False  # the caller goes on without it; the probe reports
        return admitted

    def _admit(self, now: float) -> tuple[bool, bool]:
        """Under the lock: (may the caller go, is a probe due now). Closed meanwhile by
        another thread, or a probe is due (the caller, or the ``probe`` function)."""
        if self._state is State.CLOSED:
            return True, False
        if now - self._opened_at >= self.reset_timeout:
            self._state, self._opened_at = State.HALF_OPEN, now
            return True, True
        return False, False

    def _run_probe(self) -> None:
        try:
            answered = self._probe() if self._probe is not None else False
        except Exception as exc:  # a probe that breaks is a failed one, never a stuck circuit
            log.error("%s probe failed: %s", self.name, type(exc).__name__)  # (no text: may name a host)
            answered = False
        if answered:
            self.success()
        else:
            self.failure()

    def success(self) -> None:
        if self._state is State.CLOSED and self._failures == 0:
            if self._health.open_since() is not None:
                self._health.answered()  # a sibling opened, but it answers here: not down
            return
        with self._lock:
            if self._state is not State.CLOSED:
                log.warning("%s is back: circuit closed", self.name)
            self._state, self._failures = State.CLOSED, 0
            self._closed_at = time.monotonic()
            self._health.answered()

    def trip(self) -> None:
        """Open now: someone watching the dependency (the invalidation listener) saw it
        stop answering, so no request need find out by waiting a timeout."""
        with self._lock:
            self._health.failed()
            if self._state is not State.CLOSED:
                return  # already open: keep its probe schedule
            log.error("%s stopped answering: circuit open, requests go on without it", self.name)
            self._open()

    def timed_out(self) -> None:
        """A call waited its whole timeout: the dependency hangs, and each further caller
        would wait as long. Open now, whatever the count of failures (a probe that timed
        out reopens it; one let through before it opened keeps its probe schedule)."""
        with self._lock:
            self._health.failed()
            self._failures += 1
            if self._state is State.OPEN:
                return
            if self._state is State.CLOSED:
                log.error("%s timed out: circuit open, requests go on without it", self.name)
            self._open()

    def failure(self) -> None:
        with self._lock:
            self._health.failed()
            self._failures += 1
            if self._state is State.HALF_OPEN or (
                self._state is State.CLOSED and self._failures >= self.failure_threshold
            ):
                if self._state is State.CLOSED:
                    log.error("%s is failing: circuit open, requests go on without it", self.name)
                self._open()

    def _open(self) -> None:
        """Under the lock."""
        self._state, self._opened_at = State.OPEN, time.monotonic()
        self._health.opened()
