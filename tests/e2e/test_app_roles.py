"""Daemons calling the API, and the API calling Graph as itself, with real processes on
loopback: the dev tenant over HTTPS behind a fault proxy (its Entra ID endpoints; Graph is
reached directly), two API instances under gunicorn (two workers each) sharing one real
redis-server; msal unpatched. Token-endpoint calls are counted by the dev tenant.

The API is the reference API plus the daemon routes of tests/support/daemon_api.py.
Daemons get their tokens from the dev tenant by client credentials, as a real one does:
``daemon`` is assigned the API's app role, ``unassigned_daemon`` none.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import msal
import pytest
import redis
import requests
from cryptography.fernet import Fernet

from devtenant import (
    API_APP_ID_URI,
    API_APP_ROLE,
    DAEMON_CLIENT_ID,
    DAEMON_CLIENT_SECRET,
    TASKS_API_RESOURCE,
    TENANT_ID,
    UNASSIGNED_DAEMON_CLIENT_ID,
    UNASSIGNED_DAEMON_CLIENT_SECRET,
)
from tests.support.faults import FaultProxy
from tests.support.servers import RedisProcess, redis_process, wait_until
from tests.support.stack import DevTenantProcess, GunicornProcess, api_env, devtenant, gunicorn

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

DAEMON_API = "tests.support.daemon_api:app"
ADELE_OID = "b7e3f1a2-4c5d-4e6f-8a9b-0c1d2e3f4a51"
REQUESTS = 50
RENEWAL_DELAY = 3.0  # how long the dev tenant takes to issue a token while a renewal is due
SHORT_LIFETIME = 240  # an app token already 4 minutes from its expiry


@dataclass
class Stack:
    tenant: DevTenantProcess
    proxy: FaultProxy
    redis: RedisProcess
    apis: tuple[GunicornProcess, GunicornProcess]
    daemon_token: str
    unassigned_token: str

    def client_credentials_calls(self) -> int:
        return int(self.tenant.counters()["token"].get("client_credentials", 0))

    def token_calls(self) -> int:
        counts = self.tenant.counters()["token"]
        return sum(int(n) for kind, n in counts.items() if kind != "errors")

    def app_tokens(self, **knobs: object) -> None:
        response = self.tenant.request("POST", "/_devtenant/app-tokens", json={"lifetime": None, **knobs})
        response.raise_for_status()


def daemon_token(tenant: DevTenantProcess, client_id: str, secret: str) -> str:
    """A daemon's app-only token for the API, by client credentials (msal, as a daemon)."""
    session = tenant.session()
    session.trust_env = False  # the dev tenant's CA, whatever REQUESTS_CA_BUNDLE says
    client = msal.ConfidentialClientApplication(
        client_id, client_credential=secret, authority=tenant.tenant.authority,
        http_client=session, instance_discovery=False)
    result = client.acquire_token_for_client([f"{API_APP_ID_URI}/.default"])
    assert "access_token" in result, result
    return str(result["access_token"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("app-roles")
    with (
        redis_process() as server,
        FaultProxy(("127.0.0.1", 0)) as proxy,
        devtenant(tmp / "devtenant", public_url=proxy.url) as tenant,
    ):
        proxy.target = ("127.0.0.1", int(tenant.url.rsplit(":", 1)[1]))
        env = api_env(tenant, server.url, ENTRA_CONNECT_TIMEOUT_SECONDS="1",
                      ENTRA_READ_TIMEOUT_SECONDS="4", TOKEN_ACQUISITION_TIMEOUT_SECONDS="6",
                      TOKEN_CACHE_KEYS=Fernet.generate_key().decode())  # one key for both instances
        with gunicorn(env, workers=2, target=DAEMON_API) as first, \
                gunicorn(env, workers=2, target=DAEMON_API) as second:
            yield Stack(tenant, proxy, server, (first, second),
                        daemon_token(tenant, DAEMON_CLIENT_ID, DAEMON_CLIENT_SECRET),
                        daemon_token(tenant, UNASSIGNED_DAEMON_CLIENT_ID, UNASSIGNED_DAEMON_CLIENT_SECRET))


@pytest.fixture
def fresh(stack: Stack) -> Iterator[Stack]:
    stack.proxy.pass_through()
    stack.app_tokens()
    stack.tenant.reset_counters()
    yield stack
    stack.proxy.pass_through()
    stack.app_tokens()


def get(api: GunicornProcess, path: str, token: str, **params: str) -> requests.Response:
    return requests.get(api.url + path, params=params, headers={"Authorization": f"Bearer {token}"},
                        timeout=30)


def timed(api: GunicornProcess, path: str, token: str, **params: str) -> tuple[requests.Response, float]:
    started = time.perf_counter()
    response = get(api, path, token, **params)
    return response, time.perf_counter() - started


# --- app roles ---------------------------------------------------------------------------------


def test_a_daemon_with_the_app_role_gets_whoami_and_one_without_gets_403(fresh: Stack) -> None:
    api = fresh.apis[0]
    response = get(api, "/api/whoami", fresh.daemon_token)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["app_id"] == DAEMON_CLIENT_ID and body["roles"] == [API_APP_ROLE]
    assert body["tid"] == TENANT_ID and body["scp"] is None and body["name"] is None
    refused = get(api, "/api/whoami", fresh.unassigned_token)
    assert refused.status_code == 403 and refused.json()["error"] == "insufficient_scope"
    assert API_APP_ROLE in refused.json()["error_description"]
    user = get(api, "/api/whoami", fresh.tenant.tenant.api_token("adele"))
    assert user.status_code == 200 and user.json()["roles"] is None
    assert fresh.token_calls() == 0


def test_a_users_token_on_an_app_role_route_is_403(fresh: Stack) -> None:
    response = get(fresh.apis[1], f"/daemon/users/{ADELE_OID}", fresh.tenant.tenant.api_token("adele"))
    assert response.status_code == 403 and response.json()["error"] == "insufficient_scope"
    assert fresh.token_calls() == 0


def test_an_app_token_on_an_obo_route_is_403_with_no_token_request(fresh: Stack) -> None:
    for api in fresh.apis:
        reference = get(api, "/api/me", fresh.daemon_token)  # users only: the protector refuses
        assert reference.status_code == 403 and reference.json()["error"] == "insufficient_scope"
        admitted = get(api, "/daemon/me", fresh.daemon_token)  # admitted, then refused at the OBO
        assert admitted.status_code == 403 and admitted.json()["error"] == "user_token_required"
        assert "on behalf of a signed-in user" in admitted.json()["error_description"]
        assert 'scope="user_impersonation"' in admitted.headers["WWW-Authenticate"]
    assert fresh.token_calls() == 0


# --- app tokens --------------------------------------------------------------------------------


def test_fifty_requests_on_two_instances_cost_one_client_credentials_call(fresh: Stack) -> None:
    """Cold everywhere: 4 workers race for Graph's app token; one asks Entra ID."""
    calls = [(fresh.apis[i % 2], f"/daemon/users/{ADELE_OID}") for i in range(REQUESTS)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda call: get(call[0], call[1], fresh.daemon_token), calls))
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: REQUESTS}, [r.text for r in responses if r.status_code != 200][:3]
    assert {r.json()["displayName"] for r in responses} == {"Adele Vance"}
    pids = {(api.url, r.json()["pid"]) for (api, _), r in zip(calls, responses, strict=True)}
    print(f"\n{REQUESTS} requests served by {len(pids)} workers of 2 instances; "
          f"client-credentials calls: {fresh.client_credentials_calls()}")
    assert len({url for url, _ in pids}) == 2 and len(pids) >= 3
    assert fresh.client_credentials_calls() == 1
    assert fresh.tenant.obo_calls() == 0
    # Redis holds it sealed, under a hashed key: never a token nor a client id in sight.
    client = fresh.redis.client()
    for key in client.keys("*"):
        assert key.startswith(b"flask-obo:cache:{") or key.startswith(b"flask-obo:lock:{"), key
        value = client.get(key) or b""
        assert b"eyJ" not in value and DAEMON_CLIENT_ID.encode() not in key + value


def test_a_token_four_minutes_from_expiry_is_renewed_ahead_and_nobody_waits(fresh: Stack) -> None:
    """The Tasks API's app token arrives 4 minutes from its expiry (due at once). Requests
    on both instances keep being served it at warm speed while one background renewal,
    slowed to 2 s at the dev tenant, replaces it; then everybody has the new one."""
    fresh.app_tokens(lifetime=SHORT_LIFETIME)
    first, _ = timed(fresh.apis[0], "/daemon/app-token", fresh.daemon_token, resource=TASKS_API_RESOURCE)
    assert first.status_code == 200, first.text
    old = first.json()
    assert old["exp"] - time.time() <= SHORT_LIFETIME
    # Warm baseline, same run: requests served with a token already in hand (Graph's, once
    # every worker has it: the first calls may acquire it).
    for i in range(8):
        assert get(fresh.apis[i % 2], f"/daemon/users/{ADELE_OID}", fresh.daemon_token).status_code == 200
    baseline = [timed(fresh.apis[i % 2], f"/daemon/users/{ADELE_OID}", fresh.daemon_token)[1]
                for i in range(8)]
    fresh.app_tokens(delay=RENEWAL_DELAY)  # an hour-long token from now on, after 2 s
    fresh.tenant.reset_counters()
    served: list[tuple[dict, float]] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        response, latency = timed(fresh.apis[len(served) % 2], "/daemon/app-token", fresh.daemon_token,
                                  resource=TASKS_API_RESOURCE)
        assert response.status_code == 200, response.text
        served.append((response.json(), latency))
        if len(served) >= 12 and all(s["digest"] != old["digest"] for s, _ in served[-4:]):
            break
    renewals = fresh.client_credentials_calls()
    slowest = max(latency for _, latency in served)
    print(f"\nrenewal ahead: {len(served)} requests, {sum(s['digest'] == old['digest'] for s, _ in served)} "
          f"served the old token; slowest {slowest * 1000:.0f} ms (baseline max "
          f"{max(baseline) * 1000:.0f} ms, Entra ID took {RENEWAL_DELAY} s); renewals: {renewals}")
    assert served[0][0]["digest"] == old["digest"]  # the request that found it due got it at once
    assert all(s["digest"] != old["digest"] for s, _ in served[-4:]), "not renewed within 20 s"
    assert renewals == 1
    assert slowest < max(baseline) + RENEWAL_DELAY / 2, "a request waited on the renewal"
    new = served[-1][0]
    assert new["exp"] - time.time() > 3000


def test_unexpired_app_tokens_keep_serving_while_entra_and_then_redis_are_down(fresh: Stack) -> None:
    # Warm: Graph's token (an hour) and the API's own resource's (4 minutes: due all along).
    fresh.app_tokens(lifetime=SHORT_LIFETIME)
    for api in fresh.apis:
        assert get(api, f"/daemon/users/{ADELE_OID}", fresh.daemon_token).status_code == 200
        assert get(api, "/daemon/app-token", fresh.daemon_token, resource=API_APP_ID_URI).status_code == 200
    fresh.proxy.refuse()
    try:
        outage: Counter[int] = Counter()
        for i in range(40):
            api, token = fresh.apis[i % 2], fresh.daemon_token
            outage[get(api, f"/daemon/users/{ADELE_OID}", token).status_code] += 1
            outage[get(api, "/daemon/app-token", token, resource=API_APP_ID_URI).status_code] += 1
        assert outage == {200: 80}, outage
        fresh.redis.kill()  # and now Redis too: each worker serves what it holds
        try:
            both: Counter[int] = Counter()
            for i in range(20):
                api = fresh.apis[i % 2]
                both[get(api, f"/daemon/users/{ADELE_OID}", fresh.daemon_token).status_code] += 1
            # A worker that never held the token has nowhere to get one: 503, never a 500.
            assert set(both) <= {200, 503} and both[200] >= 10, both
            print(f"\nEntra ID down: {dict(outage)}; Entra ID and Redis down: {dict(both)}")
        finally:
            fresh.redis.start()
    finally:
        fresh.proxy.pass_through()
    wait_until(lambda: get(fresh.apis[0], f"/daemon/users/{ADELE_OID}", fresh.daemon_token).ok,
               what="the API after the outage")
    assert redis.Redis.from_url(fresh.redis.url).ping()
