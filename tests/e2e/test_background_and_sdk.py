"""Azure SDK credentials and background handles, for real: the dev tenant over HTTPS (its
Entra ID and Graph), a real redis-server, msal unpatched, the Microsoft Graph SDK
(msgraph-sdk, async, httpx) and an azure-core pipeline. The API is a small Flask app
built on flask-obo's public API, served in this process; background jobs run in a
separate Python process with the same settings, as a job queue's worker would.

Exchanges and refreshes are counted at the dev tenant's token endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from azure.core import PipelineClient
from azure.core.pipeline.policies import BearerTokenCredentialPolicy, RetryPolicy
from azure.core.rest import HttpRequest
from cryptography.fernet import Fernet
from flask import Flask
from kiota_authentication_azure.azure_identity_authentication_provider import (
    AzureIdentityAuthenticationProvider,
)
from msgraph import GraphRequestAdapter, GraphServiceClient, graph_request_adapter
from msgraph_core import GraphClientFactory

from flask_obo import FlaskOBO, Settings
from flask_obo.background import BackgroundHandles
from flask_obo.errors import BackgroundHandleRevoked, InvalidBackgroundHandle, RefreshTokenExpired
from flask_obo.token_acquisition import CachedUser
from tests.support.servers import redis_server
from tests.support.stack import DevTenantProcess, api_env, devtenant

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SHORT_LIFETIME = 240  # msal renews a token under 5 minutes from expiry: it has aged at once
# Redis commands that read or write entries and locks (the invalidation listener's own
# traffic, PINGs and tracking, is not counted).
DATA_COMMANDS = ("get", "set", "del", "pttl", "eval", "evalsha", "exists", "mget")

# A background job: another process, the same settings, an app context and the handle.
JOB = """
import json, os, sys
from flask import Flask
from flask_obo import FlaskOBO
from flask_obo.errors import ApiError

app = Flask("job")
obo = FlaskOBO(app)
with app.app_context():
    try:
        response = obo.downstream("graph", on_behalf_of=os.environ["JOB_HANDLE"]).get("/me")
    except ApiError as exc:
        print(json.dumps({"error": exc.error, "kind": type(exc).__name__, "status": exc.status}))
    else:
        print(json.dumps({"status": response.status_code, "name": response.json()["displayName"]}))
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevTenantProcess, dict[str, str]]]:
    with redis_server() as redis_url, devtenant(tmp_path_factory.mktemp("devtenant")) as tenant:
        env = api_env(tenant, redis_url, AUTHORITY_CACHE_DIR=str(tmp_path_factory.mktemp("authority")))
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("REQUESTS_CA_BUNDLE", env["REQUESTS_CA_BUNDLE"])  # this process's API
            yield tenant, env


@pytest.fixture
def tenant(stack: tuple[DevTenantProcess, dict[str, str]]) -> Iterator[DevTenantProcess]:
    tenant = stack[0]
    tenant.reset_counters()
    yield tenant
    tenant.request("POST", "/_devtenant/config", json={"access_token_lifetime": None})
    tenant.request("DELETE", "/_devtenant/revoke")


@pytest.fixture
def env(stack: tuple[DevTenantProcess, dict[str, str]]) -> dict[str, str]:
    return stack[1]


def build_api(env: dict[str, str]) -> tuple[Flask, FlaskOBO]:
    """The API: a route per way of calling Graph as the user, one taking a handle, sign-out."""
    settings = Settings.from_env(env)
    app = Flask(__name__)
    obo = FlaskOBO(app, settings=settings)
    graph_base, graph_scopes = settings.graph_base_url, list(settings.graph_scopes)
    ca_bundle = env["REQUESTS_CA_BUNDLE"]

    @app.get("/sdk/me")
    @obo.require_scope()
    def sdk_me() -> dict[str, Any]:
        credential = obo.async_user_credential()  # made in the request: it keeps the user

        async def me() -> str | None:
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca_bundle)) as http:
                auth = AzureIdentityAuthenticationProvider(
                    credential, scopes=graph_scopes, allowed_hosts=[urlsplit(graph_base).hostname])
                # msgraph-sdk's own middleware options (its /me URL rewrite), on our client.
                adapter = GraphRequestAdapter(auth, client=GraphClientFactory.create_with_default_middleware(
                    client=http, options=graph_request_adapter.options))
                adapter.base_url = graph_base
                user = await GraphServiceClient(request_adapter=adapter).me.get()
                return user.display_name if user else None

        return {"displayName": asyncio.run(me())}  # an event loop per call: a sync view

    @app.get("/pipeline/me")
    @obo.require_scope()
    def pipeline_me() -> dict[str, Any]:
        policy = BearerTokenCredentialPolicy(obo.user_credential(), *graph_scopes)
        with PipelineClient(graph_base, policies=[RetryPolicy(retry_total=0), policy]) as client:
            response = client.send_request(HttpRequest("GET", f"{graph_base}/me"),
                                           connection_verify=ca_bundle)
            response.raise_for_status()
            return {"displayName": response.json()["displayName"]}

    @app.post("/jobs")
    @obo.require_scope()
    def start_job() -> dict[str, Any]:
        return {"handle": obo.background_handle()}

    @app.delete("/api/me/token-cache")
    @obo.require_scope()
    def sign_out() -> tuple[str, int]:
        obo.forget_user()
        return "", 204

    return app, obo


def call(app: Flask, method: str, path: str, token: str) -> Any:
    with app.test_client() as client:
        return client.open(path, method=method, headers={"Authorization": f"Bearer {token}"})


def run_job(env: dict[str, str], handle: str) -> dict[str, Any]:
    """The job in a process of its own (nothing in memory: Redis and Entra ID only)."""
    done = subprocess.run([sys.executable, "-c", JOB], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**env, "JOB_HANDLE": handle, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def token_calls(tenant: DevTenantProcess) -> dict[str, int]:
    return tenant.counters()["token"]


def data_commands(redis_url: str) -> int:
    stats = redis.Redis.from_url(redis_url).info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in DATA_COMMANDS)


# --- Azure SDK credentials ------------------------------------------------------------------
@pytest.mark.parametrize(("route", "user", "name"), [
    ("/sdk/me", "adele", "Adele Vance"),  # msgraph-sdk, async credential
    ("/pipeline/me", "megan", "Megan Bowen"),  # azure-core pipeline, sync credential
])
def test_an_sdk_with_the_user_credential_exchanges_once_for_21_requests(tenant, env, route, user, name):
    app, _ = build_api(env)
    token = tenant.tenant.api_token(user)
    assert call(app, "GET", route, token).get_json() == {"displayName": name}
    assert token_calls(tenant)["on_behalf_of"] == 1
    for _ in range(20):
        assert call(app, "GET", route, token).get_json() == {"displayName": name}
    calls = token_calls(tenant)
    assert (calls["on_behalf_of"], calls["refresh_token"]) == (1, 0)
    assert tenant.counters()["graph"]["/v1.0/me"] == 21
    # Another API process (a worker, an instance) serves the user from Redis: no exchange.
    other, _ = build_api(env)
    assert call(other, "GET", route, tenant.tenant.api_token(user)).get_json() == {"displayName": name}
    assert token_calls(tenant)["on_behalf_of"] == 1


def test_the_app_credential_serves_sdks_outside_a_request_with_one_client_credentials_call(tenant, env):
    """As a CLI command or a nightly job would: an app context, no request, no user."""
    app, obo = build_api(env)
    _, adele = tenant.tenant.find_user("adele")
    settings = Settings.from_env(env)
    graph_base, ca_bundle = settings.graph_base_url, env["REQUESTS_CA_BUNDLE"]
    app_scopes = [settings.downstream_apis["graph"].app_scopes[0]]

    def with_pipeline() -> str:  # a new client (and policy) each time: the cache is ours
        policy = BearerTokenCredentialPolicy(obo.app_credential(), *app_scopes)
        with PipelineClient(graph_base, policies=[RetryPolicy(retry_total=0), policy]) as client:
            response = client.send_request(HttpRequest("GET", f"{graph_base}/users/{adele.oid}"),
                                           connection_verify=ca_bundle)
            response.raise_for_status()
            return str(response.json()["displayName"])

    async def with_graph_sdk() -> str | None:
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca_bundle)) as http:
            auth = AzureIdentityAuthenticationProvider(
                obo.async_app_credential(), scopes=app_scopes, allowed_hosts=[urlsplit(graph_base).hostname])
            adapter = GraphRequestAdapter(auth, client=GraphClientFactory.create_with_default_middleware(
                client=http, options=graph_request_adapter.options))
            adapter.base_url = graph_base
            user = await GraphServiceClient(request_adapter=adapter).users.by_user_id(adele.oid).get()
            return user.display_name if user else None

    with app.app_context():
        assert with_pipeline() == "Adele Vance"
        for _ in range(10):
            assert with_pipeline() == "Adele Vance"
            assert asyncio.run(with_graph_sdk()) == "Adele Vance"
    calls = token_calls(tenant)
    assert (calls["client_credentials"], calls["on_behalf_of"]) == (1, 0)


def test_the_credential_is_refused_outside_a_request(env):
    app, obo = build_api(env)
    with app.app_context(), pytest.raises(RuntimeError, match="protected request"):
        obo.user_credential()


# --- background handles ---------------------------------------------------------------------
def test_a_job_hours_later_in_another_process_refreshes_without_an_exchange(tenant, env):
    # Tokens issued short-lived: when the job runs, the user's access token has aged out
    # as it would have two hours later; only the refresh token can renew it.
    tenant.request("POST", "/_devtenant/config", json={"access_token_lifetime": SHORT_LIFETIME})
    app, _ = build_api(env)
    handle = call(app, "POST", "/jobs", tenant.tenant.api_token("nestor")).get_json()["handle"]
    assert token_calls(tenant)["on_behalf_of"] == 1
    tenant.reset_counters()

    assert run_job(env, handle) == {"status": 200, "name": "Nestor Wilke"}
    calls = token_calls(tenant)
    assert (calls["on_behalf_of"], calls["refresh_token"]) == (0, 1)
    assert run_job(env, handle) == {"status": 200, "name": "Nestor Wilke"}  # the rotated refresh token
    assert token_calls(tenant)["on_behalf_of"] == 0


def test_the_handle_names_no_one(tenant, env):
    app, _ = build_api(env)
    handle = call(app, "POST", "/jobs", tenant.tenant.api_token("patti")).get_json()["handle"]
    directory, user = tenant.tenant.find_user("patti")
    raw = base64.urlsafe_b64decode(handle + "=" * (-len(handle) % 4))
    for secret in (user.oid, user.upn, directory.tenant_id, "Patti"):
        assert secret.lower().encode() not in raw.lower() and secret.lower() not in handle.lower()


def test_tampered_forged_or_edited_handles_are_refused_before_redis_or_entra(tenant, env):
    app, obo = build_api(env)
    redis_url = env["REDIS_URL"]
    handle = call(app, "POST", "/jobs", tenant.tenant.api_token("adele")).get_json()["handle"]
    directory, victim = tenant.tenant.find_user("nestor")
    edited = flip_bit(handle, 40)  # one bit of the ciphertext: an edit meant to name someone else
    resigned = flip_bit(handle, -1)  # one bit of the MAC
    # The same format sealed with someone else's key, naming another user.
    stranger = BackgroundHandles([Fernet.generate_key().decode()], env["AZURE_CLIENT_ID"])
    forged = stranger.issue(CachedUser(victim.oid, directory.tenant_id, "g"), "g" * 22)
    tenant.reset_counters()
    before = data_commands(redis_url)
    with app.app_context():
        for bad in (edited, resigned, forged, "", "not a handle", handle * 20):
            with pytest.raises(InvalidBackgroundHandle):
                obo.acquire_token(["https://graph.microsoft.com/.default"], on_behalf_of=bad)
            with pytest.raises(InvalidBackgroundHandle):
                obo.downstream("graph", on_behalf_of=bad)
    assert data_commands(redis_url) == before
    assert sum(v for k, v in token_calls(tenant).items() if k != "errors") == 0
    assert tenant.counters()["graph"]["/v1.0/me"] == 0
    assert run_job(env, edited) == {"error": "invalid_request",
                                    "kind": "InvalidBackgroundHandle", "status": 400}


def flip_bit(handle: str, index: int) -> str:
    """``handle`` with one bit of its bytes changed (editing its text could touch only
    base64's padding bits, which decode to the same bytes)."""
    raw = bytearray(base64.urlsafe_b64decode(handle))
    raw[index] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).decode()


def test_a_sign_out_ends_the_users_handles_even_after_signing_in_again(tenant, env):
    app, obo = build_api(env)
    token = tenant.tenant.api_token("alex", mfa=True)
    handle = call(app, "POST", "/jobs", token).get_json()["handle"]
    assert run_job(env, handle)["status"] == 200
    assert call(app, "DELETE", "/api/me/token-cache", token).status_code == 204
    assert run_job(env, handle) == {"error": "interaction_required", "kind": "BackgroundHandleRevoked",
                                    "status": 401}
    # Signed in again (a new exchange, a new entry): the old handle stays dead, a new one works.
    fresh = call(app, "POST", "/jobs", tenant.tenant.api_token("alex", mfa=True)).get_json()["handle"]
    assert run_job(env, handle)["kind"] == "BackgroundHandleRevoked"
    with app.app_context(), pytest.raises(BackgroundHandleRevoked):
        obo.acquire_token(["https://graph.microsoft.com/.default"], on_behalf_of=handle)
    assert run_job(env, fresh) == {"status": 200, "name": "Alex Wilber"}


def fresh_handle(app: Flask, tenant: DevTenantProcess, user: str) -> str:
    """A handle on ``user`` signed out first: their entry starts from a new exchange."""
    token = tenant.tenant.api_token(user)
    assert call(app, "DELETE", "/api/me/token-cache", token).status_code == 204
    return str(call(app, "POST", "/jobs", token).get_json()["handle"])


def test_a_revoked_refresh_token_is_an_error_the_job_can_record(tenant, env):
    tenant.request("POST", "/_devtenant/config", json={"access_token_lifetime": SHORT_LIFETIME})
    app, obo = build_api(env)
    handle = fresh_handle(app, tenant, "megan")
    assert tenant.request("POST", "/_devtenant/revoke", json={"user": "megan"}).ok
    tenant.reset_counters()
    assert run_job(env, handle) == {"error": "interaction_required", "kind": "RefreshTokenExpired",
                                    "status": 401}
    calls = token_calls(tenant)
    assert calls["on_behalf_of"] == 0 and calls["refresh_token"] >= 1  # refused by Entra ID
    with app.app_context(), pytest.raises(RefreshTokenExpired):
        obo.downstream("graph", on_behalf_of=handle).get("/me")
    assert tenant.counters()["graph"]["/v1.0/me"] == 0


def test_graphs_claims_challenge_to_a_revoked_users_job_ends_it(tenant, env):
    """A long-lived CAE token still cached: Graph refuses it with a claims challenge once the
    user's sessions are revoked; the job's answer is a refresh with those claims (it has no
    assertion to exchange), which Entra ID refuses too."""
    app, _ = build_api(env)
    handle = fresh_handle(app, tenant, "patti")
    assert run_job(env, handle)["status"] == 200  # the cached token serves, no refresh
    assert tenant.request("POST", "/_devtenant/revoke", json={"user": "patti"}).ok
    tenant.reset_counters()
    assert run_job(env, handle) == {"error": "interaction_required", "kind": "RefreshTokenExpired",
                                    "status": 401}
    counters = tenant.counters()
    assert counters["graph"]["/v1.0/me"] == 1 and counters["graph_errors"] == {"401": 1}
    assert counters["token"]["on_behalf_of"] == 0 and counters["token"]["refresh_token"] >= 1
