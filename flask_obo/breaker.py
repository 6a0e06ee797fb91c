"""A circuit breaker for the token-cache store: once Redis is known to be down or hanging,
no request waits on it; one probe at a time finds out when it is back.

Why not pybreaker: its ``CircuitBreaker.call`` (1.4) holds the breaker's ``RLock`` for
the whole guarded call, so every Redis command of a worker would run one at a time, and
while Redis hangs every thread would queue behind the one call in flight: the opposite
of what a breaker is for. This one takes its lock only to change state.
"""

from __future__ import annotations

import logging
import threading
import time
from enum import Enum

from .shared_memory import doubles

log = logging.getLogger(__name__)


class State(Enum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls fail at once until the reset timeout has passed
    HALF_OPEN = "half_open"  # a probe is in flight; the others fail at once (a probe that
    # hangs past the reset timeout lets one more through, so a lost probe never sticks)


class Health:
    """When a dependency last failed and last answered (``time.monotonic()``, one clock
    for every process of the host), as every breaker sharing it reported.

    ``Health()`` is a breaker's own; ``Health(shared=True)`` is the same memory in every
    worker forked afterwards (``flask_obo.share_across_workers()``), so a worker recycled
    while Redis hangs knows it at once instead of finding out by waiting a timeout."""

    def __init__(self, shared: bool = False) -> None:
        self._cells = doubles(2, shared=shared)  # last failure, last answer; 0.0: never

    def failed(self) -> None:
        self._cells[0] = time.monotonic()

    def answered(self) -> None:
        self._cells[1] = time.monotonic()

    def down_since(self) -> float | None:
        """When it last failed, if it has not answered since."""
        failed, answered = self._cells[0], self._cells[1]
        return failed if failed > answered else None


class CircuitBreaker:
    """Opens after ``failure_threshold`` failures in a row; after ``reset_timeout``
    seconds lets one probe through, which closes it on success and reopens it on failure.

    A new breaker starts open when its ``health`` says the dependency failed and has not
    answered since (another worker of the server found out), opened when that failure
    was seen: its first caller after ``reset_timeout`` is the probe, and the others go on
    without the dependency at once.
    """

    def __init__(self, name: str, failure_threshold: int = 3, reset_timeout: float = 2.0,
                 health: Health | None = None) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self._health = health or Health()
        self._lock = threading.Lock()
        self._state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        down_since = self._health.down_since()
        if down_since is not None:
            self._state, self._opened_at = State.OPEN, down_since

    @property
    def state(self) -> State:
        return self._state

    def allow(self) -> bool:
        """May the caller try the dependency now? (Then it must report the outcome.)"""
        if self._state is State.CLOSED:
            return True
        with self._lock:
            return self._admit(time.monotonic())

    def _admit(self, now: float) -> bool:
        """Under the lock: closed meanwhile by another thread, or this caller is the probe."""
        if self._state is State.CLOSED:
            return True
        if now - self._opened_at >= self.reset_timeout:
            self._state, self._opened_at = State.HALF_OPEN, now
            return True
        return False

    def success(self) -> None:
        if self._state is State.CLOSED and self._failures == 0:
            return
        with self._lock:
            if self._state is not State.CLOSED:
                log.warning("%s is back: circuit closed", self.name)
            self._state, self._failures = State.CLOSED, 0
            self._health.answered()

    def trip(self) -> None:
        """Open now: someone watching the dependency (the invalidation listener) saw it
        stop answering, so no request need find out by waiting a timeout."""
        with self._lock:
            self._health.failed()
            if self._state is not State.CLOSED:
                return  # already open: keep its probe schedule
            log.error("%s stopped answering: circuit open, requests go on without it", self.name)
            self._state, self._opened_at = State.OPEN, time.monotonic()

    def failure(self) -> None:
        with self._lock:
            self._health.failed()
            self._failures += 1
            if self._state is State.HALF_OPEN or (
                self._state is State.CLOSED and self._failures >= self.failure_threshold
            ):
                if self._state is State.CLOSED:
                    log.error("%s is failing: circuit open, requests go on without it", self.name)
                self._state, self._opened_at = State.OPEN, time.monotonic()
