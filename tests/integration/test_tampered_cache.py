"""No sticky failures (issue 11): whatever sits under a user's key in a real redis-server,
an entry that is not a valid msal cache is a miss. The user's next request is answered
with one OBO exchange, the entry is replaced by a sealed cache with a TTL, and the
replacement is logged by partition only: never the entry, never a token.

Every JSON case is sealed with the app's own codec (right key, right partition), so it
reaches msal: only its content is wrong (``{`` and the too-deep nesting, which the codec
will not seal because they do not parse, are sealed by hand in its layout). Bytes cases
are wrong before that; Redis-type cases are wrong before the codec even sees them.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis
from cryptography.fernet import Fernet
from flask.testing import FlaskClient

from app import create_app
from flask_obo.cache_store import RedisTokenCacheStore
from flask_obo.settings import Settings
from flask_obo.token_cache import TokenCacheCodec, UserTokenCache, partition_key
from tests.support.fake_entra import ADELE, BOB, CLIENT_ID, TENANT_ID, FakeEntra, settings_env

pytestmark = pytest.mark.integration

CANARY = "tampered-canary-5e1d9c"  # planted wherever a case can hold text; must never be logged
SEEDED_TTL = 3600  # tampered strings get a TTL unlike the app's, so a rewrite shows in the TTL
ENVIRONMENT = "login.microsoftonline.com"
# msal's sections, and flask-obo's own: the entry's generation (background handles).
MSAL_SECTIONS = {"Account", "AccessToken", "RefreshToken", "IdToken", "AppMetadata", "FlaskOboGeneration"}
FRAGMENT = 24  # length of the pieces of a payload looked for in the logs


@dataclass
class Scene:
    """Adele's key in a real Redis, and what a case needs to plant an entry under it."""

    redis: redis.Redis
    store: RedisTokenCacheStore
    settings: Settings
    entra: FakeEntra
    partition: str

    @property
    def key(self) -> str:
        return self.store.key(self.partition)  # key names belong to the store

    @property
    def codec(self) -> TokenCacheCodec:
        return TokenCacheCodec(self.settings.token_cache_keys)


Plant = Callable[[Scene], tuple[str, ...]]  # writes the entry; returns text that must not be logged


# --- the app ------------------------------------------------------------------------------


@pytest.fixture
def settings(redis_url: str, fernet_key: str, real_redis: redis.Redis) -> Settings:
    return Settings.from_env(settings_env(REDIS_URL=redis_url, TOKEN_CACHE_KEYS=fernet_key))


def new_store(settings: Settings) -> RedisTokenCacheStore:
    """A store of its own on the session's redis-server, as each worker process has."""
    assert settings.redis_url
    return RedisTokenCacheStore(redis.Redis.from_url(settings.redis_url, socket_timeout=5),
                                settings.token_cache_prefix, settings.token_cache_ttl_seconds)


def new_worker(settings: Settings, store: RedisTokenCacheStore | None = None) -> FlaskClient:
    """A freshly started worker: nothing in memory, everything from Redis."""
    return create_app(settings, store=store or new_store(settings)).test_client()


def me(client: FlaskClient, entra: FakeEntra, oid: str, sent: list[str]) -> tuple[int, str | None]:
    """GET /api/me as ``oid`` with a fresh SPA token (kept in ``sent`` for the leak check)."""
    token = entra.api_token(oid)
    sent.append(token)
    response = client.get("/api/me", headers={"Authorization": f"Bearer {token}"})
    return response.status_code, (response.json or {}).get("id")


def obo_calls_for(entra: FakeEntra, oid: str) -> int:
    """OBO requests that reached the fake Entra carrying ``oid``'s assertion."""
    def subject(assertion: str) -> str:
        payload = assertion.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["oid"]

    return sum(1 for form in entra.token_requests
               if "assertion" in form and subject(form["assertion"]) == oid)


# --- what must hold afterwards --------------------------------------------------------------


def assert_replaced_by_a_valid_cache(scene: Scene) -> None:
    """The key holds a sealed string blob with the app's TTL, and it opens to a plain msal
    cache of Adele alone, with nothing left of the tampered entry."""
    assert scene.redis.type(scene.key) == b"string"
    ttl = scene.settings.token_cache_ttl_seconds
    assert ttl - 300 < scene.redis.ttl(scene.key) <= ttl
    text = scene.codec.open(scene.partition, scene.redis.get(scene.key))
    assert text is not None and CANARY not in text
    data = json.loads(text)
    assert isinstance(data, dict) and set(data) <= MSAL_SECTIONS
    for entries in data.values():
        assert isinstance(entries, dict) and all(isinstance(e, dict) for e in entries.values())
    cache = UserTokenCache()
    cache.deserialize(text)
    assert cache.belongs_to(ADELE, TENANT_ID)
    assert cache.account_of(ADELE, TENANT_ID) is not None
    (access_token,) = data["AccessToken"].values()
    assert scene.entra.graph_tokens.get(access_token["secret"]) == ADELE
    assert int(access_token["expires_on"]) > time.time() + 600
    (refresh_token,) = data["RefreshToken"].values()
    assert refresh_token["secret"].startswith(f"rt-{ADELE}-")


def assert_logged_by_partition_only(caplog: pytest.LogCaptureFixture, partition: str) -> None:
    """At least one warning names the partition, and none of those names the user."""
    reports = [r.getMessage() for r in caplog.records
               if r.levelno >= logging.WARNING and partition in r.getMessage()]
    assert reports, f"no warning names partition {partition}"
    for message in reports:
        assert ADELE not in message and "adele@" not in message.lower()


def assert_nothing_leaked(caplog: pytest.LogCaptureFixture, fragments: tuple[str, ...],
                          entra: FakeEntra, sent: list[str]) -> None:
    """No piece of the planted entry and no token (SPA, Graph, refresh) reached the logs."""
    logged = caplog.text
    leaked = [f for f in fragments if f in logged]
    assert not leaked, f"the log holds part of the tampered entry: {leaked[:3]}"
    for token in [*sent, *entra.graph_tokens]:
        assert token not in logged and token[-FRAGMENT:] not in logged
    assert f"rt-{ADELE}" not in logged and f"rt-{BOB}" not in logged


# --- planting ---------------------------------------------------------------------------------


def pieces(text: str) -> tuple[str, ...]:
    """Overlapping pieces of ``text`` to look for in the logs (too short a text is skipped:
    ``1`` or ``[]`` cannot be told apart from ordinary log text)."""
    text = text[:4096]
    if len(text) < 8:
        return ()
    if len(text) <= FRAGMENT:
        return (text,)
    return tuple(text[i:i + FRAGMENT] for i in range(0, len(text) - FRAGMENT + 1, FRAGMENT // 2))


def blob_pieces(blob: bytes) -> tuple[str, ...]:
    """Pieces of ``blob`` in every form a log line could print it: repr, hex, base64."""
    forms = (repr(blob)[2:-1], blob.hex(), base64.b64encode(blob).decode(),
             base64.urlsafe_b64encode(blob).decode())
    return tuple(p for form in forms for p in pieces(form))


def seal_text(scene: Scene, partition: str, text: str) -> bytes:
    """``text`` sealed in the codec's layout (version byte, partition digest, zlib) for texts
    the codec refuses to seal because they do not parse; checked to open as ``text``."""
    plaintext = b"\x01" + bytes.fromhex(partition) + zlib.compress(text.encode(), 9)
    token = Fernet(scene.settings.token_cache_keys[0]).encrypt(plaintext)
    blob = base64.urlsafe_b64decode(token)
    assert scene.codec.open(partition, blob) == text, "the codec's layout changed: update seal_text"
    return blob


def put(scene: Scene, blob: bytes, fragments: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Store ``blob`` as the user's entry with a foreign TTL."""
    scene.redis.set(scene.key, blob, ex=SEEDED_TTL)
    return (*fragments, *blob_pieces(blob))


def text_pieces(text: str) -> tuple[str, ...]:
    """What of a planted text must not be logged: the canary where the text holds secrets
    (its ids, tenant and environment are public and msal may log them), else the text."""
    return (CANARY,) if CANARY in text else pieces(text)


def sealed_json(text: str) -> Plant:
    """A JSON text sealed properly with the app's codec for the user's partition."""
    return lambda scene: put(scene, scene.codec.seal(scene.partition, text), text_pieces(text))


def sealed_unparsable(text: str) -> Plant:
    """A text that json.loads rejects, sealed properly for the user's partition."""
    return lambda scene: put(scene, seal_text(scene, scene.partition, text), text_pieces(text))


def raw_bytes(make: Callable[[Scene], bytes]) -> Plant:
    """Bytes that are not a blob the codec accepts."""
    return lambda scene: put(scene, make(scene))


def redis_value(write: Callable[[redis.Redis, str], object]) -> Plant:
    """A value of another Redis type under the key, without a TTL (as a stray write leaves it)."""
    def plant(scene: Scene) -> tuple[str, ...]:
        write(scene.redis, scene.key)
        return (CANARY,)

    return plant


def string_without_ttl(scene: Scene) -> tuple[str, ...]:
    """An unsealed string (a cache some other writer left in plain JSON) that never expires."""
    value = json.dumps({"AccessToken": {"k": {"secret": CANARY}}}).encode()
    scene.redis.set(scene.key, value)
    return (CANARY, *blob_pieces(value))


def expired_cache_of_the_user(scene: Scene) -> tuple[str, ...]:
    """A real msal cache of Adele (from a real exchange) whose access token expired 200 days ago."""
    sent: list[str] = []
    assert me(new_worker(scene.settings), scene.entra, ADELE, sent) == (200, ADELE)
    data = json.loads(scene.codec.open(scene.partition, scene.redis.get(scene.key)) or "{}")
    long_ago = int(time.time()) - 200 * 86400
    for entry in data["AccessToken"].values():
        entry.update(cached_at=str(long_ago - 3600), expires_on=str(long_ago),
                     extended_expires_on=str(long_ago))
    fragments = put(scene, scene.codec.seal(scene.partition, json.dumps(data)))
    scene.entra.token_requests.clear()  # the warm-up was not part of the case
    return fragments


def adele_account() -> dict[str, str]:
    return {"home_account_id": f"{ADELE}.{TENANT_ID}", "environment": ENVIRONMENT, "realm": TENANT_ID,
            "local_account_id": ADELE, "username": "adele@contoso.example", "authority_type": "MSSTS"}


def adele_ids(credential_type: str) -> dict[str, str]:
    """The fields msal finds Adele's credentials by, so a lookup reaches the rest of the entry."""
    return {"credential_type": credential_type, "home_account_id": f"{ADELE}.{TENANT_ID}",
            "environment": ENVIRONMENT, "client_id": CLIENT_ID, "realm": TENANT_ID}


WRONG_TYPES = {"credential_type": 7, "secret": [CANARY], "home_account_id": 8, "environment": None,
               "client_id": {"x": CANARY}, "realm": 0, "target": 5, "cached_at": [],
               "expires_on": "soon", "extended_expires_on": {"at": "never"}}
BOBS_REFRESH_TOKEN = {"credential_type": "RefreshToken", "secret": f"rt-{BOB}-{CANARY}",
                      "home_account_id": f"{BOB}.{TENANT_ID}", "environment": ENVIRONMENT,
                      "client_id": CLIENT_ID}


def nested(depth: int) -> object:
    """Garbage nested ``depth`` levels deep, the canary at the bottom."""
    value: object = CANARY
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


CASES: dict[str, Plant] = {
    # JSON that decrypts, carries the right partition, and is no msal cache.
    "json-list": sealed_json("[]"),
    "json-string": sealed_json('"x"'),
    "json-number": sealed_json("1"),
    "json-null": sealed_json("null"),
    "account-section-a-list": sealed_json('{"Account": []}'),
    "account-entry-a-string": sealed_json(json.dumps({"Account": {"k": CANARY}})),
    "access-token-without-fields": sealed_json('{"AccessToken": {"k": {}}}'),
    "access-token-of-wrong-types": sealed_json(json.dumps({"AccessToken": {"k": WRONG_TYPES}})),
    "wrong-types-under-the-users-account": sealed_json(json.dumps({
        "Account": {"a": adele_account()},
        "AccessToken": {"k": dict(WRONG_TYPES, **adele_ids("AccessToken"))},
        "RefreshToken": {"r": dict(WRONG_TYPES, **adele_ids("RefreshToken"))}})),
    "refresh-token-of-another-user": sealed_json(json.dumps({"RefreshToken": {"k": BOBS_REFRESH_TOKEN}})),
    "app-metadata-a-number": sealed_json('{"AppMetadata": 3}'),
    "nested-garbage": sealed_json(json.dumps({"AccessToken": nested(200), "Account": nested(201)})),
    "nested-too-deep-to-parse": sealed_unparsable("[" * 100_000 + "]" * 100_000),
    "not-json": sealed_unparsable("{"),
    "expired-cache-of-the-user": expired_cache_of_the_user,
    # Bytes the codec must refuse.
    "random-bytes": raw_bytes(lambda scene: os.urandom(512)),
    "empty-bytes": raw_bytes(lambda scene: b""),
    "sealed-with-another-key": raw_bytes(lambda scene: TokenCacheCodec([Fernet.generate_key().decode()])
                                         .seal(scene.partition, json.dumps({"x": CANARY}))),
    "sealed-for-another-partition": raw_bytes(lambda scene: scene.codec.seal(
        partition_key(BOB, TENANT_ID), json.dumps({"RefreshToken": {"k": BOBS_REFRESH_TOKEN}}))),
    "decompression-bomb": sealed_json(json.dumps({"AccessToken": {"k": {"secret": CANARY * 100_000}}})),
    # Another Redis type under the key.
    "redis-list": redis_value(lambda r, key: r.rpush(key, CANARY)),
    "redis-hash": redis_value(lambda r, key: r.hset(key, "secret", CANARY)),
    "redis-set": redis_value(lambda r, key: r.sadd(key, CANARY)),
    "redis-zset": redis_value(lambda r, key: r.zadd(key, {CANARY: 1.0})),
    "redis-stream": redis_value(lambda r, key: r.xadd(key, {"secret": CANARY})),
    "redis-string-without-ttl": string_without_ttl,
}
VALID_BUT_EXPIRED = {"expired-cache-of-the-user"}  # not tampered: renewing it is the normal path
TOMBSTONE = {"empty-bytes"}  # what a sign-out leaves: a miss, with nothing to warn about


@pytest.fixture
def scene(settings: Settings, real_redis: redis.Redis, entra: FakeEntra) -> Scene:
    return Scene(real_redis, new_store(settings), settings, entra, partition_key(ADELE, TENANT_ID))


def test_the_decompression_bomb_is_one(settings: Settings) -> None:
    """The bomb case seals 2 MiB of JSON into a blob Redis holds in a few KiB."""
    text = json.dumps({"AccessToken": {"k": {"secret": CANARY * 100_000}}})
    assert len(text) > 2 * 1024 * 1024
    assert len(TokenCacheCodec(settings.token_cache_keys).seal("0" * 64, text)) < 16 * 1024


@pytest.mark.parametrize("case", list(CASES))
def test_an_entry_that_is_no_msal_cache_is_a_miss_and_replaced(
    scene: Scene, entra: FakeEntra, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.DEBUG)  # every record, msal's too
    fragments = CASES[case](scene)
    caplog.clear()  # from here on, only what the case's requests log
    client, sent = new_worker(scene.settings, scene.store), []

    statuses = [me(client, entra, ADELE, sent) for _ in range(3)]

    assert statuses == [(200, ADELE)] * 3
    assert len(entra.token_requests) == 1  # one call to Entra in all, then cache hits
    if case not in VALID_BUT_EXPIRED:
        assert entra.obo_calls() == 1
        assert entra.grant_calls("refresh_token") == 0  # nobody else's refresh token was redeemed
    assert_replaced_by_a_valid_cache(scene)
    assert me(new_worker(scene.settings), entra, ADELE, sent) == (200, ADELE)  # another worker hits
    assert len(entra.token_requests) == 1
    if case not in VALID_BUT_EXPIRED | TOMBSTONE:
        assert_logged_by_partition_only(caplog, scene.partition)
    assert_nothing_leaked(caplog, fragments, entra, sent)


@pytest.mark.parametrize("case", ["json-list", "access-token-of-wrong-types", "random-bytes", "redis-list"])
def test_one_users_tampered_entry_leaves_another_users_warm_requests_alone(
    scene: Scene, entra: FakeEntra, case: str
) -> None:
    client, sent = new_worker(scene.settings, scene.store), []
    assert me(client, entra, BOB, sent) == (200, BOB)
    bobs_key = scene.store.key(partition_key(BOB, TENANT_ID))
    bobs_blob = scene.redis.get(bobs_key)
    CASES[case](scene)

    bob = [me(client, entra, BOB, sent) for _ in range(2)]  # while Adele's entry is bad
    adele = [me(client, entra, ADELE, sent) for _ in range(3)]
    bob += [me(client, entra, BOB, sent), me(new_worker(scene.settings), entra, BOB, sent)]

    assert bob == [(200, BOB)] * 4
    assert obo_calls_for(entra, BOB) == 1  # his warm-up only
    assert scene.redis.get(bobs_key) == bobs_blob  # his entry untouched
    assert adele == [(200, ADELE)] * 3
    assert obo_calls_for(entra, ADELE) == 1
