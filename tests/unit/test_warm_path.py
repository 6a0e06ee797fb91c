"""The warm path's two memos: remembered token validations (``ValidatedTokens``) and the
session's hot Graph token (``HotToken``). Each may skip work only while skipping it cannot
change the answer."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msal
import pytest
import requests
import responses
from authlib.oauth2.rfc6750 import InvalidTokenError
from joserfc.jwk import RSAKey

import flask_obo.protector as protector_module
from app import create_app
from app.extensions import obo
from flask_obo import current_token
from flask_obo.authority import OpenIdConfiguration, SigningKeys
from flask_obo.extension import services_of
from flask_obo.protector import EntraTokenValidator, ValidatedTokens
from flask_obo.settings import Settings
from tests.support.fake_entra import ADELE, BOB, METADATA_URL, FakeEntra, settings_env

CLAIMS_CHALLENGE = '{"access_token":{"nbf":{"essential":true,"value":"1"}}}'


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- ValidatedTokens on fake clocks ------------------------------------------------------------

KEY = RSAKey.generate_key(2048, parameters={"kid": "key-1"})


def remembered(limit: int = 10) -> tuple[ValidatedTokens, Clock]:
    wall = Clock(1_000.0)
    return ValidatedTokens(limit, clock=wall), wall


def test_a_remembered_validation_ends_at_the_tokens_exp():
    cache, wall = remembered()
    digest = cache.digest("token-a")
    cache.put(digest, {"exp": 1_100, "oid": ADELE}, "key-1", KEY)

    wall.now = 1_099.9
    assert cache.get(digest) is not None
    wall.now = 1_100  # at exp, not after the leeway: the full check decides from here on
    assert cache.get(digest) is None
    assert len(cache) == 0


def test_a_remembered_validation_lasts_until_exp_however_long_ago_it_was_made():
    """A user whose requests to a worker come an hour apart, with a token valid for longer
    (CAE tokens live up to 28 h), pays no second RS256 check: it would say the same."""
    cache, wall = remembered()
    digest = cache.digest("token-a")
    cache.put(digest, {"exp": 1_000 + 28 * 3600}, "key-1", KEY)

    wall.now += 28 * 3600 - 1
    assert cache.get(digest) is not None


def test_a_token_past_its_exp_is_never_remembered():
    cache, _ = remembered()
    for exp in (999, 1_000, "tomorrow", None, True):  # within the leeway, or not a number
        cache.put(cache.digest(f"token-{exp}"), {"exp": exp}, "key-1", KEY)
    assert len(cache) == 0


def test_another_token_is_not_found_and_the_cache_stays_bounded():
    cache, _ = remembered(limit=2)
    a, b, c = (cache.digest(t) for t in ("token-a", "token-b", "token-c"))
    cache.put(a, {"exp": 5_000}, "key-1", KEY)
    cache.put(b, {"exp": 5_000}, "key-1", KEY)
    assert cache.get(cache.digest("token-a.")) is None
    assert cache.get(a) is not None  # a is now the most recently used
    cache.put(c, {"exp": 5_000}, "key-1", KEY)

    assert len(cache) == 2
    assert cache.get(b) is None  # the least recently used went
    assert cache.get(a) is not None and cache.get(c) is not None


def test_the_cache_holds_no_raw_token():
    cache, _ = remembered()
    cache.put(cache.digest("eyJ.secret.token"), {"exp": 5_000}, "key-1", KEY)
    assert "eyJ.secret.token" not in repr(cache._entries)


# --- the validator with the cache --------------------------------------------------------------


@pytest.fixture
def authority() -> Iterator[tuple[FakeEntra, Clock]]:
    fake = FakeEntra()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        fake.register(rsps)
        yield fake, Clock(10_000.0)


@pytest.fixture
def validator(authority) -> EntraTokenValidator:
    _, clock = authority
    session = requests.Session()
    keys = SigningKeys(OpenIdConfiguration(METADATA_URL, session, clock), session, clock)
    return EntraTokenValidator(Settings.from_env(settings_env()), keys)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every full validation's token (joserfc's ``jwt.decode`` as the protector calls it)."""
    seen: list[str] = []
    decode = protector_module.jwt.decode

    def counting(value: str, *args, **kwargs):
        seen.append(value)
        return decode(value, *args, **kwargs)

    monkeypatch.setattr(protector_module.jwt, "decode", counting)
    return seen


def test_the_same_token_is_verified_once_and_another_afresh(authority, validator, decodes):
    fake, _ = authority
    token, other = fake.api_token(ADELE), fake.api_token(BOB)

    first = validator.authenticate_token(token)
    again = validator.authenticate_token(token)
    assert decodes == [token]
    assert again == first and again.raw == token and again.oid == ADELE

    assert validator.authenticate_token(other).oid == BOB
    assert decodes == [token, other]


def test_a_remembered_token_is_not_shared_mutable_state(authority, validator):
    fake, _ = authority
    token = fake.api_token(ADELE)
    validator.authenticate_token(token)["oid"] = "tampered"
    assert validator.authenticate_token(token).oid == ADELE


def test_a_withdrawn_signing_key_ends_remembered_validations(authority, validator, decodes):
    fake, clock = authority
    token = fake.api_token(ADELE)
    validator.authenticate_token(token)
    fake.published = [RSAKey.generate_key(2048, parameters={"kid": "key-2"})]

    clock.now += 24 * 3600  # the scheduled refresh: key-1 is gone
    with pytest.raises(InvalidTokenError):
        validator.authenticate_token(token)
    assert len(validator.validated) == 0


def test_refetched_unchanged_keys_keep_remembered_validations(authority, validator, decodes):
    """The daily refresh (or a refetch on a forged ``kid``) that finds the same keys
    changes no verdict: no token is checked again because of it."""
    fake, clock = authority
    token = fake.api_token(ADELE)
    validator.authenticate_token(token)

    clock.now += 24 * 3600  # the scheduled refresh: the same keys
    assert validator.authenticate_token(token).oid == ADELE
    forged = fake.api_token(BOB, key=RSAKey.generate_key(2048, parameters={"kid": "forged"}))
    with pytest.raises(InvalidTokenError):  # an unknown kid: one refetch, the same keys again
        validator.authenticate_token(forged)
    assert validator.authenticate_token(token).oid == ADELE
    assert decodes.count(token) == 1


def test_a_replaced_key_under_the_same_kid_sends_its_tokens_through_the_full_check(
        authority, validator, decodes):
    fake, clock = authority
    token = fake.api_token(ADELE)
    validator.authenticate_token(token)
    fake.published = [RSAKey.generate_key(2048, parameters={"kid": "key-1"})]  # new material

    clock.now += 24 * 3600
    with pytest.raises(InvalidTokenError):
        validator.authenticate_token(token)
    assert decodes == [token, token]
    assert len(validator.validated) == 0


def test_a_rejected_token_is_rejected_every_time(authority, validator, decodes):
    fake, _ = authority
    forged = fake.api_token(ADELE, key=RSAKey.generate_key(2048, parameters={"kid": "key-1"}))
    for _ in range(2):
        with pytest.raises(InvalidTokenError):
            validator.authenticate_token(forged)
    assert decodes == [forged, forged]
    assert len(validator.validated) == 0


def test_the_scope_is_checked_on_every_request_of_a_remembered_token(client, entra):
    token = entra.api_token(scp="User.Read")
    for _ in range(2):
        assert client.get("/api/whoami", headers=bearer(token)).status_code == 403


def test_the_cache_is_bounded_by_its_own_setting_not_the_memory_tiers(entra, decodes):
    """A 1-user memory tier still remembers 3 validations: users re-loaded from Redis past
    the tier's size are not also checked with RS256 again. VALIDATION_MEMORY_TOKENS bounds it."""
    app = create_app(Settings.from_env(settings_env(TOKEN_MEMORY_CACHE_USERS="1",
                                                    VALIDATION_MEMORY_TOKENS="3")))
    client = app.test_client()
    tokens = [entra.api_token() for _ in range(4)]
    for token in tokens[:3] * 2:
        assert client.get("/api/whoami", headers=bearer(token)).status_code == 200
    assert decodes == tokens[:3]  # each checked once
    assert client.get("/api/whoami", headers=bearer(tokens[3])).status_code == 200
    validator = services_of(app).protector.get_token_validator("bearer")
    assert len(validator.validated) == 3


def test_remembered_validations_share_the_strings_every_token_repeats(authority, validator):
    """Each token's JSON is parsed on its own: remembered as is, every entry would hold its
    own copy of each claim name and of the audience, issuer, tenant, scopes."""
    fake, _ = authority
    adele = validator.authenticate_token(fake.api_token(ADELE))
    bob = validator.authenticate_token(fake.api_token(BOB))
    entries = [entry.claims for entry in validator.validated._entries.values()]
    assert entries == [dict(adele), dict(bob)]  # the same claims
    for name in ("aud", "iss", "tid", "scp"):
        assert entries[0][name] is entries[1][name], name
    assert all(a is b for a, b in zip(sorted(entries[0]), sorted(entries[1]), strict=True))
    assert entries[0]["oid"] != entries[1]["oid"]


# --- the hot Graph token -----------------------------------------------------------------------

GRAPH_SCOPES = ["https://graph.microsoft.com/.default"]


@pytest.fixture
def silent_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    silent = msal.ClientApplication.acquire_token_silent

    def counting(self, *args, **kwargs):
        calls.append(1)
        return silent(self, *args, **kwargs)

    monkeypatch.setattr(msal.ClientApplication, "acquire_token_silent", counting)
    return calls


def graph_token(app, token: str, claims_challenge: str | None = None) -> str:
    with app.test_request_context("/api/me", headers=bearer(token)):
        obo.authenticate()
        return services_of(app).tokens.acquire_token(current_token, GRAPH_SCOPES, claims_challenge)


def test_warm_requests_skip_msals_lookup_and_get_the_same_token(app, entra, silent_calls):
    token = entra.api_token(ADELE)
    first = graph_token(app, token)
    looked_up = len(silent_calls)
    assert [graph_token(app, token) for _ in range(3)] == [first] * 3
    assert len(silent_calls) == looked_up  # the exchange's answer was remembered: msal never asked
    assert entra.obo_calls() == 1


def test_a_token_written_by_another_worker_is_used_at_once(settings, store, entra):
    here, there = create_app(settings, store=store), create_app(settings, store=store)
    token = entra.api_token(ADELE)
    old = graph_token(here, token)
    assert graph_token(here, token) == old  # remembered

    new = graph_token(there, token, claims_challenge=CLAIMS_CHALLENGE)  # writes the store
    assert new != old
    assert graph_token(here, token) == new


def test_a_fresh_token_after_a_claims_challenge_replaces_the_remembered_one(app, entra):
    token = entra.api_token(ADELE)
    old = graph_token(app, token)
    assert graph_token(app, token) == old
    new = graph_token(app, token, claims_challenge=CLAIMS_CHALLENGE)
    assert new != old
    assert graph_token(app, token) == new


def test_the_remembered_token_stops_at_msals_refresh_on(app, entra):
    entra.refresh_in = 1  # Entra's hint: renew after a second, though valid for an hour
    token = entra.api_token(ADELE)
    first = graph_token(app, token)
    assert graph_token(app, token) == first  # remembered until refresh_on
    entra.refresh_in = None

    time.sleep(1.2)
    renewed = graph_token(app, token)
    assert renewed != first
    assert entra.grant_calls("refresh_token") == 1
    assert graph_token(app, token) == renewed


def test_a_token_near_expiry_is_never_remembered(app, entra, silent_calls):
    entra.expires_in = 301  # msal serves it for about a second, then treats it as expired
    token = entra.api_token(ADELE)
    first = graph_token(app, token)
    session = next(iter(services_of(app).tokens.memory._sessions.values()))
    graph_token(app, token)
    assert all(hot.good_until <= time.time() + 1 for hot in session.hot.values())
    time.sleep(1.2)
    entra.expires_in = 3600
    assert graph_token(app, token) != first  # renewed: msal, not a memo, decided
