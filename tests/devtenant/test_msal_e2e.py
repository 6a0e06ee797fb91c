"""Real msal against a real ``python -m devtenant serve`` over HTTPS (one server per module)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import requests

from devtenant import API_CLIENT_ID, GRAPH_RESOURCE, SECOND_TENANT_ID, TENANT_ID, pki
from devtenant.api import DevTenant
from tests.devtenant.conftest import Server, claims_of, header_of

REPO = Path(__file__).resolve().parents[2]
GRAPH_DEFAULT = [f"{GRAPH_RESOURCE}/.default"]


def test_serve_prints_ready_line_and_records_url(dt_server: Server) -> None:
    assert f"devtenant ready at {dt_server.url} (tenant {TENANT_ID})" in dt_server.log.read_text()
    assert DevTenant(dt_server.tenant.state_dir).authority_host == dt_server.url


def test_msal_obo_with_secret_cache_and_refresh(dt_server: Server, msal_app) -> None:
    app = msal_app()
    user_token = dt_server.tenant.api_token("adele")
    result = app.acquire_token_on_behalf_of(user_token, GRAPH_DEFAULT)
    assert "access_token" in result, result
    me = requests.get(
        f"{dt_server.url}/v1.0/me",
        headers={"Authorization": f"Bearer {result['access_token']}"},
    )  # verified through REQUESTS_CA_BUNDLE, like the API's own Graph client
    assert me.status_code == 200 and me.json()["displayName"] == "Adele Vance"

    [account] = app.get_accounts()
    oid = claims_of(result["access_token"])["oid"]
    assert account["home_account_id"] == f"{oid}.{TENANT_ID}"
    assert account["username"] == "adele@flaskobodev.onmicrosoft.com"

    dt_server.post("/_devtenant/counters/reset")
    cached = app.acquire_token_silent([f"{GRAPH_RESOURCE}/User.Read"], account=account)
    assert cached["token_source"] == "cache"
    assert dt_server.counters()["token"]["refresh_token"] == 0
    refreshed = app.acquire_token_silent(GRAPH_DEFAULT, account=account, force_refresh=True)
    assert refreshed["token_source"] == "identity_provider"
    assert dt_server.counters()["token"]["refresh_token"] == 1


def test_msal_obo_with_certificate(dt_server: Server, msal_app) -> None:
    pem = dt_server.tenant.client_certificate_path.read_text()
    app = msal_app({"private_key": pem, "public_certificate": pem})
    result = app.acquire_token_on_behalf_of(dt_server.tenant.api_token("adele"), GRAPH_DEFAULT)
    assert "access_token" in result, result
    assert claims_of(result["access_token"])["azpacr"] == "2"  # certificate-authenticated
    boss = requests.get(
        f"{dt_server.url}/v1.0/me/manager",
        headers={"Authorization": f"Bearer {result['access_token']}"},
    )
    assert boss.status_code == 200 and boss.json()["displayName"] == "Nestor Wilke"


def test_a_second_certificate_registered_at_runtime_rotates_the_credential(dt_server: Server, msal_app
                                                                         ) -> None:
    """POST /_devtenant/apps/<id>/certificates registers one more certificate; both are
    accepted until DELETE un-registers one; the counters name the thumbprint that signed."""
    old_pem = dt_server.tenant.client_certificate_path.read_text()
    key = pki.new_rsa_key()
    cert = pki.make_client_cert(key, "flask-obo API (rotated)")
    new_pem = (pki.key_pem(key) + pki.cert_pem(cert)).decode()
    url = f"/_devtenant/apps/{API_CLIENT_ID}/certificates"
    new_app = msal_app({"private_key": new_pem, "public_certificate": new_pem})
    old_app = msal_app({"private_key": old_pem, "public_certificate": old_pem})
    refused = new_app.acquire_token_on_behalf_of(dt_server.tenant.api_token("adele"), GRAPH_DEFAULT)
    assert refused["error"] == "invalid_client" and 700027 in refused["error_codes"]

    added = dt_server.post(url, data=pki.cert_pem(cert))
    assert added.status_code == 201
    new_thumbprint = added.json()["thumbprint"]
    assert new_thumbprint == pki.thumbprint(cert, "sha256")
    dt_server.post("/_devtenant/counters/reset")
    for app in (new_app, old_app):  # both registered: both accepted
        result = app.acquire_token_on_behalf_of(dt_server.tenant.api_token("adele"), GRAPH_DEFAULT)
        assert "access_token" in result, result
    old_thumbprint = pki.thumbprint(pki.load_pem_certs(old_pem.encode())[0], "sha256")
    assert dt_server.counters()["certificates"] == {new_thumbprint: 1, old_thumbprint: 1}

    assert dt_server.delete(f"{url}/{old_thumbprint}").status_code == 200
    assert dt_server.delete(f"{url}/{old_thumbprint}").status_code == 404
    gone = old_app.acquire_token_on_behalf_of(dt_server.tenant.api_token("adele"), GRAPH_DEFAULT)
    assert gone["error"] == "invalid_client" and 700027 in gone["error_codes"]
    second_tenant = msal_app({"private_key": new_pem, "public_certificate": new_pem},
                             tenant=SECOND_TENANT_ID)  # the registration is the app's, in every tenant
    result = second_tenant.acquire_token_on_behalf_of(
        dt_server.tenant.api_token("megan", tenant=SECOND_TENANT_ID), GRAPH_DEFAULT)
    assert "access_token" in result, result
    assert dt_server.post(url, data=b"not a certificate").status_code == 400
    assert dt_server.post("/_devtenant/apps/nope/certificates", data=pki.cert_pem(cert)).status_code == 404
    # put the old one back for the other tests of the module
    assert dt_server.post(url, data=old_pem.split("-----END PRIVATE KEY-----")[1].strip().encode()
                          ).status_code == 201


def test_msal_sees_entra_errors(dt_server: Server, msal_app) -> None:
    app = msal_app()
    tenant = dt_server.tenant
    mfa = app.acquire_token_on_behalf_of(tenant.api_token("alex"), GRAPH_DEFAULT)
    assert mfa["error"] == "interaction_required" and 50079 in mfa["error_codes"]
    assert '"capolids"' in mfa["claims"]
    ok = app.acquire_token_on_behalf_of(tenant.api_token("alex", mfa=True), GRAPH_DEFAULT)
    assert "access_token" in ok, ok
    consent = app.acquire_token_on_behalf_of(tenant.api_token("lynne"), GRAPH_DEFAULT)
    assert consent["error"] == "invalid_grant" and consent["suberror"] == "consent_required"
    expired = app.acquire_token_on_behalf_of(tenant.api_token("adele", expired=True), GRAPH_DEFAULT)
    assert expired["error"] == "invalid_grant" and expired["error_codes"] == [500133]
    bad_secret = msal_app("wrong").acquire_token_on_behalf_of(tenant.api_token("adele"), GRAPH_DEFAULT)
    assert bad_secret["error"] == "invalid_client" and bad_secret["error_codes"] == [7000215]


def test_short_scope_form_changes_msal_cache_hits(dt_server: Server, msal_app) -> None:
    dt_server.post("/_devtenant/config", json={"short_scopes": True})
    try:
        app = msal_app()
        result = app.acquire_token_on_behalf_of(dt_server.tenant.api_token("megan"), GRAPH_DEFAULT)
        assert result["scope"] == "User.Read User.ReadBasic.All openid profile email"
        [account] = app.get_accounts()
        dt_server.post("/_devtenant/counters/reset")
        assert app.acquire_token_silent(["User.Read"], account=account)["token_source"] == "cache"
        full = app.acquire_token_silent([f"{GRAPH_RESOURCE}/User.Read"], account=account)
        assert full["token_source"] == "identity_provider"  # cache miss: msal used the RT
        assert dt_server.counters()["token"]["refresh_token"] == 1
    finally:
        dt_server.post("/_devtenant/config", json={"short_scopes": False})


def test_key_rotation_reaches_running_server(dt_server: Server, msal_app) -> None:
    old_kid = dt_server.get("/healthz").json()["kid"]
    rotated = subprocess.run(
        [sys.executable, "-m", "devtenant", "rotate-keys", "--state-dir", dt_server.tenant.state_dir],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    new_kid = rotated.stdout.strip()
    assert new_kid and new_kid != old_kid
    assert dt_server.get("/healthz").json()["kid"] == new_kid
    result = msal_app().acquire_token_on_behalf_of(dt_server.tenant.api_token("adele"), GRAPH_DEFAULT)
    assert header_of(result["access_token"])["kid"] == new_kid
    jwks = dt_server.get(f"/{TENANT_ID}/discovery/v2.0/keys").json()
    assert {new_kid, old_kid} <= {key["kid"] for key in jwks["keys"]}


def test_an_expired_registered_certificate_is_aadsts7000274(dt_server: Server, msal_app) -> None:
    """A certificate still registered on the app but past its end date: Entra finds the key
    and refuses it as expired (AADSTS7000274), not as unknown (AADSTS700027)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = pki.new_rsa_key()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "flask-obo API (expired)")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=400)).not_valid_after(now - dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    url = f"/_devtenant/apps/{API_CLIENT_ID}/certificates"
    added = dt_server.post(url, data=pki.cert_pem(cert))
    assert added.status_code == 201
    try:
        pem = (pki.key_pem(key) + pki.cert_pem(cert)).decode()
        result = msal_app({"private_key": pem, "public_certificate": pem}).acquire_token_for_client(
            GRAPH_DEFAULT)
        assert result["error"] == "invalid_client" and result["error_codes"] == [7000274], result
        assert "has expired" in result["error_description"]
    finally:
        assert dt_server.delete(f"{url}/{added.json()['thumbprint']}").status_code == 200
