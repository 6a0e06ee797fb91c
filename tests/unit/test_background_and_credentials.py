"""Background handles and Azure SDK credentials, fast: msal unpatched against the HTTP
double of Entra ID and Graph, fakeredis. The real thing (dev tenant, redis-server,
msgraph-sdk, another process) is tests/e2e/test_background_and_sdk.py."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.exceptions import ClientAuthenticationError
from cryptography.fernet import Fernet
from flask import Flask

from app import create_app
from app.extensions import obo
from flask_obo import RedisTokenCacheStore
from flask_obo.azure_credentials import expires_on
from flask_obo.background import BackgroundHandles
from flask_obo.errors import BackgroundHandleRevoked, CacheUnavailable, InvalidBackgroundHandle
from flask_obo.token_acquisition import CachedUser
from tests.support.fake_entra import ADELE, BOB, TENANT_ID, FakeEntra

ROOT = Path(__file__).resolve().parents[2]
GRAPH_DEFAULT = "https://graph.microsoft.com/.default"
CLAIMS = '{"access_token":{"nbf":{"essential":true,"value":"1700000000"}}}'


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def api(settings, store) -> Flask:
    return build(settings, store)


def build(settings, store) -> Flask:
    """The reference API plus routes that use the credentials and handles."""
    app = create_app(settings, store=store)

    @app.get("/t/credential")
    @obo.require_scope()
    def credential() -> dict[str, Any]:
        sync = obo.user_credential()
        token = sync.get_token(GRAPH_DEFAULT)
        info = sync.get_token_info(GRAPH_DEFAULT)
        from_async = asyncio.run(obo.async_user_credential().get_token(GRAPH_DEFAULT))
        assert isinstance(token, AccessToken) and isinstance(info, AccessTokenInfo)
        with pytest.raises(ValueError, match="scope"):
            sync.get_token()
        with pytest.raises(ClientAuthenticationError):
            sync.get_token(GRAPH_DEFAULT, tenant_id="another-tenant")
        fresh = sync.get_token(GRAPH_DEFAULT, claims=CLAIMS, enable_cae=True)
        return {"same": token.token == info.token == from_async.token, "fresh": fresh.token != token.token,
                "expires_on": token.expires_on}

    @app.post("/t/jobs")
    @obo.require_scope()
    def start_job() -> dict[str, str]:
        return {"handle": obo.background_handle()}

    return app


def test_the_user_credential_serves_sync_and_async_sdks_from_the_cache(api, entra: FakeEntra):
    body = api.test_client().get("/t/credential", headers=bearer(entra.api_token(ADELE))).json
    assert body["same"] and body["fresh"]  # a claims challenge gets a fresh token
    assert entra.obo_calls() == 2  # the first token, then the one for the claims
    assert body["expires_on"] > time.time() + 290  # never before msal would renew it


def test_credentials_and_handles_need_a_protected_request(api):
    with api.app_context():
        with pytest.raises(RuntimeError, match="protected request"):
            obo.user_credential()
        with pytest.raises(RuntimeError, match="protected request"):
            obo.background_handle()
    with api.test_request_context("/"), pytest.raises(RuntimeError, match="protected request"):
        obo.async_user_credential()


def test_a_handle_serves_its_user_outside_the_request_until_sign_out(api, entra: FakeEntra):
    client = api.test_client()
    adele = bearer(entra.api_token(ADELE))
    handle = client.post("/t/jobs", headers=adele).json["handle"]
    bobs = client.post("/t/jobs", headers=bearer(entra.api_token(BOB))).json["handle"]
    assert entra.obo_calls() == 2
    with api.app_context():
        assert obo.downstream("graph", on_behalf_of=handle).get("/me").json()["displayName"] == "Adele Vance"
        token = obo.acquire_token([GRAPH_DEFAULT], on_behalf_of=handle)
        assert obo.user_credential(on_behalf_of=handle).get_token(GRAPH_DEFAULT).token == token
        assert obo.acquire_token([GRAPH_DEFAULT], on_behalf_of=bobs) != token
    assert entra.obo_calls() == 2  # all from the cache
    assert client.delete("/api/me/token-cache", headers=adele).status_code == 204
    with api.app_context():
        with pytest.raises(BackgroundHandleRevoked):
            obo.acquire_token([GRAPH_DEFAULT], on_behalf_of=handle)
        assert obo.acquire_token([GRAPH_DEFAULT], on_behalf_of=bobs)  # Bob did not sign out
    assert client.get("/api/me", headers=adele).status_code == 200  # signed in again: a new entry
    with api.app_context(), pytest.raises(BackgroundHandleRevoked):
        obo.acquire_token([GRAPH_DEFAULT], on_behalf_of=handle)
    assert entra.obo_calls() == 3


def test_a_job_during_a_redis_outage_is_served_from_memory_or_told_to_retry(settings, entra: FakeEntra):
    server = fakeredis.FakeServer()
    store = RedisTokenCacheStore(fakeredis.FakeRedis(server=server), settings.token_cache_prefix,
                                 settings.token_cache_ttl_seconds)
    worker = build(settings, store)  # the job runs where the request ran
    handle = worker.test_client().post("/t/jobs", headers=bearer(entra.api_token(ADELE))).json["handle"]
    assert 200 < len(handle) < 300  # what docs/how-to/background-jobs.md says
    cold = create_app(settings, store=RedisTokenCacheStore(
        fakeredis.FakeRedis(server=server), settings.token_cache_prefix, settings.token_cache_ttl_seconds))
    server.connected = False
    with worker.app_context():
        assert obo.acquire_token([GRAPH_DEFAULT], on_behalf_of=handle)  # its memory copy
    with cold.app_context(), pytest.raises(CacheUnavailable):  # nothing to check it against: 503
        obo.acquire_token([GRAPH_DEFAULT], on_behalf_of=handle)
    server.connected = True
    with cold.app_context():
        assert obo.acquire_token([GRAPH_DEFAULT], on_behalf_of=handle)
    assert entra.obo_calls() == 1


def test_handles_open_under_rotated_keys_and_only_for_their_api():
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    user = CachedUser(ADELE, TENANT_ID, "unused")
    handle = BackgroundHandles([old], "api-1").issue(user, "generation-1")
    opened = BackgroundHandles([new, old], "api-1").open(handle)  # rotation: the old key still listed
    assert (opened.oid, opened.tid, opened.generation, opened.raw) == (ADELE, TENANT_ID, "generation-1", "")
    for stranger in (BackgroundHandles([new], "api-1"), BackgroundHandles([old], "api-2")):
        with pytest.raises(InvalidBackgroundHandle):
            stranger.open(handle)
    assert ADELE not in handle and TENANT_ID not in handle
    # Sealed with the right key but not a handle (another use of a derived key): refused too.
    handles = BackgroundHandles([old], "api-1")
    for payload in (b"[]", b'{"o": "x", "t": "y"}', b'{"o": 1, "t": "y", "g": "z"}', b"\xff"):
        with pytest.raises(InvalidBackgroundHandle):
            handles.open(handles._fernet.encrypt(payload).decode())


def test_expiry_comes_from_the_token_or_a_safe_lower_bound(entra: FakeEntra):
    token = entra.api_token(ADELE)  # a JWT
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert expires_on(token) == claims["exp"]
    for opaque in ("opaque-token", "a.b.c", "a.e30.c"):
        assert time.time() + 290 < expires_on(opaque) <= time.time() + 300


def test_flask_obo_imports_without_azure_core():
    code = ("import sys; sys.modules['azure'] = None; sys.modules['azure.core'] = None\n"
            "import flask_obo, flask_obo.extension, app\n"
            "from flask_obo.background import BackgroundHandles\n"
            "try:\n    import flask_obo.azure_credentials\nexcept ImportError:\n    print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
