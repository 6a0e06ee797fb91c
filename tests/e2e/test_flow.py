"""The whole flow with real processes on loopback: the dev tenant over HTTPS, the API
under gunicorn (two workers), a real redis-server; msal unpatched, real TLS."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import redis
import requests

from tests.support.servers import redis_server
from tests.support.stack import DevTenantProcess, GunicornProcess, api_env, devtenant, gunicorn

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[DevTenantProcess, GunicornProcess, str]]:
    with (
        redis_server() as redis_url,
        devtenant(tmp_path_factory.mktemp("devtenant")) as tenant,
        gunicorn(api_env(tenant, redis_url), workers=2) as api,
    ):
        yield tenant, api, redis_url


@pytest.fixture
def tenant(stack) -> DevTenantProcess:
    stack[0].reset_counters()
    return stack[0]


@pytest.fixture
def api(stack) -> GunicornProcess:
    return stack[1]


def get(api: GunicornProcess, path: str, token: str) -> requests.Response:
    return requests.get(api.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def test_first_call_exchanges_once_and_later_calls_never(tenant, api):
    token = tenant.tenant.api_token("adele")
    first = get(api, "/api/me", token)
    assert first.status_code == 200
    assert first.json()["displayName"] == "Adele Vance"
    assert tenant.obo_calls() == 1
    for _ in range(6):  # two workers: each sees the cache through Redis
        assert get(api, "/api/me/manager", token).json()["displayName"] == "Nestor Wilke"
    assert tenant.obo_calls() == 1
    assert tenant.counters()["token"]["refresh_token"] == 0


def test_a_new_spa_token_for_the_same_user_needs_no_exchange(tenant, api):
    assert get(api, "/api/me", tenant.tenant.api_token("nestor")).status_code == 200
    for _ in range(3):
        assert get(api, "/api/me", tenant.tenant.api_token("nestor")).status_code == 200
    assert tenant.obo_calls() == 1


def test_short_scope_form_still_hits_the_cache(tenant, api):
    switch = requests.post(f"{tenant.url}/_devtenant/config", json={"short_scopes": True},
                           verify=str(tenant.state_dir / "ca-bundle.pem"), timeout=5)
    assert switch.json()["short_scopes"] is True
    try:
        for _ in range(4):
            assert get(api, "/api/me", tenant.tenant.api_token("megan")).status_code == 200
    finally:
        requests.post(f"{tenant.url}/_devtenant/config", json={"short_scopes": False},
                      verify=str(tenant.state_dir / "ca-bundle.pem"), timeout=5)
    counts = tenant.counters()["token"]
    assert counts["on_behalf_of"] == 1
    assert counts["refresh_token"] == 0


def test_mfa_user_gets_the_claims_challenge_then_succeeds_with_mfa(tenant, api):
    response = get(api, "/api/me", tenant.tenant.api_token("alex"))
    assert response.status_code == 401
    assert response.json()["error"] == "insufficient_claims"
    challenge = response.headers["WWW-Authenticate"]
    assert 'error="insufficient_claims"' in challenge
    claims = json.loads(base64.b64decode(challenge.split('claims="')[1].split('"')[0]))
    assert claims["access_token"]["capolids"]["essential"] is True
    retried = get(api, "/api/me", tenant.tenant.api_token("alex", mfa=True))
    assert retried.status_code == 200
    assert retried.json()["displayName"] == "Alex Wilber"


def test_user_without_consent_gets_403(tenant, api):
    response = get(api, "/api/me", tenant.tenant.api_token("lynne"))
    assert response.status_code == 403
    assert response.json()["error"] == "consent_required"


def test_user_without_manager_gets_404(tenant, api):
    response = get(api, "/api/me/manager", tenant.tenant.api_token("patti"))
    assert response.status_code == 404
    assert response.json()["error"] == "manager_not_found"


def test_expired_spa_token_is_401(tenant, api):
    response = get(api, "/api/whoami", tenant.tenant.api_token("adele", expired=True))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert tenant.obo_calls() == 0


def test_app_only_tokens_need_the_app_role_on_whoami_and_never_reach_graph(tenant, api):
    """The dev tenant's env sets API_APP_ROLE=access_as_application (see test_app_roles.py)."""
    assert get(api, "/api/whoami", tenant.tenant.app_only_token()).status_code == 200
    for path, token in (("/api/whoami", tenant.tenant.app_only_token(roles=[])),
                        ("/api/me", tenant.tenant.app_only_token())):
        response = get(api, path, token)
        assert response.status_code == 403
        assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    assert tenant.counters()["token"]["on_behalf_of"] == 0


def test_after_a_signing_key_rotation_new_and_old_tokens_validate(tenant, api):
    old = tenant.tenant.api_token("adele")
    old_kid = json.loads(base64.urlsafe_b64decode(old.split(".")[0] + "=="))["kid"]
    tenant.tenant.rotate_keys()
    new = tenant.tenant.api_token("adele")
    new_kid = json.loads(base64.urlsafe_b64decode(new.split(".")[0] + "=="))["kid"]
    assert new_kid != old_kid
    for _ in range(4):  # both workers learn the new key (one refetch each)
        assert get(api, "/api/whoami", new).status_code == 200
    assert get(api, "/api/whoami", old).status_code == 200  # still published, still valid


def test_redis_holds_only_ciphertext_under_hashed_keys(stack, tenant, api):
    tokens = [tenant.tenant.api_token("adele"), tenant.tenant.api_token("megan")]
    for token in tokens:
        assert get(api, "/api/me", token).status_code == 200
    client = redis.Redis.from_url(stack[2])
    keys = client.keys("*")
    assert keys
    oids = [get(api, "/api/whoami", t).json()["oid"] for t in tokens]
    for key in keys:
        assert key.startswith(b"flask-obo:cache:{")
        value = client.get(key)
        for needle in [*tokens, "eyJ", "adele", "megan", *oids, "refresh", "secret"]:
            assert needle.encode() not in key
            assert needle.encode() not in value


def test_logs_hold_no_token(tenant, api):
    tokens = [tenant.tenant.api_token("adele"), tenant.tenant.api_token("alex")]
    for token in tokens:
        get(api, "/api/me", token)
    get(api, "/api/me", "not-a-jwt")
    log = api.log.read_text()
    assert "on-behalf-of exchange for partition" in log or "GET /api/me" in log
    for token in tokens:
        assert token not in log
        assert token.split(".")[2] not in log  # not even the signature
    assert "eyJ" not in log
    assert "Dev8Q~" not in log  # the client secret


def test_certificate_credential_with_in_process_cache(stack, tenant):
    env = api_env(tenant)
    env.pop("AZURE_CLIENT_SECRET")
    env["AZURE_CLIENT_CERTIFICATE_PATH"] = str(tenant.tenant.client_certificate_path)
    with gunicorn(env, workers=1) as cert_api:
        token = tenant.tenant.api_token("nestor")
        for _ in range(3):
            response = get(cert_api, "/api/me/manager", token)
            assert response.status_code == 200
            assert response.json()["displayName"] == "Patti Fernandez"
        assert "REDIS_URL is not set" in cert_api.log.read_text()
    assert tenant.obo_calls() == 1
