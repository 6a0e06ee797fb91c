"""The bytes that sit in Redis: sealed, bound to their user, rotatable, and small."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import zlib

import msal
import pytest
from cryptography.fernet import Fernet, MultiFernet

from app import create_app
from flask_obo.cache_store import RedisTokenCacheStore
from flask_obo.settings import Settings
from flask_obo.token_cache import TokenCacheCodec, UserTokenCache, partition_key, stored_scopes
from tests.support.fake_entra import ADELE, BOB, TENANT_ID, FakeEntra, settings_env


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cache_key(oid: str) -> str:
    return "flask-obo:cache:{" + hashlib.sha256(f"{oid}.{TENANT_ID}".encode()).hexdigest() + "}"


def app_with_keys(keys: str, redis_client):
    settings = Settings.from_env(settings_env(REDIS_URL="redis://unused", TOKEN_CACHE_KEYS=keys))
    store = RedisTokenCacheStore(redis_client, settings.token_cache_prefix, settings.token_cache_ttl_seconds)
    return create_app(settings, store=store).test_client()


def test_redis_holds_ciphertext_under_a_hashed_key(client, entra: FakeEntra, redis_client):
    api_token = entra.api_token(ADELE)
    assert client.get("/api/me", headers=bearer(api_token)).status_code == 200
    assert redis_client.keys("*") == [cache_key(ADELE).encode()]  # no lock left behind
    blob = redis_client.get(cache_key(ADELE))
    assert len(entra.token_requests) == 1
    graph_token = next(t for t, oid in entra.graph_tokens.items() if oid == ADELE)
    for secret in (api_token, graph_token, "rt-" + ADELE, ADELE, "adele@contoso.example", "Adele"):
        assert secret.encode() not in blob
    with pytest.raises(ValueError):
        json.loads(blob)
    assert 89 * 86400 < redis_client.ttl(cache_key(ADELE)) <= 90 * 86400


def test_a_blob_copied_to_another_user_is_never_used(client, entra: FakeEntra, redis_client, caplog):
    assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    redis_client.set(cache_key(BOB), redis_client.get(cache_key(ADELE)))
    with caplog.at_level(logging.WARNING):
        response = client.get("/api/me", headers=bearer(entra.api_token(BOB)))
    assert response.status_code == 200
    assert response.json["id"] == BOB
    assert entra.obo_calls() == 2  # Bob's own exchange, not Adele's token
    assert "belongs to another partition" in caplog.text
    assert partition_key(BOB, TENANT_ID) in caplog.text


def test_a_tampered_blob_is_a_miss_not_an_error(client, entra: FakeEntra, redis_client):
    assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    blob = bytearray(redis_client.get(cache_key(ADELE)))
    blob[40] ^= 0x01
    redis_client.set(cache_key(ADELE), bytes(blob))
    assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    assert entra.obo_calls() == 2


def test_garbage_in_redis_is_a_miss_not_an_error(client, entra: FakeEntra, redis_client):
    redis_client.set(cache_key(ADELE), b"\x00not a cache")
    assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    assert entra.obo_calls() == 1


def test_a_blob_under_an_unknown_key_is_a_miss(entra: FakeEntra, redis_client):
    first, second = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    assert app_with_keys(first, redis_client).get(
        "/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    assert app_with_keys(second, redis_client).get(
        "/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    assert entra.obo_calls() == 2


def test_key_rotation_reads_old_blobs_and_reseals_on_next_write(entra: FakeEntra, redis_client):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    entra.expires_in = 120  # every request renews, so every request writes
    assert app_with_keys(old, redis_client).get(
        "/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    rotated = app_with_keys(f"{new},{old}", redis_client)
    assert rotated.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    assert entra.obo_calls() == 1  # the old blob was read: no second exchange
    assert entra.grant_calls("refresh_token") == 1
    partition = partition_key(ADELE, TENANT_ID)
    blob = redis_client.get(cache_key(ADELE))
    assert TokenCacheCodec([new]).open(partition, blob) is not None
    assert TokenCacheCodec([old]).open(partition, blob) is None


def test_sealed_cache_is_at_most_0_6_of_msals_json(settings, store, redis_client):
    entra = FakeEntra(realistic=True)  # Graph and refresh tokens of real size
    import responses

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        entra.register(rsps)
        client = create_app(settings, store=store).test_client()
        assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    blob = redis_client.get(cache_key(ADELE))
    cache = msal.SerializableTokenCache()  # msal's own JSON, as msal writes it
    cache.deserialize(TokenCacheCodec(settings.token_cache_keys).open(partition_key(ADELE, TENANT_ID), blob))
    msal_json = cache.serialize()
    assert len(msal_json) > 6000
    assert len(blob) <= 0.6 * len(msal_json)


def test_the_cache_serializes_compactly_and_msal_reads_it(settings, store, redis_client):
    """``UserTokenCache.serialize`` writes compact JSON (msal indents it, in pure Python);
    msal's own ``deserialize`` reads it back to the same cache, and it is what is sealed."""
    entra = FakeEntra(realistic=True)
    import responses

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        entra.register(rsps)
        client = create_app(settings, store=store).test_client()
        assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    codec = TokenCacheCodec(settings.token_cache_keys)
    partition = partition_key(ADELE, TENANT_ID)
    stored = codec.open(partition, redis_client.get(cache_key(ADELE)))
    cache = UserTokenCache()
    assert cache.load(stored)
    cache.has_state_changed = True
    serialized = cache.serialize()
    assert not cache.has_state_changed
    assert serialized == stored  # sealed as serialized: compact
    assert "\n" not in serialized and ", " not in serialized and '": ' not in serialized
    theirs = msal.SerializableTokenCache()
    theirs.deserialize(serialized)
    assert json.loads(theirs.serialize()) == json.loads(serialized)
    assert len(serialized) < len(theirs.serialize())


def test_blobs_sealed_by_earlier_versions_still_open():
    """Earlier versions re-encoded what they sealed and compressed it with zlib's default
    32 KiB window; this one seals the compact JSON with an 8 KiB window. Both open, both ways."""
    key = Fernet.generate_key().decode()
    codec = TokenCacheCodec([key])
    alice = partition_key(ADELE, TENANT_ID)
    serialized = json.dumps({"AccessToken": {"k": {"secret": "s" * 20000, "expires_on": "1"}}},
                            separators=(",", ":"))
    earlier = b"\x01" + bytes.fromhex(alice) + zlib.compress(serialized.encode(), 9)
    earlier_blob = base64.urlsafe_b64decode(MultiFernet([Fernet(key)]).encrypt(earlier))
    assert codec.open(alice, earlier_blob) == serialized
    blob = codec.seal(alice, serialized)
    plaintext = MultiFernet([Fernet(key)]).decrypt(base64.urlsafe_b64encode(blob))
    assert zlib.decompress(plaintext[33:]).decode() == serialized  # what earlier versions run
    assert codec.open(alice, blob) == serialized


def test_codec_rejects_blobs_of_other_partitions_and_bombs():
    key = Fernet.generate_key().decode()
    codec = TokenCacheCodec([key])
    alice, bob = partition_key(ADELE, TENANT_ID), partition_key(BOB, TENANT_ID)
    blob = codec.seal(alice, '{"AccessToken": {}}')
    assert json.loads(codec.open(alice, blob)) == {"AccessToken": {}}
    assert codec.open(bob, blob) is None
    import base64
    import zlib

    bomb = b"\x01" + bytes.fromhex(alice) + zlib.compress(b" " * (20 * 1024 * 1024))
    sealed_bomb = base64.urlsafe_b64decode(MultiFernet([Fernet(key)]).encrypt(bomb))
    assert codec.open(alice, sealed_bomb) is None


@pytest.mark.parametrize(("requested", "returned", "expected"), [
    (["https://graph.microsoft.com/.default", "openid"],
     ["User.Read", "openid"],
     ["https://graph.microsoft.com/.default", "https://graph.microsoft.com/User.Read", "openid"]),
    (["https://graph.microsoft.com/User.Read"],
     ["https://graph.microsoft.com/User.Read"],
     ["https://graph.microsoft.com/User.Read"]),
    (["https://graph.microsoft.com/User.Read", "https://graph.microsoft.com/Mail.Read"],
     ["User.Read"],  # Entra granted less than asked: only what it returned is recorded
     ["https://graph.microsoft.com/User.Read"]),
    (["api://other/.default"], ["api://other/Files.Read"], ["api://other/.default", "api://other/Files.Read"]),
])
def test_tokens_are_filed_under_what_was_asked_and_granted(requested, returned, expected):
    assert stored_scopes(requested, returned) == expected


def _blobs_to_open(key: str, older: str, partition: str) -> dict[str, bytes]:
    """A sealed cache, and what Redis might hold instead of one."""
    codec = TokenCacheCodec([key])
    blob = codec.seal(partition, '{"AccessToken":{}}')
    tampered = bytearray(blob)
    tampered[40] ^= 1
    return {
        "sealed": blob,
        "sealed-with-an-older-key": TokenCacheCodec([older]).seal(partition, '{"Account":{}}'),
        "sealed-with-an-unknown-key": TokenCacheCodec([Fernet.generate_key().decode()]).seal(partition, "{}"),
        "tampered": bytes(tampered),
        "empty": b"",
        "version-only": b"\x80",
        "header-only": blob[:9],
        "shorter-than-its-iv": blob[:20],
        "no-ciphertext": blob[:25] + blob[-32:],
        "another-version": b"\x81" + blob[1:],
        "base64-text": base64.urlsafe_b64encode(blob),
    }


def test_only_a_sealed_cache_of_the_partition_opens_and_nothing_else_raises():
    """Whatever Redis holds instead of a sealed cache (tampered, cut short, another
    format) is a miss, never an exception; a cache sealed with an older key still opens."""
    key = Fernet.generate_key().decode()
    older = Fernet.generate_key().decode()
    alice = partition_key(ADELE, TENANT_ID)
    codec = TokenCacheCodec([key, older])
    opened = {name: codec.open(alice, blob) for name, blob in _blobs_to_open(key, older, alice).items()}
    assert opened.pop("sealed") == '{"AccessToken":{}}'
    assert opened.pop("sealed-with-an-older-key") == '{"Account":{}}'
    assert opened == {name: None for name in opened}
