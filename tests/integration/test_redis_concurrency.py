"""Single flight and no lost updates against a real redis-server, with real threads and
real processes: however many race, one user's cold burst makes exactly one OBO call."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import responses

from app import create_app
from flask_obo.bulkhead import Deadline
from flask_obo.cache_store import RedisTokenCacheStore, entry_under_lock, save_and_unlock
from flask_obo.settings import Settings
from tests.support.fake_entra import ADELE, BOB, FakeEntra, settings_env

pytestmark = pytest.mark.integration
ENTRA_LATENCY = 0.15  # a token request takes time; without the lock, racers would all call


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def settings(redis_url: str, fernet_key: str, real_redis) -> Settings:
    # Room for the whole burst to wait on Entra ID: here the leader's result is what is tested.
    return Settings.from_env(settings_env(REDIS_URL=redis_url, TOKEN_CACHE_KEYS=fernet_key,
                                          ENTRA_MAX_WAITING_THREADS="16"))


class SlowEntra(FakeEntra):
    def _token(self, request):
        time.sleep(ENTRA_LATENCY)  # simulated network latency of Entra ID, not synchronisation
        return super()._token(request)


def burst(client, tokens: list[str]) -> list[int]:
    start = threading.Barrier(len(tokens))

    def call(token: str) -> int:
        start.wait()
        return client.get("/api/me", headers=bearer(token)).status_code

    with ThreadPoolExecutor(len(tokens)) as pool:
        return list(pool.map(call, tokens))


def test_thread_burst_from_one_user_makes_one_obo_call(settings):
    entra = SlowEntra()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        entra.register(rsps)
        client = create_app(settings).test_client()
        tokens = [entra.api_token(ADELE) for _ in range(16)]  # 16 distinct SPA tokens
        assert burst(client, tokens) == [200] * 16
    assert entra.obo_calls() == 1


def test_bursts_from_two_users_do_not_wait_for_each_other(settings):
    entra = SlowEntra()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        entra.register(rsps)
        client = create_app(settings).test_client()
        tokens = [entra.api_token(oid) for oid in (ADELE, BOB) for _ in range(6)]
        started = time.monotonic()
        assert burst(client, tokens) == [200] * 12
        elapsed = time.monotonic() - started
    assert entra.obo_calls() == 2
    assert elapsed < 4 * ENTRA_LATENCY  # the two exchanges overlapped instead of queueing


def _process_worker(entra: FakeEntra, env: dict[str, str], tokens: list[str],
                    barrier, results) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        entra.token_requests.clear()
        entra.register(rsps)
        client = create_app(Settings.from_env(env)).test_client()
        client.get("/healthz")
        barrier.wait()
        statuses = burst(client, tokens)
    results.put((statuses, entra.obo_calls()))


def test_process_burst_from_one_user_makes_one_obo_call(redis_url, fernet_key, real_redis):
    """Four processes (as four gunicorn workers or instances), four threads each."""
    context = multiprocessing.get_context("fork")
    entra = SlowEntra()
    env = settings_env(REDIS_URL=redis_url, TOKEN_CACHE_KEYS=fernet_key)
    barrier, results = context.Barrier(4), context.Queue()
    workers = [
        context.Process(target=_process_worker,
                        args=(entra, env, [entra.api_token(ADELE) for _ in range(4)], barrier, results))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert [status for statuses, _ in outcomes for status in statuses] == [200] * 16
    assert sum(calls for _, calls in outcomes) == 1


def _append_under_lock(redis_url: str, worker: int, rounds: int) -> None:
    store = RedisTokenCacheStore(redis.Redis.from_url(redis_url), "t", 60)
    for n in range(rounds):
        with store.lock("p" * 64, Deadline(30)) as guard:
            entry = store.load("p" * 64)
            items = json.loads(entry.blob if entry else b"[]")
            items.append(f"{worker}-{n}")
            assert store.save("p" * 64, json.dumps(items).encode(), guard)


def test_concurrent_writers_never_lose_an_update(redis_url, real_redis):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_under_lock, args=(redis_url, w, 15)) for w in range(4)]
    for worker in workers:
        worker.start()
    threads = [threading.Thread(target=_append_under_lock, args=(redis_url, 10 + t, 15)) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    store = RedisTokenCacheStore(real_redis, "t", 60)
    items = json.loads(real_redis.get(store.key("p" * 64)))
    assert len(items) == len(set(items)) == 7 * 15


def test_a_writer_that_lost_its_lock_does_not_overwrite(redis_url, real_redis):
    store = RedisTokenCacheStore(real_redis, "t", 60)
    real_redis.set(store.key("q" * 64), b"newer")
    with store.lock("q" * 64, Deadline(5)) as guard:
        real_redis.set(store.lock_key("q" * 64), b"someone-else")  # our lock expired and was taken
        assert store.save("q" * 64, b"stale", guard) is False
    assert real_redis.get(store.key("q" * 64)) == b"newer"
    assert real_redis.get(store.lock_key("q" * 64)) == b"someone-else"  # not released by us


class CountingRedis(redis.Redis):
    """A client that counts the commands it sends one by one (scripts included)."""

    sent = 0

    def execute_command(self, *args, **options):
        self.sent += 1
        return super().execute_command(*args, **options)

    def pipeline(self, *args, **kwargs):
        self.sent += 1  # one round trip, however many commands
        return super().pipeline(*args, **kwargs)


def test_taking_the_lock_reads_the_entry_in_the_same_round_trip(redis_url, real_redis):
    client = CountingRedis.from_url(redis_url)
    store = RedisTokenCacheStore(client, "t", 60)
    real_redis.set(store.key("r" * 64), b"sealed", ex=60)
    with store.lock("r" * 64, Deadline(5)) as guard:
        sent = client.sent
        entry = entry_under_lock(store, "r" * 64, guard)
        assert client.sent == sent, "the entry was read again after taking the lock"
        assert entry is not None and entry.blob == b"sealed"
        assert entry.expires_at is not None and 50 < entry.expires_at - time.monotonic() <= 60
        # Handed out once: after the holder's own write, the entry is read anew.
        assert store.save("r" * 64, b"resealed", guard)
        again = entry_under_lock(store, "r" * 64, guard)
        assert again is not None and again.blob == b"resealed"


def test_a_lock_taken_after_waiting_reads_what_its_last_holder_wrote(redis_url, real_redis):
    store = RedisTokenCacheStore(real_redis, "t", 60)
    waiter = RedisTokenCacheStore(redis.Redis.from_url(redis_url), "t", 60)
    seen: list = []

    def wait_and_read() -> None:
        with waiter.lock("w" * 64, Deadline(10)) as guard:
            seen.append(entry_under_lock(waiter, "w" * 64, guard))

    with store.lock("w" * 64, Deadline(5)) as guard:
        thread = threading.Thread(target=wait_and_read)
        thread.start()  # it takes the lock only once this block has written and released it
        assert store.save("w" * 64, b"written-by-the-first-holder", guard)
    thread.join(timeout=15)
    assert [entry.blob if entry else None for entry in seen] == [b"written-by-the-first-holder"]


def test_an_entry_of_the_wrong_type_under_the_lock_is_a_miss(redis_url, real_redis, caplog):
    store = RedisTokenCacheStore(real_redis, "t", 60)
    real_redis.hset(store.key("h" * 64), "not", "a blob")
    with store.lock("h" * 64, Deadline(5)) as guard:
        assert entry_under_lock(store, "h" * 64, guard) is None
        assert store.save("h" * 64, b"sealed", guard)  # replaced by the next save
    assert real_redis.get(store.key("h" * 64)) == b"sealed"
    assert "is not a string in Redis" in caplog.text
    assert real_redis.get(store.lock_key("h" * 64)) is None  # released


def test_the_last_save_under_the_lock_releases_it_in_the_same_round_trip(redis_url, real_redis):
    client = CountingRedis.from_url(redis_url)
    store = RedisTokenCacheStore(client, "t", 60)
    other = RedisTokenCacheStore(redis.Redis.from_url(redis_url), "t", 60)
    with store.lock("u" * 64, Deadline(5)) as guard:
        sent = client.sent
        assert save_and_unlock(store, "u" * 64, b"sealed", guard)
        assert client.sent == sent + 1, "the save and the release took more than one round trip"
        assert real_redis.get(store.key("u" * 64)) == b"sealed"
        with other.lock("u" * 64, Deadline(0.5)) as theirs:  # free at once, not when we leave
            assert other.save("u" * 64, b"theirs", theirs)
        sent = client.sent
    assert client.sent == sent, "leaving the lock sent a release the save had done"
    assert real_redis.get(store.key("u" * 64)) == b"theirs"


def test_a_last_save_whose_lock_was_lost_writes_nothing_and_frees_nothing(redis_url, real_redis):
    store = RedisTokenCacheStore(real_redis, "t", 60)
    real_redis.set(store.key("v" * 64), b"newer")
    with store.lock("v" * 64, Deadline(5)) as guard:
        real_redis.set(store.lock_key("v" * 64), b"someone-else")  # ours expired and was taken
        assert save_and_unlock(store, "v" * 64, b"stale", guard) is False
    assert real_redis.get(store.key("v" * 64)) == b"newer"
    assert real_redis.get(store.lock_key("v" * 64)) == b"someone-else"


def test_the_lock_and_the_last_save_sent_again_after_a_lost_reply_answer_as_the_first_time(
        redis_url, real_redis):
    """redis-py sends a command again when its reply timed out: the script ran once already."""
    store = RedisTokenCacheStore(real_redis, "t", 60)
    real_redis.set(store.key("x" * 64), b"before", ex=60)
    with store.lock("x" * 64, Deadline(5)) as guard:
        assert guard.do_acquire(guard.local.token)  # the lock again: ours, not someone else's
        entry = entry_under_lock(store, "x" * 64, guard)
        assert entry is not None and entry.blob == b"before"
        assert store.save_and_unlock("x" * 64, b"sealed-once", guard)
        assert store.save_and_unlock("x" * 64, b"sealed-once", guard)  # the save again: done
        assert not store.save_and_unlock("x" * 64, b"another", guard)  # not ours any more
    assert real_redis.get(store.key("x" * 64)) == b"sealed-once"
    assert real_redis.get(store.lock_key("x" * 64)) is None
