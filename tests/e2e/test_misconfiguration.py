"""A misconfiguration is named at run time, never shown as an outage: the API under
gunicorn against the dev tenant and a real redis-server.

* A tenant id that is a well-formed GUID of no tenant: once a request has met it,
  ``/readyz`` answers 503 ``misconfigured`` with ``AADSTS90002``, requests get 503 (never a
  500), and the log has one ERROR line naming the URL and the code, however many requests
  met it. (``/readyz`` itself never calls Entra ID: ``flask obo check`` is the pre-flight.)
* Redis's password rotated under the API: ``/readyz`` says ``redis: misconfigured``
  (``redis_auth``) and stays 200, warm users keep getting 200 from memory with no new
  exchange, and the log names the cause once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import requests

from devtenant import pki
from tests.support.servers import redis_server
from tests.support.stack import DevTenantProcess, api_env, devtenant, gunicorn

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

NO_SUCH_TENANT = "3c9e1a55-0d6b-4f1e-9a27-5b8c4d2e7f10"
REQUESTS = 30


@pytest.fixture(scope="module")
def tenant(tmp_path_factory) -> Iterator[DevTenantProcess]:
    with devtenant(tmp_path_factory.mktemp("devtenant")) as process:
        yield process


def error_lines(log: str, needle: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line and needle in line]


def test_a_wrong_tenant_is_misconfigured_and_logged_once(tenant):
    env = api_env(tenant, AZURE_TENANT_ID=NO_SUCH_TENANT)
    url = f"{tenant.tenant.authority_host}/{NO_SUCH_TENANT}/v2.0/.well-known/openid-configuration"
    with gunicorn(env, workers=1, threads=4) as api:
        before = requests.get(f"{api.url}/readyz", timeout=5)  # /readyz never calls Entra ID:
        assert before.status_code == 200  # nothing is known before a request meets the authority
        assert before.json()["checks"]["authority"] == "unavailable"
        token = tenant.tenant.api_token("adele")
        statuses = [requests.get(f"{api.url}/api/me", headers={"Authorization": f"Bearer {token}"},
                                 timeout=15).status_code for _ in range(REQUESTS)]
        assert set(statuses) == {503}, statuses  # never a 500
        ready = requests.get(f"{api.url}/readyz", timeout=5)
        assert ready.status_code == 503, ready.text
        assert ready.json()["status"] == "misconfigured"
        assert ready.json()["checks"]["authority"] == "misconfigured"
        assert ready.json()["reasons"] == {"authority": "AADSTS90002"}
        assert requests.get(f"{api.url}/readyz", timeout=5).status_code == 503
        log = api.log.read_text()
    named = error_lines(log, "AADSTS90002")
    assert len(named) == 1, named  # once a minute, not once per request
    assert url in named[0] and "tenant not found" in named[0] and "AZURE_TENANT_ID" in named[0]


def test_a_refused_redis_password_is_misconfigured_and_warm_users_keep_200(tenant):
    with redis_server(password="first-password") as redis_url, \
            gunicorn(api_env(tenant, redis_url), workers=1, threads=4) as api:
        users = ["adele", "nestor", "megan"]
        headers = {user: {"Authorization": f"Bearer {tenant.tenant.api_token(user)}"}
                   for user in users}
        for user in users:  # warm: each user's token is in this worker's memory
            assert requests.get(f"{api.url}/api/me", headers=headers[user], timeout=15).status_code == 200
        exchanges = tenant.obo_calls()
        admin = redis.Redis.from_url(redis_url)
        admin.config_set("requirepass", "rotated-password")  # the password changes under the API
        for kind in ("normal", "pubsub"):  # and its connections must authenticate again
            admin.execute_command("CLIENT", "KILL", "TYPE", kind)

        statuses = [requests.get(f"{api.url}/api/me", headers=headers[users[i % 3]], timeout=15
                                 ).status_code for i in range(REQUESTS)]
        assert set(statuses) == {200}, statuses
        assert tenant.obo_calls() == exchanges  # from memory: no exchange
        ready = requests.get(f"{api.url}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text  # served from memory meanwhile: still ready
        assert ready.json()["checks"]["redis"] == "misconfigured"
        assert ready.json()["reasons"] == {"redis": "redis_auth"}
        log = api.log.read_text()
    named = error_lines(log, "redis_auth")
    assert len(named) == 1, named
    assert "REDIS_URL" in named[0] and "first-password" not in log and "rotated-password" not in log


@pytest.mark.parametrize(("change", "status", "component", "reason"), [
    ({"AZURE_CLIENT_SECRET": "a-wrong-secret-value"}, 502, "credential", "AADSTS7000215"),
    ({"REQUESTS_CA_BUNDLE": "<other CA>"}, 503, "authority", "untrusted_ca"),
], ids=["rejected-secret", "untrusted-ca"])
def test_a_rejected_credential_or_an_untrusted_ca_is_named(tenant, tmp_path, change, status, component,
                                                           reason):
    if change.get("REQUESTS_CA_BUNDLE"):  # a CA of our own, which did not sign the dev tenant's
        other_ca = tmp_path / "other-ca.pem"
        other_ca.write_bytes(pki.cert_pem(pki.make_ca(pki.new_rsa_key())))
        change = {"REQUESTS_CA_BUNDLE": str(other_ca)}
    with gunicorn(api_env(tenant, **change), workers=1, threads=4) as api:
        token = tenant.tenant.api_token("adele")
        statuses = [requests.get(f"{api.url}/api/me", headers={"Authorization": f"Bearer {token}"},
                                 timeout=15).status_code for _ in range(10)]
        assert set(statuses) == {status}, statuses  # never a 500
        ready = requests.get(f"{api.url}/readyz", timeout=5)
        assert ready.status_code == 503, ready.text
        expected = "rejected" if component == "credential" else "misconfigured"
        assert ready.json()["checks"][component] == expected
        assert ready.json()["reasons"] == {component: reason}
        log = api.log.read_text()
    named = error_lines(log, reason)
    assert len(named) == 1, named
    if reason == "untrusted_ca":
        assert "REQUESTS_CA_BUNDLE" in named[0] and str(tmp_path / "other-ca.pem") in named[0]
    assert "a-wrong-secret-value" not in log
