"""Issue 10, identity breadth, end to end: the API under gunicorn with a real redis-server
against the dev tenant over HTTPS, msal unpatched, one gunicorn per credential or
tenancy mode.

* the API's credential: client secret, certificate (rotated under load), a federated
  token file (rotated; expired, wrong subject, wrong audience), a managed identity
  (system- and user-assigned) as federated credential;
* v1 access tokens; a multi-tenant API (organizations + AZURE_ALLOWED_TENANTS);
* Continuous Access Evaluation: Graph's claims challenge, and one the SPA must answer.

How the API answers Entra refusing its own credential (``invalid_client``): 502
``token_acquisition_failed``, logged with the AADSTS code, never 500, never sticky.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import requests

from devtenant import (
    API_CLIENT_ID,
    MANAGED_IDENTITY_CLIENT_ID,
    SECOND_TENANT_ID,
    TENANT_ID,
    USER_ASSIGNED_IDENTITY_CLIENT_ID,
    DevTenant,
    pki,
)
from flask_obo.token_cache import partition_key
from tests.support.servers import redis_server, wait_until
from tests.support.stack import DevTenantProcess, GunicornProcess, api_env, devtenant, gunicorn

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CREDENTIAL_VARIABLES = ("AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH",
                        "AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ASSERTION",
                        "AZURE_MANAGED_IDENTITY_CLIENT_ID", "IDENTITY_ENDPOINT", "IDENTITY_HEADER")


@pytest.fixture(scope="module")
def infra(tmp_path_factory) -> Iterator[tuple[DevTenantProcess, str]]:
    with redis_server() as redis_url, devtenant(tmp_path_factory.mktemp("devtenant")) as tenant:
        yield tenant, redis_url


@pytest.fixture
def tenant(infra) -> Iterator[DevTenantProcess]:
    infra[0].reset_counters()
    yield infra[0]
    infra[0].tenant.clear_revocation()


@contextmanager
def api(infra: tuple[DevTenantProcess, str], tmp_path: Path, credential: dict[str, str] | None = None,
        workers: int = 1, **extra: str) -> Iterator[GunicornProcess]:
    """The API with ``credential`` (the secret if None) and ``extra`` settings."""
    tenant, redis_url = infra
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = api_env(tenant, redis_url, AUTHORITY_CACHE_DIR=str(tmp_path / "authority"), **extra)
    if credential is not None:
        for name in CREDENTIAL_VARIABLES:
            env.pop(name, None)
        env.update(credential)
    with gunicorn(env, workers=workers) as process:
        yield process


@pytest.fixture(scope="module")
def secret_api(infra, tmp_path_factory) -> Iterator[GunicornProcess]:
    with api(infra, tmp_path_factory.mktemp("secret"), workers=2) as process:
        yield process


def get(api: GunicornProcess, path: str, token: str) -> requests.Response:
    return requests.get(api.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def fresh_me(api: GunicornProcess, token: str) -> requests.Response:
    """/api/me after forgetting the user's cached tokens: always an OBO exchange."""
    forgot = requests.delete(api.url + "/api/me/token-cache",
                             headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert forgot.status_code == 204, forgot.text
    return get(api, "/api/me", token)


def claims_of(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def thumbprint(pem: bytes) -> str:
    return pki.thumbprint(pki.load_pem_certs(pem)[0], "sha256")


# --- 1. the API's credential ----------------------------------------------------------------------

def test_obo_with_the_client_secret(tenant, secret_api):
    response = get(secret_api, "/api/me", tenant.tenant.api_token("adele"))
    assert response.status_code == 200 and response.json()["displayName"] == "Adele Vance"
    counters = tenant.counters()
    assert counters["token"]["on_behalf_of"] == 1 and counters["token"]["errors"] == 0
    assert counters["certificates"] == {} and counters["managed_identity"] == {}


def test_obo_with_a_certificate(infra, tenant, tmp_path):
    pem = tenant.tenant.client_certificate_path.read_bytes()
    with api(infra, tmp_path, {"AZURE_CLIENT_CERTIFICATE_PATH": str(tenant.tenant.client_certificate_path)}
             ) as cert_api:
        token = tenant.tenant.api_token("nestor")
        for _ in range(3):
            response = get(cert_api, "/api/me/manager", token)
            assert response.status_code == 200 and response.json()["displayName"] == "Patti Fernandez"
    assert tenant.obo_calls() == 1
    assert tenant.counters()["certificates"] == {thumbprint(pem): 1}  # the assertion it signed


@pytest.fixture(scope="module")
def federated(infra, tmp_path_factory) -> Iterator[tuple[GunicornProcess, Path]]:
    tmp = tmp_path_factory.mktemp("federated")
    token_file = infra[0].tenant.write_federated_token(tmp / "azure-identity-token")
    with api(infra, tmp, {"AZURE_FEDERATED_TOKEN_FILE": str(token_file)}) as process:
        yield process, token_file


def test_obo_with_a_federated_token_file_read_again_when_rotated(tenant, federated):
    federated_api, token_file = federated
    token = tenant.tenant.api_token("adele")
    assert fresh_me(federated_api, token).status_code == 200
    first = token_file.read_text()
    tenant.tenant.write_federated_token(token_file)  # the kubelet's refresh: a new token
    assert token_file.read_text() != first
    response = fresh_me(federated_api, token)
    assert response.status_code == 200 and response.json()["displayName"] == "Adele Vance"
    counters = tenant.counters()
    assert counters["token"]["on_behalf_of"] == 2 and counters["token"]["errors"] == 0


@pytest.mark.parametrize(("bad", "code"), [
    ({"subject": "system:serviceaccount:default:someone-else"}, 700213),
    ({"audience": "api://not-the-token-exchange"}, 700212),
    ({"expired": True}, 700024),
], ids=["wrong-subject", "wrong-audience", "expired"])
def test_a_refused_federated_token_is_502_until_the_file_is_fixed(tenant, federated, bad, code):
    federated_api, token_file = federated
    token = tenant.tenant.api_token("megan")
    log_before = len(federated_api.log.read_text())
    tenant.tenant.write_federated_token(token_file, **bad)
    try:
        for _ in range(2):  # the same answer each time: never a 500
            refused = fresh_me(federated_api, token)
            assert refused.status_code == 502, refused.text
            assert refused.json()["error"] == "token_acquisition_failed"
        counters = tenant.counters()
        assert counters["token_errors"] == {"invalid_client": counters["token"]["errors"]}
        # One exchange per request: the file still holds the refused token, so no retry.
        assert counters["token"]["on_behalf_of"] == counters["token"]["errors"] == 2
        assert f"invalid_client [{code}]" in federated_api.log.read_text()[log_before:]
    finally:
        tenant.tenant.write_federated_token(token_file)  # the kubelet writes a good one again
    assert fresh_me(federated_api, token).status_code == 200  # nothing sticks


@pytest.mark.parametrize("user_assigned", [False, True], ids=["system-assigned", "user-assigned"])
def test_obo_with_a_managed_identity_as_federated_credential(infra, tenant, tmp_path, user_assigned):
    credential = {"AZURE_CLIENT_ASSERTION": "managed_identity",
                  **tenant.tenant.managed_identity_env(user_assigned=user_assigned)}
    assert tenant.tenant.env(managed_identity=True, user_assigned=user_assigned).items() >= credential.items()
    with api(infra, tmp_path, credential) as mi_api:
        for user, name in (("adele", "Adele Vance"), ("nestor", "Nestor Wilke")):
            response = get(mi_api, "/api/me", tenant.tenant.api_token(user))
            assert response.status_code == 200 and response.json()["displayName"] == name
    counters = tenant.counters()
    assert counters["token"]["on_behalf_of"] == 2 and counters["token"]["errors"] == 0
    identity = USER_ASSIGNED_IDENTITY_CLIENT_ID if user_assigned else MANAGED_IDENTITY_CLIENT_ID
    assert counters["managed_identity"] == {identity: 1}  # msal keeps its token for both OBOs


# --- 3. v1 access tokens ----------------------------------------------------------------------------

def test_v1_tokens_are_accepted_and_exchanged(tenant, secret_api):
    token = tenant.tenant.api_token("patti", v1=True)
    claims = claims_of(token)
    assert claims["ver"] == "1.0" and claims["iss"] == f"{tenant.tenant.v1_issuer_host}/{TENANT_ID}/"
    assert claims["aud"] == f"api://{API_CLIENT_ID}"
    whoami = get(secret_api, "/api/whoami", token)
    assert whoami.status_code == 200 and whoami.json()["tid"] == TENANT_ID
    me = get(secret_api, "/api/me", token)  # OBO with the v1 token as the assertion
    assert me.status_code == 200 and me.json()["displayName"] == "Patti Fernandez"
    assert tenant.obo_calls() == 1


def test_a_v1_token_of_another_issuer_host_is_401(tenant, secret_api):
    forged_host = DevTenant(tenant.state_dir, "https://sts.elsewhere.example")  # same keys
    token = forged_host.api_token("patti", v1=True)
    assert claims_of(token)["iss"] == f"https://sts.elsewhere.example/sts/{TENANT_ID}/"
    for path in ("/api/whoami", "/api/me"):
        response = get(secret_api, path, token)
        assert response.status_code == 401 and response.json()["error"] == "invalid_token"
    assert tenant.obo_calls() == 0


# --- 4. multi-tenant --------------------------------------------------------------------------------

def test_multi_tenant_api_exchanges_in_each_users_tenant(infra, tenant, tmp_path):
    allowed = f"{TENANT_ID},{SECOND_TENANT_ID}"
    home_token = tenant.tenant.api_token("megan", tenant=TENANT_ID)
    guest_token = tenant.tenant.api_token("megan", tenant=SECOND_TENANT_ID)
    with api(infra, tmp_path, AZURE_TENANT_ID="organizations", AZURE_ALLOWED_TENANTS=allowed) as multi:
        home = get(multi, "/api/me/manager", home_token)
        assert home.status_code == 200 and home.json()["displayName"] == "Patti Fernandez"
        other = get(multi, "/api/me/manager", guest_token)  # Contoso's directory, not ours
        assert other.status_code == 200 and other.json()["displayName"] == "Isaiah Langer"
        assert get(multi, "/api/me", guest_token).json()["displayName"] == "Megan Bowen"
        whoami = get(multi, "/api/whoami", guest_token).json()
        assert whoami["tid"] == SECOND_TENANT_ID
        counters = tenant.counters()
        # One OBO each, both accepted: an assertion exchanged in the wrong tenant is AADSTS50020.
        assert counters["token"]["on_behalf_of"] == 2 and counters["token"]["errors"] == 0
        partitions = {partition_key(claims_of(t)["oid"], claims_of(t)["tid"])
                      for t in (home_token, guest_token)}
        assert len(partitions) == 2
        stored = redis.Redis.from_url(infra[1])
        for partition in partitions:
            assert stored.exists(f"flask-obo:cache:{{{partition}}}")


def test_only_allowed_tenants_may_call(infra, tenant, tmp_path):
    home_token = tenant.tenant.api_token("adele")
    guest_token = tenant.tenant.api_token("isaiah", tenant=SECOND_TENANT_ID)
    with api(infra, tmp_path / "home", AZURE_TENANT_ID="organizations",
             AZURE_ALLOWED_TENANTS=TENANT_ID) as home:
        assert get(home, "/api/whoami", home_token).status_code == 200
        for path in ("/api/whoami", "/api/me"):
            refused = get(home, path, guest_token)
            assert refused.status_code == 401 and refused.json()["error"] == "invalid_token"
    assert tenant.obo_calls() == 0
    with api(infra, tmp_path / "any", AZURE_TENANT_ID="organizations", AZURE_ALLOWED_TENANTS="*") as anyone:
        assert get(anyone, "/api/me", home_token).json()["displayName"] == "Adele Vance"
        assert get(anyone, "/api/me", guest_token).json()["displayName"] == "Isaiah Langer"


# --- 5. Continuous Access Evaluation ------------------------------------------------------------------

def test_cae_revocation_then_required_sign_in(tenant, secret_api):
    spa_token = tenant.tenant.api_token("adele")
    assert get(secret_api, "/api/me", spa_token).status_code == 200  # a cp1 Graph token cached
    tenant.tenant.revoke("adele")
    tenant.reset_counters()
    response = get(secret_api, "/api/me", spa_token)  # Graph: 401 insufficient_claims
    assert response.status_code == 200 and response.json()["displayName"] == "Adele Vance"
    counters = tenant.counters()
    assert counters["graph_errors"] == {"401": 1}
    assert counters["token"]["on_behalf_of"] == 1 and counters["token"]["errors"] == 0
    assert get(secret_api, "/api/me", spa_token).status_code == 200  # the new token is cached
    assert tenant.obo_calls() == 1

    revocation = tenant.tenant.revoke("adele", require_sign_in=True)
    challenged = get(secret_api, "/api/me", spa_token)
    assert challenged.status_code == 401 and challenged.json()["error"] == "insufficient_claims"
    header = challenged.headers["WWW-Authenticate"]
    assert 'error="insufficient_claims"' in header
    claims = json.loads(base64.b64decode(header.split('claims="')[1].split('"')[0]))
    assert claims == {"access_token": {"nbf": {"essential": True, "value": str(revocation.at)}}}
    assert tenant.counters()["token_errors"] == {"interaction_required": 1}

    new_spa_token = tenant.tenant.api_token("adele")  # the SPA signed in again with the claims
    response = get(secret_api, "/api/me", new_spa_token)
    assert response.status_code == 200 and response.json()["displayName"] == "Adele Vance"
    assert get(secret_api, "/api/me/manager", new_spa_token).json()["displayName"] == "Nestor Wilke"


def test_a_refused_certificate_is_reloaded_once_and_the_exchange_retried(infra, tenant, tmp_path):
    """Entra refuses the certificate (AADSTS700027: no longer registered) although the file
    looked unchanged (rewritten in place: same inode, size and mtime): the API reads the
    file again and retries the exchange once, with the new certificate."""
    cert_path = tmp_path / "api-client.pem"
    old_pem = tenant.tenant.client_certificate_path.read_bytes()
    cert_path.write_bytes(old_pem)
    key = pki.new_rsa_key()
    cert = pki.make_client_cert(key, "flask-obo API (rewritten in place)")
    new_pem = pki.key_pem(key) + pki.cert_pem(cert)
    size = max(len(old_pem), len(new_pem))
    cert_path.write_bytes(old_pem.ljust(size, b"\n"))
    registry = f"/_devtenant/apps/{API_CLIENT_ID}/certificates"
    with api(infra, tmp_path, {"AZURE_CLIENT_CERTIFICATE_PATH": str(cert_path)}) as cert_api:
        assert get(cert_api, "/api/me", tenant.tenant.api_token("adele")).status_code == 200
        stat = cert_path.stat()
        assert tenant.request("POST", registry, data=pki.cert_pem(cert)).status_code == 201
        with open(cert_path, "r+b") as file:  # in place: the same inode
            file.write(new_pem.ljust(size, b"\n"))
        os.utime(cert_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        now = cert_path.stat()  # what the API compares looks unchanged
        assert (now.st_ino, now.st_size, now.st_mtime_ns) == (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        old = thumbprint(old_pem)
        try:
            assert tenant.request("DELETE", f"{registry}/{old}").status_code == 200
            tenant.reset_counters()
            response = get(cert_api, "/api/me", tenant.tenant.api_token("nestor"))
            assert response.status_code == 200, response.text
            assert get(cert_api, "/api/me", tenant.tenant.api_token("patti")).status_code == 200
        finally:
            tenant.request("POST", registry, data=pki.cert_pem(pki.load_pem_certs(old_pem)[0]))
        counters = tenant.counters()
        assert counters["token_errors"] == {"invalid_client": 1}  # one refusal, then the new one
        assert counters["certificates"] == {thumbprint(new_pem): 2}
        assert "retrying with the reloaded one" in cert_api.log.read_text()


# --- 6. certificate rotation under load -----------------------------------------------------------------

LOAD_USERS = ("adele", "nestor", "patti", "megan")


def test_certificate_rotation_under_load(infra, tenant, tmp_path):
    """Register a new certificate, replace the file atomically, un-register the old one,
    all while four users sign in again and again (an OBO each time): no request fails,
    and every assertion after the swap is signed with the new certificate."""
    state = tenant.tenant
    cert_path = tmp_path / "api-client.pem"
    old_pem = state.client_certificate_path.read_bytes()
    cert_path.write_bytes(old_pem)
    old = thumbprint(old_pem)
    key = pki.new_rsa_key()
    new_pem = pki.key_pem(key) + pki.cert_pem(pki.make_client_cert(key, "flask-obo API (rotated)"))
    new = thumbprint(new_pem)
    registry = f"/_devtenant/apps/{API_CLIENT_ID}/certificates"
    failures: list[str] = []
    done = threading.Event()

    def load(api: GunicornProcess, user: str) -> None:
        token = state.api_token(user)
        while not done.is_set():
            try:
                response = fresh_me(api, token)
                if response.status_code != 200:
                    failures.append(f"{user}: {response.status_code} {response.text[:200]}")
            except (AssertionError, requests.RequestException) as exc:
                failures.append(f"{user}: {exc!r}"[:300])

    def seen() -> dict[str, int]:
        return tenant.counters()["certificates"]

    with api(infra, tmp_path, {"AZURE_CLIENT_CERTIFICATE_PATH": str(cert_path)}, workers=2) as cert_api:
        threads = [threading.Thread(target=load, args=(cert_api, user)) for user in LOAD_USERS]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: seen().get(old, 0) >= 6, timeout=30, what="OBO with the old certificate")
            assert tenant.request("POST", registry, data=pki.cert_pem(pki.load_pem_certs(new_pem)[0])
                                  ).status_code == 201
            staged = tmp_path / ".api-client.pem.new"
            staged.write_bytes(new_pem)
            os.replace(staged, cert_path)  # what Key Vault's CSI driver does
            wait_until(lambda: seen().get(new, 0) >= 8, timeout=30, what="OBO with the new certificate")
            assert tenant.request("DELETE", f"{registry}/{old}").status_code == 200
            old_after_removal = seen().get(old, 0)
            new_at_removal = seen()[new]
            wait_until(lambda: seen()[new] >= new_at_removal + 8, timeout=30,
                       what="OBO after the old certificate was un-registered")
        finally:
            done.set()
            for thread in threads:
                thread.join(timeout=30)
            tenant.request("POST", registry, data=pki.cert_pem(pki.load_pem_certs(old_pem)[0]))
    assert failures == []
    counters = tenant.counters()
    assert counters["token_errors"] == {}  # not even a refused assertion that a retry hid
    assert counters["certificates"][old] == old_after_removal  # the old one never signed again
    assert counters["token"]["on_behalf_of"] == sum(counters["certificates"].values()) >= 22
