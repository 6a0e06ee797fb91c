"""What a cached user costs (issue 17): between requests a session keeps its sealed blob,
its hot tokens and its bookkeeping, not msal's objects; a re-loaded (evicted) user
borrows a pooled ``Workbench`` instead of building an msal application; a user's
throttling state travels with them, never to the next user of the same bench."""

from __future__ import annotations

import gc
import json
import sys
import types
from collections.abc import Iterator
from typing import Any

import msal
import pytest
import responses

from app import create_app
from app.extensions import obo
from flask_obo import current_token
from flask_obo.extension import services_of
from flask_obo.memory_tier import MemoryTier, UserSession
from flask_obo.settings import Settings
from tests.support.fake_entra import ADELE, BOB, Behaviour, FakeEntra, settings_env

GRAPH_SCOPES = ["https://graph.microsoft.com/.default"]
USERS = [f"c3c3c3c3-0000-4000-8000-{n:012d}" for n in range(12)]
BOOKKEEPING_BYTES = 1500  # the session object, its hot-token dict and entry, the tier's map entry


@pytest.fixture
def realistic_entra() -> Iterator[FakeEntra]:
    """Graph tokens and refresh tokens of real size (the blob is then a few KiB)."""
    fake = FakeEntra(realistic=True)
    for oid in USERS:
        fake.add_user(oid, f"User {oid[-2:]}")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        fake.register(rsps)
        yield fake


def graph_token(app: Any, token: str) -> str:
    with app.test_request_context("/api/me", headers={"Authorization": f"Bearer {token}"}):
        obo.authenticate()
        return services_of(app).tokens.acquire_token(current_token, GRAPH_SCOPES)


def reachable(obj: object) -> dict[int, int]:
    """Every object reachable from ``obj`` (not classes, modules or functions) and its size."""
    sizes: dict[int, int] = {}
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in sizes or isinstance(o, (type, types.ModuleType, types.FunctionType)):
            continue
        sizes[id(o)] = sys.getsizeof(o)
        stack.extend(gc.get_referents(o))
    return sizes


def own_bytes(session: UserSession, others: list[UserSession]) -> int:
    """What ``session`` holds that no other session shares (the pool, the lock, interned
    strings are shared)."""
    shared: set[int] = set()
    for other in others:
        shared.update(reachable(other))
    return sum(size for key, size in reachable(session).items() if key not in shared)


def test_a_cached_user_keeps_its_blob_and_hot_token_not_msals_objects(realistic_entra):
    app = create_app(Settings.from_env(settings_env(TOKEN_MEMORY_CACHE_USERS="100")))
    for oid in USERS:
        graph_token(app, realistic_entra.api_token(oid))
    sessions = list(services_of(app).tokens.memory._sessions.values())
    assert len(sessions) == len(USERS)
    for n, session in enumerate(sessions[2:], start=2):
        assert session.blob is not None and session.hot
        kept = len(session.blob) + sum(len(hot.access_token) for hot in session.hot.values())
        assert kept > 4000  # real-sized tokens: msal's objects would add three times as much
        assert own_bytes(session, sessions[:2]) <= kept + BOOKKEEPING_BYTES + 2 * len(session.partition), n
        assert not any(isinstance(o, msal.ClientApplication | msal.TokenCache)
                       for o in gc.get_referents(session)), "msal's objects stay with the pool"


def test_a_warm_request_opens_no_blob(realistic_entra, monkeypatch):
    app = create_app(Settings.from_env(settings_env()))
    token = realistic_entra.api_token(USERS[0])
    first = graph_token(app, token)
    codec = services_of(app).tokens._codec
    opened: list[int] = []
    original = codec.open
    monkeypatch.setattr(codec, "open", lambda *args: opened.append(1) or original(*args))
    assert [graph_token(app, token) for _ in range(3)] == [first] * 3
    assert opened == []  # the hot token answers; the blob stays sealed


@pytest.fixture
def built_apps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the msal applications built (msal's own __init__ still runs)."""
    built: list[int] = []
    init = msal.ConfidentialClientApplication.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(msal.ConfidentialClientApplication, "__init__", counting)
    return built


def test_re_loading_an_evicted_user_builds_no_msal_application(realistic_entra, built_apps):
    app = create_app(Settings.from_env(settings_env(TOKEN_MEMORY_CACHE_USERS="3")))
    tokens = {oid: realistic_entra.api_token(oid) for oid in USERS}
    first = {oid: graph_token(app, tokens[oid]) for oid in USERS}
    assert len(built_apps) <= 1  # one bench, lent to each user in turn (one request at a time)
    exchanges = realistic_entra.obo_calls()
    for _ in range(2):  # 12 users through a 3-user tier: every request re-loads an evicted user
        assert {oid: graph_token(app, tokens[oid]) for oid in USERS} == first
    assert len(built_apps) <= 1
    assert realistic_entra.obo_calls() == exchanges  # re-read from Redis, not exchanged again


def test_a_users_400_stays_theirs_after_the_bench_served_another_user(client, entra: FakeEntra):
    entra.behaviours[ADELE] = Behaviour("invalid_grant")
    adele = entra.api_token(ADELE)
    assert client.get("/api/me", headers={"Authorization": f"Bearer {adele}"}).status_code == 401
    bob = {"Authorization": f"Bearer {entra.api_token(BOB)}"}
    assert client.get("/api/me", headers=bob).status_code == 200
    calls = len(entra.token_requests)
    # msal remembers the 400 for this very request for a minute (its http_cache): that
    # memo is Adele's, so it came back with her session, and Bob never saw it.
    assert client.get("/api/me", headers={"Authorization": f"Bearer {adele}"}).status_code == 401
    assert len(entra.token_requests) == calls


def test_a_users_retry_after_gate_follows_them_and_no_one_else(client, entra: FakeEntra):
    entra.behaviours[ADELE] = Behaviour("throttled", retry_after="30")
    adele = {"Authorization": f"Bearer {entra.api_token(ADELE)}"}
    assert client.get("/api/me", headers=adele).status_code == 503
    bob = {"Authorization": f"Bearer {entra.api_token(BOB)}"}
    assert client.get("/api/me", headers=bob).status_code == 200
    calls = len(entra.token_requests)
    again = client.get("/api/me", headers=adele)
    assert again.status_code == 503 and 0 < int(again.headers["Retry-After"]) <= 30
    assert len(entra.token_requests) == calls  # her gate, kept by her session, not the bench's


class _Http:
    blocked_until = 0.0


def test_a_session_whose_tokens_are_in_no_blob_keeps_them_until_read_again() -> None:
    memory = MemoryTier(10, _Http)  # type: ignore[arg-type]
    session = memory.hold("a", 1.0)
    assert session is not None
    session.cache.load(json.dumps({"RefreshToken": {"rt": {
        "credential_type": "RefreshToken", "secret": "rt-secret", "home_account_id": "h",
        "environment": "login.example", "client_id": "c"}}}))
    session.outdated()  # its write lost a race: the store holds another entry, not this one
    memory.release(session)
    again = memory.hold("a", 1.0)
    assert again is session
    assert [rt["secret"] for rt in session.cache.search(session.cache.CredentialType.REFRESH_TOKEN)] \
        == ["rt-secret"]  # still in memory (served while Redis is away), not given to the pool
    session.acquired(b"sealed")  # sealed again: the blob holds them now
    memory.release(session)
    pooled = memory.benches.take()  # the bench it gave back holds no one's tokens
    assert list(pooled.cache.search(pooled.cache.CredentialType.REFRESH_TOKEN)) == []
