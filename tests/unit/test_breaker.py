"""The Redis circuit breaker, on a clock the tests move: closed until N failures in a row,
then failing fast; after the reset timeout one probe at a time, whose outcome closes or
reopens it; a probe that never reports does not keep it shut."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from flask_obo import breaker as breaker_module
from flask_obo.breaker import CircuitBreaker, Health, State

THRESHOLD = 3
RESET = 2.0


class Clock:
    """Stands in for the ``time`` module in ``app.breaker``: ``monotonic()`` moves only
    when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(breaker_module, "time", fake)
    return fake


@pytest.fixture
def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker("redis", failure_threshold=THRESHOLD, reset_timeout=RESET)


def trip(breaker: CircuitBreaker) -> None:
    """Fail ``failure_threshold`` calls in a row."""
    for _ in range(breaker.failure_threshold):
        assert breaker.allow()
        breaker.failure()


def test_closed_lets_every_call_through(breaker: CircuitBreaker) -> None:
    assert all(breaker.allow() for _ in range(100))
    assert breaker.state is State.CLOSED


def test_opens_after_threshold_failures_in_a_row(breaker: CircuitBreaker) -> None:
    for _ in range(THRESHOLD - 1):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state is State.CLOSED
    assert breaker.allow()
    breaker.failure()
    assert breaker.state is State.OPEN


def test_a_success_resets_the_count_of_failures(breaker: CircuitBreaker) -> None:
    for _ in range(3):  # never THRESHOLD in a row
        for _ in range(THRESHOLD - 1):
            breaker.failure()
        breaker.success()
    assert breaker.state is State.CLOSED
    assert breaker.allow()


def test_open_fails_fast_until_the_reset_timeout(breaker: CircuitBreaker, clock: Clock) -> None:
    trip(breaker)
    for _ in range(10):
        assert not breaker.allow()
    clock.advance(RESET - 0.01)
    assert not breaker.allow()
    assert breaker.state is State.OPEN


def test_after_the_reset_timeout_one_probe_goes_through(breaker: CircuitBreaker, clock: Clock) -> None:
    trip(breaker)
    clock.advance(RESET)
    assert breaker.allow()  # the probe
    assert breaker.state is State.HALF_OPEN
    assert [breaker.allow() for _ in range(10)] == [False] * 10  # the others, while it is out


def test_one_probe_among_concurrent_callers(breaker: CircuitBreaker, clock: Clock) -> None:
    trip(breaker)
    clock.advance(RESET)
    start = threading.Barrier(16)

    def ask(_: int) -> bool:
        start.wait()
        return breaker.allow()

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(ask, range(16))) == 1


def test_a_probe_that_succeeds_closes_it(breaker: CircuitBreaker, clock: Clock) -> None:
    trip(breaker)
    clock.advance(RESET)
    assert breaker.allow()
    breaker.success()
    assert breaker.state is State.CLOSED
    assert all(breaker.allow() for _ in range(10))
    for _ in range(THRESHOLD - 1):  # and it counts failures from zero again
        breaker.failure()
    assert breaker.state is State.CLOSED


def test_a_probe_that_fails_reopens_it_for_another_reset_timeout(breaker: CircuitBreaker,
                                                                 clock: Clock) -> None:
    trip(breaker)
    clock.advance(RESET)
    assert breaker.allow()
    breaker.failure()  # one failure is enough: it was the probe
    assert breaker.state is State.OPEN
    clock.advance(RESET - 0.01)
    assert not breaker.allow()
    clock.advance(0.01)
    assert breaker.allow()
    assert breaker.state is State.HALF_OPEN


def test_a_lost_probe_does_not_keep_it_shut(breaker: CircuitBreaker, clock: Clock) -> None:
    """The probe hangs, or its thread dies, and never reports: after another reset timeout
    the next caller probes instead."""
    trip(breaker)
    clock.advance(RESET)
    assert breaker.allow()  # a probe that never reports
    clock.advance(RESET - 0.01)
    assert not breaker.allow()
    clock.advance(0.01)
    assert breaker.allow()
    breaker.success()
    assert breaker.state is State.CLOSED


def test_a_late_failure_of_a_call_started_before_it_opened_does_not_extend_it(
    breaker: CircuitBreaker, clock: Clock
) -> None:
    trip(breaker)
    clock.advance(RESET - 0.5)
    breaker.failure()  # a call let through while closed, failing only now
    assert breaker.state is State.OPEN
    clock.advance(0.5)
    assert breaker.allow()


def test_a_watcher_can_open_it_at_once_and_it_then_probes_as_usual(breaker: CircuitBreaker,
                                                                    clock: Clock) -> None:
    breaker.trip()  # the invalidation listener saw Redis stop answering: no request need wait

    assert breaker.state is State.OPEN and not breaker.allow()
    clock.advance(RESET)
    assert breaker.allow()  # the probe
    breaker.success()
    assert breaker.state is State.CLOSED and breaker.allow()


def test_repeated_trips_do_not_push_the_probe_back(breaker: CircuitBreaker, clock: Clock) -> None:
    """A listener that keeps failing to reconnect reports it each time: the first report
    opens the circuit, the later ones must not keep postponing its probe."""
    breaker.trip()
    for _ in range(4):
        clock.advance(RESET / 2)
        breaker.trip()

    assert breaker.allow()  # a probe, RESET after the first trip


# --- health shared across workers (flask_obo.share_across_workers) ---------------------------


def test_a_breaker_born_while_a_sibling_sees_redis_down_starts_open(clock: Clock) -> None:
    """A worker recycled during a Redis hang: its requests go on without Redis at once (no
    timeout each), and its first caller after the reset timeout is the probe."""
    health = Health()
    sibling = CircuitBreaker("redis", THRESHOLD, RESET, health)
    assert sibling.allow()
    sibling.failure()  # one failure is enough to know: it has not answered since
    clock.advance(0.5)
    fresh = CircuitBreaker("redis", THRESHOLD, RESET, health)
    assert fresh.state is State.OPEN and not fresh.allow()
    clock.advance(RESET - 0.5)  # the reset timeout counts from the sibling's failure
    assert fresh.allow()  # the probe
    fresh.success()
    assert fresh.state is State.CLOSED
    assert CircuitBreaker("redis", THRESHOLD, RESET, health).state is State.CLOSED  # it answered


def test_a_breaker_born_after_redis_answered_again_starts_closed(clock: Clock) -> None:
    health = Health()
    sibling = CircuitBreaker("redis", THRESHOLD, RESET, health)
    trip(sibling)
    clock.advance(RESET)
    assert sibling.allow()
    sibling.success()  # the sibling's probe: Redis is back
    assert CircuitBreaker("redis", THRESHOLD, RESET, health).state is State.CLOSED
    assert CircuitBreaker("redis", THRESHOLD, RESET, Health()).state is State.CLOSED  # knows nothing


def test_health_shared_across_forks_reaches_a_process_forked_before_the_failure() -> None:
    health = Health(shared=True)
    pid = os.fork()
    if pid == 0:  # a sibling worker: Redis fails for it
        CircuitBreaker("redis", THRESHOLD, RESET, health).failure()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert health.down_since() is not None
    assert CircuitBreaker("redis", THRESHOLD, RESET, health).state is State.OPEN


def test_making_the_redis_client_is_not_the_open_breakers_probe() -> None:
    """It sends no command, so it proves nothing: the circuit stays open (a request's real
    command probes), and the token cache's requests keep going on without a timeout."""
    import fakeredis

    from flask_obo.cache_store import RedisTokenCacheStore

    store = RedisTokenCacheStore(fakeredis.FakeRedis, "test", 60, listen=True)
    store.breaker = CircuitBreaker("redis", THRESHOLD, reset_timeout=0.0)  # probe due at once
    store.breaker.trip()
    assert not store.coherence().connected
    assert store.breaker.state is State.OPEN


# --- a call that waited its whole timeout; breakers that follow their siblings --------------


def test_a_timed_out_call_opens_it_at_once(breaker: CircuitBreaker, clock: Clock) -> None:
    """Redis hangs: each further caller would wait the same timeout, so nobody does."""
    assert breaker.allow()
    breaker.timed_out()
    assert breaker.state is State.OPEN and not breaker.allow()
    clock.advance(RESET)
    assert breaker.allow()  # the probe (no probe function here: the caller)
    breaker.timed_out()  # it hung too: open for another reset timeout
    assert breaker.state is State.OPEN and not breaker.allow()


def test_a_late_timeout_of_a_call_started_before_it_opened_keeps_the_probe_schedule(
    breaker: CircuitBreaker, clock: Clock
) -> None:
    breaker.timed_out()
    clock.advance(RESET - 0.1)
    breaker.timed_out()  # a call let through while it was closed, timing out only now
    clock.advance(0.1)
    assert breaker.allow()


def test_a_closed_breaker_follows_a_sibling_that_opened(clock: Clock) -> None:
    """Two workers, Redis hangs: the second one's callers go on without Redis as soon as
    the first one's circuit opened, instead of each waiting its own timeout."""
    health = Health()
    first = CircuitBreaker("redis", THRESHOLD, RESET, health)
    second = CircuitBreaker("redis", THRESHOLD, RESET, health)
    assert second.allow()
    clock.advance(0.5)
    first.timed_out()

    assert second.state is State.OPEN and not second.allow()
    clock.advance(RESET)  # its probe counts from the sibling's opening
    assert second.allow()
    second.success()
    assert second.state is State.CLOSED and second.allow()
    assert first.state is State.OPEN  # each finds out for itself that Redis is back


def test_a_sibling_failing_below_its_threshold_is_not_followed(clock: Clock) -> None:
    health = Health()
    first = CircuitBreaker("redis", THRESHOLD, RESET, health)
    second = CircuitBreaker("redis", THRESHOLD, RESET, health)
    first.failure()  # a blip, not an outage
    assert second.state is State.CLOSED and second.allow()


def test_an_opening_older_than_the_last_close_is_not_followed(clock: Clock) -> None:
    health = Health()
    first = CircuitBreaker("redis", THRESHOLD, RESET, health)
    second = CircuitBreaker("redis", THRESHOLD, RESET, health)
    first.trip()
    assert second.state is State.OPEN
    clock.advance(RESET)
    assert second.allow()
    second.success()  # Redis is back for the second one
    clock.advance(0.1)
    assert second.state is State.CLOSED  # the first's old opening is no news to it
    assert CircuitBreaker("redis", THRESHOLD, RESET, health).state is State.CLOSED


def test_a_closed_breaker_that_sees_redis_answer_tells_its_siblings(clock: Clock) -> None:
    """A sibling opened (its own connection broke, say) but Redis answers here: new
    workers must not start open because of it."""
    health = Health()
    first = CircuitBreaker("redis", THRESHOLD, RESET, health)
    second = CircuitBreaker("redis", THRESHOLD, RESET, health)
    assert second.allow()  # let through before the sibling opened
    clock.advance(0.1)
    first.trip()
    second.success()  # ...and Redis answered it
    assert health.open_since() is None and health.down_since() is None


def test_breakers_in_forked_workers_follow_each_other() -> None:
    health = Health(shared=True)
    running = CircuitBreaker("redis", THRESHOLD, RESET, health)  # forked before the failure
    pid = os.fork()
    if pid == 0:  # a sibling worker: a Redis call of it times out
        CircuitBreaker("redis", THRESHOLD, RESET, health).timed_out()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert running.state is State.OPEN and not running.allow()


# --- a probe function: no caller waits on a dependency known to hang -------------------------


class Probe:
    """The dependency's answer to the breaker's probe, and a record of the probes run."""

    def __init__(self, answers: bool | Exception) -> None:
        self.answers = answers
        self.ran = threading.Semaphore(0)
        self.threads: list[str] = []
        self.gate = threading.Event()  # the dependency answers once it is set
        self.gate.set()

    def __call__(self) -> bool:
        self.threads.append(threading.current_thread().name)
        try:
            assert self.gate.wait(timeout=5)
            if isinstance(self.answers, Exception):
                raise self.answers
            return self.answers
        finally:
            self.ran.release()


def probed(answers: bool | Exception, clock: Clock) -> tuple[CircuitBreaker, Probe]:
    probe = Probe(answers)
    breaker = CircuitBreaker("redis", THRESHOLD, RESET, Health(), probe=probe)
    breaker.trip()
    clock.advance(RESET)
    return breaker, probe


def settled(breaker: CircuitBreaker, probe: Probe) -> State:
    """The state once the probe thread has reported (its thread ends right after)."""
    assert probe.ran.acquire(timeout=5)
    for thread in threading.enumerate():
        if thread.name == "redis-probe":
            thread.join(timeout=5)
    return breaker.state


def test_with_a_probe_function_no_caller_is_the_probe(clock: Clock) -> None:
    breaker, probe = probed(True, clock)
    probe.gate.clear()  # Redis takes its time to answer the probe
    assert [breaker.allow() for _ in range(10)] == [False] * 10  # they all go on without it
    assert breaker.state is State.HALF_OPEN
    probe.gate.set()

    assert settled(breaker, probe) is State.CLOSED
    assert probe.threads == ["redis-probe"]  # once, off the callers' threads
    assert breaker.allow()


def test_a_probe_function_that_finds_it_down_reopens_it(clock: Clock) -> None:
    breaker, probe = probed(False, clock)
    assert not breaker.allow()
    assert settled(breaker, probe) is State.OPEN
    assert not breaker.allow()  # a whole reset timeout again
    clock.advance(RESET)
    assert not breaker.allow()  # the next probe, again off the callers
    assert settled(breaker, probe) is State.OPEN
    assert len(probe.threads) == 2


def test_a_probe_function_that_breaks_reopens_it_rather_than_stick(clock: Clock) -> None:
    breaker, probe = probed(RuntimeError("boom"), clock)
    assert not breaker.allow()
    assert settled(breaker, probe) is State.OPEN
    clock.advance(RESET)
    probe.answers = True
    assert not breaker.allow()
    assert settled(breaker, probe) is State.CLOSED
