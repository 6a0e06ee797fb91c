"""The memory tier against a real redis-server: warm requests send Redis nothing (also one
that had to wait a moment for its user's session), and every change to a user's entry (a
write, a DEL, a TTL expiry, FLUSHDB, an eviction) reaches every worker's memory copy
within a second, through the invalidation channel. While that channel is down, copies are
unverified: each request re-reads Redis until it is back, and a delete or an expiry seen
meanwhile is not undone by writing the old copy back.

Each test runs its own redis-server, so ``INFO commandstats`` counts this test's
commands only, and stops its apps' invalidation listeners when it ends.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import responses

from app import create_app
from flask_obo.bulkhead import Deadline
from flask_obo.cache_store import StoreBudget, TokenCacheStore
from flask_obo.extension import services_of
from flask_obo.invalidation import PING_EVERY
from flask_obo.protector import EntraAccessToken
from flask_obo.settings import Settings
from flask_obo.token_cache import TokenCacheCodec, partition_key
from tests.support.fake_entra import ADELE, BOB, TENANT_ID, FakeEntra, settings_env
from tests.support.servers import RedisProcess, command_calls

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

COHERENCE_BOUND = 1.0  # seconds within which every worker honours a change to an entry
WARM_REQUESTS = 200
MAX_COMMANDS_PER_WARM_REQUEST = 0.02
GRAPH_SCOPES = ["https://graph.microsoft.com/.default"]
CAROL, DAN = "c3c3c3c3-0000-4000-8000-000000000003", "d4d4d4d4-0000-4000-8000-000000000004"
USERS = [ADELE, BOB, CAROL, DAN]
BARRIER = "0" * 64  # a partition no user has (see Worker.drain)
OWN_COMMANDS = ("info", "client|list", "client|kill", "acl|setuser", "config|set", "config|resetstat")


# --- doubles and workers ------------------------------------------------------------------------


@dataclass
class RecordingEntra(FakeEntra):
    """The Entra ID + Graph double, also keeping the bearer token of every Graph request."""

    graph_bearers: list[str] = field(default_factory=list)
    hold_token_requests: threading.Event | None = None  # set: token requests wait until it is set
    token_request_waiting: threading.Event = field(default_factory=threading.Event)

    def _graph(self, request: Any) -> tuple[int, dict[str, str], str]:
        self.graph_bearers.append(request.headers.get("Authorization", "").removeprefix("Bearer "))
        return super()._graph(request)

    def _token(self, request: Any) -> tuple[int, dict[str, str], str]:
        if self.hold_token_requests is not None:
            self.token_request_waiting.set()
            assert self.hold_token_requests.wait(10), "a token request was held too long"
        return super()._token(request)


class Worker:
    """One app built by ``create_app`` (a gunicorn worker, or an instance): its own store,
    invalidation listener and memory tier, on the shared Redis."""

    def __init__(self, settings: Settings, entra: FakeEntra, store: TokenCacheStore | None = None) -> None:
        self.app = create_app(settings, store=store)
        self.settings = settings
        self.client = self.app.test_client()
        self.store = services_of(self.app).store
        self.tokens = services_of(self.app).tokens
        self.entra = entra
        self._spa_tokens: dict[str, str] = {}
        assert settings.redis_url
        self._control = redis.Redis.from_url(settings.redis_url, socket_timeout=5)

    def me(self, oid: str = ADELE) -> int:
        """GET /api/me as ``oid`` (with one SPA token per user, as a SPA reuses its token)."""
        if oid not in self._spa_tokens:
            self._spa_tokens[oid] = self.entra.api_token(oid)
        token = self._spa_tokens[oid]
        return self.client.get("/api/me", headers={"Authorization": f"Bearer {token}"}).status_code

    def timed_me(self, oid: str = ADELE) -> tuple[int, float]:
        """``me`` and how long it took, in seconds."""
        started = time.perf_counter()
        status = self.me(oid)
        return status, time.perf_counter() - started

    def connected(self) -> bool:
        return self.store.coherence().connected  # coherence() also starts the listener

    def wait_connected(self, timeout: float = 5.0) -> None:
        wait_for(self.connected, timeout, "the invalidation channel to connect")

    def is_current(self, oid: str = ADELE) -> bool:
        """May ``oid``'s memory copy be used without asking Redis?"""
        return self.tokens.memory.session(partition_key(oid, TENANT_ID)).is_current(self.store.coherence())

    def drain(self, timeout: float = 2.0) -> None:
        """Wait until the listener has handled every change Redis reported so far (say, the
        echo of this worker's own last write): Redis reports changes in order on one
        connection, so once a change to a barrier key written now is seen, all are."""
        barrier = self.tokens.memory.session(BARRIER)
        seen = barrier.changes
        self._control.set(self.store.key(BARRIER), b"barrier", ex=60)
        wait_for(lambda: barrier.changes > seen, timeout, "the invalidation channel to catch up")

    def settle(self, oid: str = ADELE, timeout: float = 5.0) -> None:
        """Request as ``oid`` until its memory copy is verified (the first request after a
        write or a (re)connection re-reads Redis once); then it stays so until a change."""
        self.wait_connected(timeout)
        self.drain(timeout)
        wait_for(lambda: self.me(oid) == 200 and self.is_current(oid), timeout, "a verified memory copy")

    def stop(self) -> None:
        """Stop the invalidation listener (nothing public does; tests must not leave it pinging)."""
        listener = self.store._invalidation  # an InvalidationListener (one Redis), once started
        if listener is not None:
            listener.stop()
        self._control.close()


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> float:
    """Poll ``check`` until it holds; the seconds that took (fails past ``timeout``)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


def honoured_within(bound: float, since: float, check: Callable[[], bool], what: str) -> float:
    """Poll ``check`` (a request and a look at its effect) until it holds; the seconds from
    ``since`` (when the change happened) to the first request that honoured it."""
    while True:
        if check():
            elapsed = time.monotonic() - since
            print(f"{what}: honoured after {elapsed * 1000:.0f} ms")
            assert elapsed <= bound, f"{what}: honoured only after {elapsed:.2f} s"
            return elapsed
        if time.monotonic() - since > bound:
            pytest.fail(f"{what}: not honoured within {bound} s")
        time.sleep(0.01)


def with_graph_token(codec: TokenCacheCodec, partition: str, blob: bytes, token: str) -> bytes:
    """``blob`` resealed with its access token's secret replaced by ``token``."""
    data = json.loads(codec.open(partition, blob) or "{}")
    assert data.get("AccessToken"), "no access token in the entry"
    for entry in data["AccessToken"].values():
        entry["secret"] = token
    return codec.seal(partition, json.dumps(data))


def new_graph_token(entra: FakeEntra, oid: str, label: str) -> str:
    """A Graph token for ``oid`` that Graph (the double) accepts and no OBO ever issued."""
    token = f"graph-at-{oid}-{label}"
    entra.graph_tokens[token] = oid
    return token


def app_commands(before: dict[str, int], after: dict[str, int], seconds: float) -> int:
    """Commands sent by the apps between two ``command_calls`` snapshots, less the test's own
    and the PINGs each listener sends on its subscribed connection once a second (which
    ``commandstats`` counts like any other PING): at most ``seconds // PING_EVERY + 1``."""
    delta = {name: calls - before.get(name, 0) for name, calls in after.items()}
    others = sum(calls for name, calls in delta.items() if name not in (*OWN_COMMANDS, "ping"))
    listener_pings = int(seconds // PING_EVERY) + 1
    return others + max(0, delta.get("ping", 0) - listener_pings)


def gets(before: dict[str, int], after: dict[str, int]) -> int:
    return after.get("get", 0) - before.get("get", 0)


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def settings(server: RedisProcess, fernet_key: str) -> Settings:
    return Settings.from_env(settings_env(REDIS_URL=server.url, TOKEN_CACHE_KEYS=fernet_key))


@pytest.fixture
def entra() -> Iterator[RecordingEntra]:
    fake = RecordingEntra()
    fake.add_user(CAROL, "Carol Crane")
    fake.add_user(DAN, "Dan Drake")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        fake.register(rsps)
        yield fake


@pytest.fixture
def worker(settings: Settings, entra: RecordingEntra) -> Iterator[Callable[..., Worker]]:
    """Builds workers on the test's Redis (``env``: settings of their own); their
    listeners are stopped at the end."""
    built: list[Worker] = []

    def build(**env: str) -> Worker:
        own = settings
        if env:
            assert settings.redis_url and settings.token_cache_keys
            own = Settings.from_env(settings_env(REDIS_URL=settings.redis_url,
                                                 TOKEN_CACHE_KEYS=",".join(settings.token_cache_keys), **env))
        built.append(Worker(own, entra))
        return built[-1]

    yield build
    for each in built:
        each.stop()


@pytest.fixture
def adele(settings: Settings) -> tuple[str, TokenCacheCodec]:
    """Adele's partition and the codec that seals her entry."""
    return partition_key(ADELE, TENANT_ID), TokenCacheCodec(settings.token_cache_keys)


# --- 1. warm requests send Redis nothing ----------------------------------------------------------


def test_warm_requests_send_no_redis_command(worker, entra: RecordingEntra, control: redis.Redis) -> None:
    """Four users, a thread each (a user's own concurrent requests: the next test)."""
    app = worker()
    for oid in USERS:
        assert app.me(oid) == 200  # cold: OBO, written to Redis
        app.settle(oid)
    tokens = {oid: [entra.api_token(oid) for _ in range(2)] for oid in USERS}  # two tabs each

    def warm(oid: str) -> list[tuple[int, float]]:
        """One user's share of the load, one request at a time."""
        results = []
        for n in range(WARM_REQUESTS // len(USERS)):
            started = time.perf_counter()
            headers = {"Authorization": f"Bearer {tokens[oid][n % 2]}"}
            results.append((app.client.get("/api/me", headers=headers).status_code,
                            time.perf_counter() - started))
        return results

    before, started = command_calls(control), time.monotonic()
    with ThreadPoolExecutor(len(USERS)) as pool:
        results = [result for share in pool.map(warm, USERS) for result in share]
    seconds = time.monotonic() - started
    after = command_calls(control)

    assert [status for status, _ in results] == [200] * WARM_REQUESTS
    sent = app_commands(before, after, seconds)
    latencies = sorted(latency for _, latency in results)
    print(f"{WARM_REQUESTS} warm requests in {seconds:.2f} s: {sent} Redis commands "
          f"({sent / WARM_REQUESTS:.3f} per request; raw delta "
          f"{ {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)} }); "
          f"p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms")
    assert sent / WARM_REQUESTS <= MAX_COMMANDS_PER_WARM_REQUEST
    assert entra.obo_calls() == len(USERS)

    # The measure sees a request that does read Redis: the copy invalidated, the next one reads.
    key = app.store.key(partition_key(ADELE, TENANT_ID))
    control.set(key, control.get(key), keepttl=True)
    wait_for(lambda: not app.is_current(), 1.0, "the invalidation to arrive")
    before = command_calls(control)
    assert app.me() == 200
    assert gets(before, command_calls(control)) == 1


def test_a_warm_request_that_waits_for_its_users_session_sends_redis_nothing(
    worker, entra: RecordingEntra, control: redis.Redis, adele
) -> None:
    """Another request of the same user holds the session a little longer than a lookup
    takes (descheduled on a busy box: 4 threads of one user on 2 loaded cores did this in
    half the runs, 6 commands per 200 warm requests). The copy is still verified: the
    request must not take the acquisition path's shared lock and re-read (SET NX, GET,
    PTTL, the release script) to use it."""
    partition, _ = adele
    app = worker()
    assert app.me() == 200
    app.settle()
    memory = app.tokens.memory

    before, started = command_calls(control), time.monotonic()
    session = memory.hold(partition, 1.0)
    release = threading.Timer(0.1, memory.release, [session])  # the other request's slow lookup
    release.start()
    assert app.me() == 200
    release.join()
    after = command_calls(control)
    sent = app_commands(before, after, time.monotonic() - started)
    assert sent == 0, f"{sent} Redis commands: { {k: v - before.get(k, 0) for k, v in after.items()} }"
    assert entra.obo_calls() == 1


def test_a_warm_request_that_waits_for_its_users_session_is_not_turned_away(
    worker, entra: RecordingEntra
) -> None:
    """As above, while the waiting room is full of cold users waiting on a slow Entra ID:
    the waiting room exists so that warm users always get an answer; a warm user whose
    session was busy for a moment must not be refused by it (503 TooManyWaiting)."""
    app = worker(ENTRA_MAX_WAITING_THREADS="1")
    assert app.me(ADELE) == 200
    app.settle(ADELE)
    memory = app.tokens.memory

    entra.hold_token_requests = threading.Event()  # Entra ID stalls
    with ThreadPoolExecutor(1) as pool:
        cold = pool.submit(app.me, BOB)  # takes the only seat, and waits on Entra ID
        assert entra.token_request_waiting.wait(5)
        session = memory.hold(partition_key(ADELE, TENANT_ID), 1.0)
        release = threading.Timer(0.1, memory.release, [session])  # another Adele request's slow lookup
        release.start()
        try:
            status = app.me(ADELE)
        finally:
            release.join()
            entra.hold_token_requests.set()
        assert cold.result(timeout=10) == 200
    assert status == 200, f"a warm user got {status} while the waiting room was full"


# --- 2. every change reaches the other worker within a second --------------------------------------


def test_an_entry_rewritten_elsewhere_is_used_within_a_second(worker, entra: RecordingEntra,
                                                              control: redis.Redis, adele) -> None:
    partition, codec = adele
    a = worker()
    assert a.me() == 200
    a.settle()
    key = a.store.key(partition)
    replacement = new_graph_token(entra, ADELE, "rewritten")

    control.set(key, with_graph_token(codec, partition, control.get(key), replacement), keepttl=True)
    honoured_within(COHERENCE_BOUND, time.monotonic(),
                    lambda: a.me() == 200 and entra.graph_bearers[-1] == replacement, "a rewritten entry")
    assert entra.obo_calls() == 1


def test_a_fresh_token_from_a_claims_challenge_on_one_worker_is_used_by_another(
    worker, entra: RecordingEntra
) -> None:
    a, b = worker(), worker()
    assert a.me() == 200
    assert b.me() == 200  # B reads the entry A wrote: no second OBO
    assert entra.obo_calls() == 1
    a.settle()
    b.settle()

    entra.graph_behaviours[ADELE] = ["claims"]  # Graph's next answer: a CAE claims challenge
    assert b.me() == 200
    changed_at = time.monotonic()
    assert entra.obo_calls() == 2  # the fresh token, with the claims, written by B
    fresh = entra.graph_bearers[-1]
    assert fresh != entra.graph_bearers[0]
    honoured_within(COHERENCE_BOUND, changed_at,
                    lambda: a.me() == 200 and entra.graph_bearers[-1] == fresh, "another worker's write")
    assert entra.obo_calls() == 2


def _delete(control: redis.Redis, key: str) -> float:
    control.delete(key)
    return time.monotonic()


def _expire(control: redis.Redis, key: str) -> float:
    control.pexpire(key, 300)
    return time.monotonic() + 0.3


def _flush(control: redis.Redis, key: str) -> float:
    control.flushdb()
    return time.monotonic()


def _evict(control: redis.Redis, key: str) -> float:
    """maxmemory just above what is used and allkeys-lru, then filler until ``key`` goes."""
    control.config_set("maxmemory-policy", "allkeys-lru")
    control.config_set("maxmemory", control.info("memory")["used_memory"] + 256 * 1024)
    filler = b"x" * 16 * 1024
    for n in range(2000):
        control.set(f"filler:{n}", filler)
        if not control.exists(key):
            return time.monotonic()
    pytest.fail("the entry was never evicted")


REMOVALS: dict[str, Callable[[redis.Redis, str], float]] = {
    "del": _delete, "ttl-expiry": _expire, "flushdb": _flush, "eviction": _evict,
}


@pytest.mark.parametrize("removal", list(REMOVALS))
def test_a_removed_entry_is_a_miss_on_every_worker_within_a_second(
    worker, entra: RecordingEntra, control: redis.Redis, adele, removal: str
) -> None:
    """Sign-out (DEL), the TTL, an operator's FLUSHDB, eviction: the next request makes a new
    OBO, on whichever worker comes first; the other one then uses that token."""
    partition, _ = adele
    a, b = worker(), worker()
    assert a.me() == 200
    assert b.me() == 200
    a.settle()
    b.settle()
    assert entra.obo_calls() == 1
    key = a.store.key(partition)

    gone_at = REMOVALS[removal](control, key)
    honoured_within(COHERENCE_BOUND, gone_at, lambda: a.me() == 200 and entra.obo_calls() == 2,
                    f"{removal} on A")
    fresh = entra.graph_bearers[-1]
    written_at = time.monotonic()
    honoured_within(COHERENCE_BOUND, written_at,
                    lambda: b.me() == 200 and entra.graph_bearers[-1] == fresh, "A's new entry on B")
    assert entra.obo_calls() == 2
    assert control.exists(key)


# --- 3. while the invalidation channel is down -------------------------------------------------------


def channel_down(control: redis.Redis, app: Worker) -> None:
    """Kill the listeners' subscribed connections and refuse SUBSCRIBE until ``channel_up``:
    the channel stays down however often the listener retries, other commands still work."""
    control.execute_command("ACL", "SETUSER", "default", "-subscribe")
    control.client_kill_filter(_type="pubsub")
    wait_for(lambda: not app.connected(), 2.0, "the listener to notice")


def channel_up(control: redis.Redis) -> None:
    control.execute_command("ACL", "SETUSER", "default", "+subscribe")


def test_while_the_channel_is_down_each_request_rereads_redis(
    worker, entra: RecordingEntra, control: redis.Redis, adele
) -> None:
    partition, codec = adele
    app = worker()
    assert app.me() == 200
    app.settle()
    key = app.store.key(partition)

    channel_down(control, app)
    before = command_calls(control)
    assert [app.me() for _ in range(20)] == [200] * 20
    assert gets(before, command_calls(control)) == 20  # unverified: one GET per request

    replacement = new_graph_token(entra, ADELE, "while-down")
    control.set(key, with_graph_token(codec, partition, control.get(key), replacement), keepttl=True)
    assert app.me() == 200
    assert entra.graph_bearers[-1] == replacement  # read at once, the channel is not needed
    assert not app.connected()

    channel_up(control)
    reconnect = wait_for(app.connected, 5.0, "the listener to reconnect")
    print(f"listener reconnected {reconnect * 1000:.0f} ms after SUBSCRIBE was allowed again")
    app.settle()
    before, started = command_calls(control), time.monotonic()
    assert [app.me() for _ in range(50)] == [200] * 50
    assert app_commands(before, command_calls(control), time.monotonic() - started) <= 1
    assert entra.graph_bearers[-1] == replacement
    assert entra.obo_calls() == 1


def test_a_change_made_while_the_channel_was_down_is_honoured_after_it_reconnects(
    worker, entra: RecordingEntra, control: redis.Redis, adele
) -> None:
    """No request while it is down: only the reconnection (a new epoch) tells the worker that
    changes may have gone unreported."""
    partition, codec = adele
    app = worker()
    assert app.me() == 200
    app.settle()
    key = app.store.key(partition)

    channel_down(control, app)
    replacement = new_graph_token(entra, ADELE, "unreported")
    control.set(key, with_graph_token(codec, partition, control.get(key), replacement), keepttl=True)
    channel_up(control)
    app.wait_connected()
    assert app.me() == 200
    assert entra.graph_bearers[-1] == replacement
    assert entra.obo_calls() == 1


def test_a_sign_out_while_the_channel_is_down_is_honoured(
    worker, entra: RecordingEntra, control: redis.Redis, adele
) -> None:
    """A DEL (sign-out, an operator) while a worker's channel is down: that worker re-reads
    Redis, finds no entry, and must not write its old copy back (which would undo the
    sign-out for every worker): the user's next request, at the latest once the channel is
    back, makes a new OBO."""
    partition, _ = adele
    app = worker()
    assert app.me() == 200
    app.settle()
    key = app.store.key(partition)
    signed_out = control.get(key)

    channel_down(control, app)
    control.delete(key)
    assert app.me() == 200
    channel_up(control)
    app.wait_connected()
    assert app.me() == 200
    resurrected = control.get(key) == signed_out
    assert not resurrected, "the deleted entry was written back from a worker's memory"
    assert entra.obo_calls() == 2


def test_an_entry_expiring_while_the_channel_is_down_is_not_put_back(
    worker, entra: RecordingEntra, control: redis.Redis, adele
) -> None:
    """The worker read the entry's TTL; it runs out while the channel is down: the copy
    expires with it (written back, it would outlive its TTL)."""
    partition, _ = adele
    app = worker()
    assert app.me() == 200
    key = app.store.key(partition)
    control.pexpire(key, 800)
    app.settle()  # re-read since: the worker knows the entry's TTL
    expired = control.get(key)

    channel_down(control, app)
    assert control.pttl(key) > 0, "inconclusive: the entry expired before the channel went down"
    wait_for(lambda: not control.exists(key), 2.0, "the entry to expire")
    assert app.me() == 200
    channel_up(control)
    app.wait_connected()
    assert app.me() == 200
    resurrected = control.get(key) == expired
    assert not resurrected, "the expired entry was written back from a worker's memory"
    assert entra.obo_calls() == 2


def test_two_users_copies_are_independent(worker, entra: RecordingEntra, control: redis.Redis) -> None:
    """A change to one user's entry leaves another user's copy verified (no Redis read)."""
    app = worker()
    assert app.me(ADELE) == 200
    assert app.me(BOB) == 200
    app.settle(ADELE)
    app.settle(BOB)
    control.delete(app.store.key(partition_key(ADELE, TENANT_ID)))
    wait_for(lambda: not app.is_current(ADELE), COHERENCE_BOUND, "Adele's copy to be invalidated")
    assert app.is_current(BOB)
    before = command_calls(control)
    assert app.me(BOB) == 200
    assert gets(before, command_calls(control)) == 0


# --- the breaker is not left open while Redis answers ------------------------------------------------


def test_a_breaker_opened_by_slow_calls_closes_once_redis_answers_the_listener(
    worker, entra: RecordingEntra, control: redis.Redis, adele
) -> None:
    """Slow calls opened the breaker, but the listener never dropped (a stall shorter than
    its PING timeout): with every user warm, nobody would probe. The listener's next PONG
    closes it, so a delete made meanwhile is honoured within about a second."""
    partition, _ = adele
    app = worker()
    assert app.me() == 200
    app.settle()
    for _ in range(app.store.breaker.failure_threshold):  # three timeouts, as a stall makes them
        app.store.breaker.failure()
    assert not app.store.healthy

    wait_for(lambda: app.store.healthy, 3.0, "the breaker to close on the listener's PONG")
    control.delete(app.store.key(partition))  # a sign-out
    wait_for(lambda: app.me() == 200 and entra.obo_calls() == 2, 2.0, "the delete to be honoured")


def test_a_claims_leader_does_not_hold_its_users_warm_requests_outside_the_waiting_room(
    worker, entra: RecordingEntra
) -> None:
    """A claims-challenge leader holds the user's session while it talks to Entra ID; the
    user's other requests join the waiting room (to be answered, or refused at once when
    the exchange is overdue and its seat taken) instead of polling for the session until
    their deadline."""
    app = worker(ENTRA_MAX_WAITING_THREADS="1", TOKEN_ACQUISITION_TIMEOUT_SECONDS="3")
    assert app.me(ADELE) == 200
    app.settle(ADELE)

    entra.hold_token_requests = threading.Event()  # Entra ID stalls
    with ThreadPoolExecutor(1) as pool:
        adele = EntraAccessToken({"oid": ADELE, "tid": TENANT_ID}, entra.api_token(ADELE))
        claims = pool.submit(app.tokens.acquire_token, adele, GRAPH_SCOPES,
                             '{"access_token":{"acrs":{}}}')
        assert entra.token_request_waiting.wait(5)
        # The leader's exchange turns overdue and Entra ID answers nobody: the leader
        # holds the room's one seat. Then the user's warm request comes.
        wait_for(lambda: app.tokens.waiting_room.seated == 1, 5.0, "the leader to take the seat")
        try:
            status, took = app.timed_me(ADELE)
        finally:
            entra.hold_token_requests.set()
        claims.exception(timeout=10)  # whatever Entra made of the claims: not what is tested
    assert status == 503 and took < 1.0, f"{status} after {took:.2f} s"


def test_a_write_back_landing_after_the_lock_was_taken_is_read_again_once_reported(
    worker, entra: RecordingEntra
) -> None:
    """The Redis lock reads the user's entry as it is taken. A worker's write-back of a
    token acquired while Redis was away needs no lock, so it can land just after that
    read; once its invalidation has reached this worker, the holder reads the entry again
    rather than trust the read made with the lock."""
    app = worker()
    app.wait_connected()
    partition = partition_key(ADELE, TENANT_ID)
    adele = EntraAccessToken({"oid": ADELE, "tid": TENANT_ID}, entra.api_token(ADELE))
    with app.tokens.memory.held(partition, 5) as session:
        mark = app.tokens._mark(session)
        with app.store.lock(partition, Deadline(5)) as guard:  # reads: no entry
            other = Worker(app.settings, entra)  # another worker's write-back, without the lock
            try:
                assert other.store.save_unless_changed(partition, b"gAAAAA-written-back", None)
            finally:
                other.stop()
            wait_for(lambda: app.tokens._mark(session) != mark, 3.0, "the write-back to be reported")
            app.tokens._reload(session, partition, adele, StoreBudget(2.0), (guard, mark))
            assert session.stored == b"gAAAAA-written-back"
