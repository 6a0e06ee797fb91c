"""Sign-out (``DELETE /api/me/token-cache``) and the ``flask token-cache`` commands against
a real redis-server, with several apps ("workers") sharing it through their invalidation
listeners, as in ``test_memory_tier``: every worker honours a sign-out or an ``evict``
within a second, ``stats`` reports what is in Redis, and ``rekey`` re-encrypts 10,000
entries while requests run.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from cryptography.fernet import Fernet, InvalidToken
from flask import Flask

from app import create_app
from flask_obo.cli import percentile
from flask_obo.settings import Settings
from flask_obo.token_cache import TokenCacheCodec, partition_key
from tests.integration.test_memory_tier import (  # noqa: F401 - fixtures, used by name
    CAROL,
    COHERENCE_BOUND,
    DAN,
    RecordingEntra,
    Worker,
    entra,
    honoured_within,
    settings,
    wait_for,
    worker,
)
from tests.support.fake_entra import ADELE, BOB, TENANT_ID, settings_env
from tests.support.servers import RedisProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
SIGN_OUT = "/api/me/token-cache"
SYNTHETIC_ENTRIES = 10_000
UNDECRYPTABLE_ENTRIES = 5
SYNTHETIC_TTL = 5000  # seconds: far below the cache TTL, so a renewed TTL would show


def sign_out(app: Worker, oid: str = ADELE) -> int:
    token = app.entra.api_token(oid)
    return app.client.delete(SIGN_OUT, headers={"Authorization": f"Bearer {token}"}).status_code


def cli(flask_app: Flask, *args: str) -> tuple[int, str]:
    result = flask_app.test_cli_runner().invoke(args=["token-cache", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def msal_shaped(oid: str) -> str:
    """A small msal cache of one user, as flask-obo stores it."""
    home = f"{oid}.{TENANT_ID}"
    return json.dumps({
        "AccessToken": {f"{home}-login.microsoftonline.com-accesstoken-x-{TENANT_ID}-user.read": {
            "credential_type": "AccessToken", "secret": f"at-{oid}", "home_account_id": home,
            "environment": "login.microsoftonline.com", "client_id": "x", "realm": TENANT_ID,
            "target": "https://graph.microsoft.com/User.Read", "expires_on": "4102444800",
            "cached_at": "1700000000"}},
        "Account": {f"{home}-login.microsoftonline.com-{TENANT_ID}": {
            "home_account_id": home, "environment": "login.microsoftonline.com",
            "realm": TENANT_ID, "local_account_id": oid, "username": "u@contoso.example",
            "authority_type": "MSSTS"}},
    })


@pytest.fixture
def operator(settings: Settings) -> Flask:  # noqa: F811
    """The app an operator's ``flask --app wsgi token-cache …`` builds: a process of its own."""
    return create_app(settings)


@pytest.fixture
def control(server: RedisProcess) -> Iterator[redis.Redis]:
    client = server.client(timeout=10)
    yield client
    client.close()


# --- sign-out ----------------------------------------------------------------------------------


def test_sign_out_answers_204_and_the_next_call_makes_a_new_obo(
    worker, entra: RecordingEntra, control: redis.Redis  # noqa: F811
) -> None:
    app = worker()
    assert app.me() == 200
    app.settle()
    first = entra.graph_bearers[-1]
    partition = partition_key(ADELE, TENANT_ID)

    assert sign_out(app) == 204
    assert app.tokens.memory.session(partition).blob is None  # this worker's copy: at once
    assert control.get(app.store.key(partition)) == b""  # the tombstone
    assert app.me() == 200
    assert entra.obo_calls() == 2
    assert entra.graph_bearers[-1] != first
    assert app.me(BOB) == 200 and entra.obo_calls() == 3  # Bob was never cached: his own OBO


def test_sign_out_is_honoured_by_every_worker_within_a_second(
    worker, entra: RecordingEntra  # noqa: F811
) -> None:
    a, b = worker(), worker()
    assert a.me() == 200
    assert b.me() == 200
    a.settle()
    b.settle()
    assert entra.obo_calls() == 1

    assert sign_out(a) == 204
    signed_out_at = time.monotonic()
    honoured_within(COHERENCE_BOUND, signed_out_at, lambda: b.me() == 200 and entra.obo_calls() == 2,
                    "sign-out on the other worker")
    fresh = entra.graph_bearers[-1]
    honoured_within(COHERENCE_BOUND, time.monotonic(),
                    lambda: a.me() == 200 and entra.graph_bearers[-1] == fresh, "B's new entry on A")
    assert entra.obo_calls() == 2


def test_sign_out_needs_a_token(worker) -> None:  # noqa: F811
    app = worker()
    response = app.client.delete(SIGN_OUT)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_sign_out_with_redis_down_is_503_and_removes_nothing(
    worker, entra: RecordingEntra, server: RedisProcess  # noqa: F811
) -> None:
    app = worker()
    assert app.me() == 200
    app.settle()
    server.kill()
    response = app.client.delete(SIGN_OUT, headers={"Authorization": f"Bearer {entra.api_token(ADELE)}"})
    assert response.status_code == 503
    assert response.get_json()["error"] == "temporarily_unavailable"
    assert app.me() == 200  # still served from memory: nothing pretended to be removed
    assert entra.obo_calls() == 1


@pytest.mark.parametrize("write_back", ["resync", "next-request"])
def test_an_entry_acquired_while_redis_was_away_is_not_written_back_after_sign_out(
    worker, entra: RecordingEntra, control: redis.Redis, write_back: str  # noqa: F811
) -> None:
    """Worker B got Bob a token by OBO while it could not reach Redis (an unsaved entry,
    to be written back by compare-and-set against the entry being absent). Bob signs out
    on A before B writes it back: the write-back must fail, not undo the sign-out."""
    a, b = worker(), worker()
    b.stop()  # B's listener would close its breaker on the next PONG
    b.store.breaker.reset_timeout = 3600
    b.store.breaker.trip()  # B: Redis is down
    assert b.me(BOB) == 200
    unsaved = b.tokens.memory.session(partition_key(BOB, TENANT_ID))
    assert unsaved.unsaved and entra.obo_calls() == 1

    assert sign_out(a, BOB) == 204
    b.store.breaker.success()  # B: Redis is back
    if write_back == "resync":
        b.tokens.resync()  # what B's listener runs when it reconnects
    assert b.me(BOB) == 200
    assert entra.obo_calls() == 2, "the token acquired before the sign-out was used after it"
    stored = control.get(b.store.key(partition_key(BOB, TENANT_ID)))
    assert stored and stored == b.tokens.memory.session(partition_key(BOB, TENANT_ID)).blob


# --- evict -----------------------------------------------------------------------------------


def test_evict_is_honoured_by_every_worker_within_a_second(
    worker, entra: RecordingEntra, operator: Flask, control: redis.Redis  # noqa: F811
) -> None:
    a, b = worker(), worker()
    assert a.me() == 200 and b.me() == 200 and a.me(BOB) == 200
    a.settle()
    b.settle()
    assert entra.obo_calls() == 2

    code, output = cli(operator, "evict", "--oid", ADELE, "--tid", TENANT_ID)
    evicted_at = time.monotonic()
    partition = partition_key(ADELE, TENANT_ID)
    assert code == 0, output
    assert output.strip() == f"evicted partition {partition}"
    honoured_within(COHERENCE_BOUND, evicted_at, lambda: b.me() == 200 and entra.obo_calls() == 3,
                    "evict on a worker")
    fresh = entra.graph_bearers[-1]
    honoured_within(COHERENCE_BOUND, time.monotonic(),
                    lambda: a.me() == 200 and entra.graph_bearers[-1] == fresh, "the new entry on A")
    assert a.me(BOB) == 200 and entra.obo_calls() == 3  # Bob untouched

    code, output = cli(operator, "evict", "--oid", CAROL, "--tid", TENANT_ID)
    assert code == 0 and "had no cached tokens" in output


@pytest.mark.parametrize("spell", [str.upper, lambda g: "{" + g + "}", lambda g: g.replace("-", ""),
                                   lambda g: "urn:uuid:" + g], ids=["upper", "braces", "no-hyphens", "urn"])
def test_evict_takes_any_spelling_of_the_users_guids(
    spell, worker, entra: RecordingEntra, operator: Flask, control: redis.Redis  # noqa: F811
) -> None:
    app = worker()
    assert app.me() == 200
    app.settle()
    key = app.store.key(partition_key(ADELE, TENANT_ID))
    assert control.strlen(key) > 0

    code, output = cli(operator, "evict", "--oid", spell(ADELE), "--tid", spell(TENANT_ID))
    assert code == 0, output
    assert output.strip() == f"evicted partition {partition_key(ADELE, TENANT_ID)}"
    assert control.strlen(key) == 0  # the very entry the user's requests use is gone (a tombstone)


# --- stats -------------------------------------------------------------------------------------


def test_stats_match_what_is_in_redis(
    worker, entra: RecordingEntra, operator: Flask, control: redis.Redis, settings: Settings  # noqa: F811
) -> None:
    app = worker()
    for oid in (ADELE, BOB, CAROL, DAN):
        assert app.me(oid) == 200
    codec = TokenCacheCodec(settings.token_cache_keys)
    for n in range(37):  # entries of various sizes
        oid = f"{n:08x}-0000-4000-8000-{'0' * 12}"
        partition = partition_key(oid, TENANT_ID)
        control.set(app.store.key(partition), codec.seal(partition, msal_shaped(oid * (n % 5 + 1))))
    assert cli(operator, "evict", "--oid", DAN, "--tid", TENANT_ID)[0] == 0
    control.set("flask-obo:other", b"not a cache entry")  # not under the cache prefix

    code, output = cli(operator, "stats", "--json")
    assert code == 0, output
    sizes = sorted(size for key in control.scan_iter(match="flask-obo:cache:*")
                   if (size := control.strlen(key)) > 0)
    assert len(sizes) == 3 + 37  # Dan's is a tombstone now
    assert json.loads(output) == {
        "entries": len(sizes), "bytes": sum(sizes),
        "bytes_per_entry_p50": percentile(sizes, 50), "bytes_per_entry_p99": percentile(sizes, 99),
        "removed": 1, "not_strings": 0,
    }
    code, text = cli(operator, "stats")
    assert code == 0
    assert f"entries          {len(sizes)}" in text
    assert f"p50 {percentile(sizes, 50)}  p99 {percentile(sizes, 99)}" in text


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) == 0
    assert percentile([5], 99) == 5
    assert percentile(list(range(1, 101)), 50) == 50
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile(list(range(1, 11)), 99) == 10


@pytest.mark.parametrize("command", [["stats"], ["rekey"], ["evict", "--oid", ADELE, "--tid", TENANT_ID]])
def test_without_redis_url_the_commands_say_there_is_no_shared_cache(command: list[str]) -> None:
    flask_app = create_app(Settings.from_env(settings_env()))
    code, output = cli(flask_app, *command)
    assert code != 0
    assert "no shared token cache: REDIS_URL is not set" in output


def test_with_redis_down_the_commands_fail_clearly(operator: Flask, server: RedisProcess) -> None:
    server.kill()
    code, output = cli(operator, "stats")
    assert code == 1
    assert "Redis cannot be reached" in output


def test_flask_token_cache_stats_in_a_subprocess(server: RedisProcess, settings: Settings,  # noqa: F811
                                                 control: redis.Redis, tmp_path: Path) -> None:
    """As an operator runs it: ``flask --app wsgi token-cache stats`` with the API's env."""
    codec = TokenCacheCodec(settings.token_cache_keys)
    for oid in (ADELE, BOB):
        partition = partition_key(oid, TENANT_ID)
        control.set(f"flask-obo:cache:{{{partition}}}", codec.seal(partition, msal_shaped(oid)))
    key = settings.token_cache_keys[0]
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("AZURE_", "REDIS_", "TOKEN_CACHE_", "FLASK_"))}
    env.update(settings_env(REDIS_URL=server.url, TOKEN_CACHE_KEYS=key,
                            AUTHORITY_CACHE_DIR=str(tmp_path / "authority")),
               PYTHONPATH=str(ROOT))
    flask = [str(Path(sys.executable).with_name("flask")), "--app", "wsgi", "token-cache"]
    result = subprocess.run([*flask, "stats"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "entries          2\n" in result.stdout
    assert key not in result.stdout + result.stderr

    env["REDIS_URL"] = ""
    result = subprocess.run([*flask, "stats"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no shared token cache" in result.stderr


# --- rekey -------------------------------------------------------------------------------------


@pytest.fixture
def keyed_worker(server: RedisProcess, entra: RecordingEntra) -> Iterator[Callable[[str], Worker]]:  # noqa: F811
    """Builds workers whose ``TOKEN_CACHE_KEYS`` is the argument; stopped at the end."""
    built: list[Worker] = []

    def build(keys: str) -> Worker:
        built.append(Worker(Settings.from_env(settings_env(REDIS_URL=server.url, TOKEN_CACHE_KEYS=keys)),
                            entra))
        return built[-1]

    yield build
    for each in built:
        each.stop()


def test_rekey_under_load(control: redis.Redis, entra: RecordingEntra,  # noqa: F811
                          keyed_worker: Callable[[str], Worker]) -> None:
    """10,000 entries under the old key, and four real users', rekeyed while those users'
    requests keep coming (a claims challenge now and then makes a request rewrite its
    user's entry, racing the rekey): every request gets 200, every entry is then under the
    new key alone, with its TTL kept, the counts add up, and a rerun re-keys nothing."""
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    stranger = TokenCacheCodec([Fernet.generate_key().decode()])
    users = [ADELE, BOB, CAROL, DAN]

    before = keyed_worker(old)  # the users' entries, written under the old key
    for oid in users:
        assert before.me(oid) == 200
    old_codec = TokenCacheCodec([old])
    pipe = control.pipeline(transaction=False)
    for n in range(SYNTHETIC_ENTRIES + UNDECRYPTABLE_ENTRIES):
        oid = f"{n:08x}-1111-4000-8000-{'0' * 12}"
        partition = partition_key(oid, TENANT_ID)
        codec = old_codec if n < SYNTHETIC_ENTRIES else stranger
        blob = codec.seal(partition, msal_shaped(oid))
        pipe.set(f"flask-obo:cache:{{{partition}}}", blob, ex=SYNTHETIC_TTL)
    pipe.execute()
    total = SYNTHETIC_ENTRIES + UNDECRYPTABLE_ENTRIES + len(users)

    apps = [keyed_worker(f"{new},{old}"), keyed_worker(f"{new},{old}")]
    operator = keyed_worker(f"{new},{old}").app
    statuses: list[int] = []
    done = threading.Event()

    def requests(oid: str) -> None:
        n = 0
        while not done.is_set():
            n += 1
            if n % 25 == 0:
                entra.graph_behaviours[oid] = ["claims"]  # a fresh OBO, written under the user's lock
            statuses.append(apps[n % 2].me(oid))
            time.sleep(0.01)  # a user's pace (in this process, a busy loop would starve rekey of the GIL)

    with ThreadPoolExecutor(len(users)) as pool:
        load = [pool.submit(requests, oid) for oid in users]
        started = time.monotonic()
        try:
            code, output = cli(operator, "rekey")
        finally:
            done.set()
        took = time.monotonic() - started
        for each in load:
            each.result(timeout=30)
    print(f"rekey of {total} entries under load: {took:.1f} s, {len(statuses)} requests; {output.strip()}")
    assert code == 0, output
    assert statuses and set(statuses) == {200}

    counts = _counts(output)
    assert counts["undecryptable"] == UNDECRYPTABLE_ENTRIES
    assert counts["already"] <= len(users)  # a user's request rewrote it before rekey read it
    assert sum(counts.values()) == total
    assert counts["rekeyed"] >= SYNTHETIC_ENTRIES and counts["gone"] == 0

    new_only = Fernet(new)
    undecryptable = 0
    keys = list(control.scan_iter(match="flask-obo:cache:*", count=1000))
    assert len(keys) == total
    for start in range(0, len(keys), 1000):
        pipe = control.pipeline(transaction=False)
        for key in keys[start:start + 1000]:
            pipe.get(key)
        for blob in pipe.execute():
            try:
                new_only.decrypt(base64.urlsafe_b64encode(blob))
            except InvalidToken:
                undecryptable += 1
    assert undecryptable == UNDECRYPTABLE_ENTRIES
    sample = partition_key(f"{7:08x}-1111-4000-8000-{'0' * 12}", TENANT_ID)
    assert 0 < control.ttl(f"flask-obo:cache:{{{sample}}}") <= SYNTHETIC_TTL  # kept, not renewed

    # The users' entries read with the new key alone: no new OBO for any of them.
    obo_calls = entra.obo_calls()
    after = keyed_worker(new)
    for oid in users:
        entra.graph_behaviours.pop(oid, None)
        assert after.me(oid) == 200
    assert entra.obo_calls() == obo_calls

    code, output = cli(operator, "rekey")
    assert code == 0
    again = _counts(output)
    assert again["rekeyed"] == 0 and again["changed"] == 0
    assert again["undecryptable"] == UNDECRYPTABLE_ENTRIES
    assert again["already"] == total - UNDECRYPTABLE_ENTRIES


def _counts(output: str) -> dict[str, int]:
    """The figures of rekey's report line."""
    line = next(line for line in output.splitlines() if line.startswith("re-keyed"))
    pattern = (r"re-keyed (\d+), skipped because they changed (\d+), undecryptable (\d+); "
               r"already under the first key (\d+), removed or expired meanwhile (\d+)")
    match = re.fullmatch(pattern, line)
    assert match, line
    return dict(zip(("rekeyed", "changed", "undecryptable", "already", "gone"),
                    map(int, match.groups()), strict=True))



def test_rekey_waits_for_a_users_lock_and_skips_an_entry_changed_meanwhile(
    server: RedisProcess, control: redis.Redis, keyed_worker: Callable[[str], Worker]
) -> None:
    """An entry whose user's lock is held (a request acquiring) is re-keyed once the lock
    is free, as requests wait for it; if that request rewrote the entry, it is skipped."""
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    old_codec = TokenCacheCodec([old])
    keys = {}
    for oid in (ADELE, BOB):
        partition = partition_key(oid, TENANT_ID)
        keys[oid] = f"flask-obo:cache:{{{partition}}}"
        control.set(keys[oid], old_codec.seal(partition, msal_shaped(oid)), ex=SYNTHETIC_TTL)
    operator = keyed_worker(f"{new},{old}").app
    store = keyed_worker(f"{new},{old}").store
    held = {oid: control.lock(store.lock_key(partition_key(oid, TENANT_ID)), timeout=10, thread_local=False)
            for oid in keys}
    for lock in held.values():
        assert lock.acquire(blocking=False)
    rewritten = TokenCacheCodec([new]).seal(partition_key(BOB, TENANT_ID), msal_shaped(BOB))

    def request_finishes() -> None:
        held[ADELE].release()  # Adele's request wrote nothing
        control.set(keys[BOB], rewritten, keepttl=True)  # Bob's request wrote a new entry
        held[BOB].release()

    timer = threading.Timer(0.3, request_finishes)
    timer.start()
    started = time.monotonic()
    code, output = cli(operator, "rekey")
    timer.join()
    assert code == 0, output
    assert time.monotonic() - started >= 0.3
    assert _counts(output) == {"rekeyed": 1, "changed": 1, "undecryptable": 0, "already": 0, "gone": 0}
    assert control.get(keys[BOB]) == rewritten
    Fernet(new).decrypt(base64.urlsafe_b64encode(control.get(keys[ADELE])))
    assert 0 < control.ttl(keys[ADELE]) <= SYNTHETIC_TTL
