"""Bulkheads: what keeps one user's or one dependency's trouble from taking every thread.

* ``Deadline``: one budget per request for everything a downstream token may wait on
  (a leader's result, the user's Redis lock, each call to Entra ID).
* ``SingleFlight``: concurrent requests of one user share the leader's result instead of
  queueing one after another behind a per-user lock.
* ``WaitingRoom``: a cap on the threads of a worker that may wait on Entra ID at once;
  beyond it a request is refused at once, so warm users always find a free thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Generic, TypeVar

from .errors import TokenAcquisitionBusy, TooManyWaiting
from .tracing import WAIT_SPAN, span

T = TypeVar("T")


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
    """Hold an in-process lock, or answer 503 when it stays taken for ``seconds``."""
    if not lock.acquire(timeout=max(seconds, 0.0)):
        raise TokenAcquisitionBusy()
    try:
        yield lock
    finally:
        lock.release()


class SingleFlight(Generic[T]):
    """One call per key at a time in this process; callers arriving meanwhile wait for it.

    A follower waits at most until its own deadline, then gets ``TokenAcquisitionBusy``.
    The leader's result and errors are shared, except errors of the types in
    ``private_errors``: they concern the leader's own input (say, its incoming token was
    refused), so a follower that sees one makes the call for itself.
    """

    def __init__(self, private_errors: tuple[type[BaseException], ...] = ()) -> None:
        self._lock = threading.Lock()
        self._flights: dict[Hashable, Future[T]] = {}
        self._private_errors = private_errors

    def run(self, key: Hashable, call: Callable[[], T], deadline: Deadline) -> T:
        while True:
            with self._lock:
                flight = self._flights.get(key)
                if flight is None:
                    flight = self._flights[key] = Future()
                    break
            try:
                with span(WAIT_SPAN):  # waiting on another thread's call (its exchange)
                    return flight.result(timeout=deadline.remaining())
            except FutureTimeout:
                raise TokenAcquisitionBusy() from None
            except self._private_errors:
                continue  # the leader's own problem: try again, leading or following anew
        try:
            result = call()
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        else:
            flight.set_result(result)
            return result
        finally:
            with self._lock:
                del self._flights[key]

    def running(self, first: Hashable) -> bool:
        """Is a call running whose key is ``first`` or a tuple starting with it?"""
        with self._lock:
            return any(key == first or (isinstance(key, tuple) and key[0] == first)
                       for key in self._flights)


class WaitingRoom:
    """At most ``capacity`` threads inside at once; the next one is turned away at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seats = threading.BoundedSemaphore(capacity)

    @contextmanager
    def seat(self) -> Iterator[None]:
        if not self._seats.acquire(blocking=False):
            raise TooManyWaiting()
        try:
            yield
        finally:
            self._seats.release()
