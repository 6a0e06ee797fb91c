"""Acquiring Graph tokens on behalf of the user: how often Entra ID is called, and what
the caller sees when Entra ID or Graph fail. msal runs unpatched; HTTP is doubled."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jwt as pyjwt
import pytest
import requests
import responses
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from app import create_app
from flask_obo.settings import Settings
from tests.support.fake_entra import (
    ADELE,
    BOB,
    CLIENT_ID,
    GRAPH,
    TOKEN_URL,
    Behaviour,
    FakeEntra,
    settings_env,
)

OBO = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def me_with_override(settings, store, method: str, url: str, **answer):
    """GET /api/me for Adele while ``method url`` answers ``answer`` (a registration that
    comes before the double's own, so it wins)."""
    entra = FakeEntra()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(method, url, **answer)
        entra.register(rsps)
        client = create_app(settings, store=store).test_client()
        return client.get("/api/me", headers=bearer(entra.api_token(ADELE)))


def test_first_graph_call_makes_one_obo_and_later_ones_none(client, entra: FakeEntra):
    headers = bearer(entra.api_token(ADELE))
    for _ in range(6):
        response = client.get("/api/me", headers=headers)
        assert response.status_code == 200
        assert response.json["displayName"] == "Adele Vance"
    assert entra.obo_calls() == 1
    assert len(entra.token_requests) == 1
    assert entra.graph_requests == ["/me"] * 6


def test_routes_without_graph_never_exchange(client, entra: FakeEntra):
    assert client.get("/api/whoami", headers=bearer(entra.api_token())).status_code == 200
    assert entra.token_requests == []


def test_new_spa_tokens_reuse_the_cache_without_growing_it(client, entra: FakeEntra, redis_client):
    assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    (key,) = redis_client.keys("flask-obo:cache:*")
    first_blob = redis_client.get(key)
    for _ in range(5):  # five fresh assertions, as the SPA renews its token
        assert client.get("/api/me/manager", headers=bearer(entra.api_token(ADELE))).status_code == 200
    assert entra.obo_calls() == 1
    assert redis_client.get(key) == first_blob  # never rewritten, so it cannot grow


@pytest.mark.parametrize("scope_form", ["prefixed", "short", "granted-with-default"])
def test_cache_hits_whatever_scope_form_entra_returns(client, entra: FakeEntra, scope_form):
    # msal's silent lookup misses unless the stored scope covers the request; Entra does not
    # echo ".default", and may drop the resource prefix. Each miss would redeem the refresh
    # token: a call to Entra per request.
    entra.scope_form = scope_form
    for _ in range(4):
        assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    assert len(entra.token_requests) == 1


def test_expired_graph_token_is_renewed_with_the_refresh_token(client, entra: FakeEntra):
    entra.expires_in = 120  # msal treats tokens with < 5 min left as expired
    headers = bearer(entra.api_token(ADELE))
    assert client.get("/api/me", headers=headers).status_code == 200
    assert client.get("/api/me", headers=headers).status_code == 200
    assert entra.obo_calls() == 1
    assert entra.grant_calls("refresh_token") == 1


def test_users_are_cached_separately(client, entra: FakeEntra):
    assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).json["id"] == ADELE
    assert client.get("/api/me", headers=bearer(entra.api_token(BOB))).json["id"] == BOB
    assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).json["id"] == ADELE
    assert entra.obo_calls() == 2


def test_one_users_429_never_blocks_another_user(client, entra: FakeEntra):
    entra.behaviours[ADELE] = Behaviour("throttled", retry_after="30")
    adele = client.get("/api/me", headers=bearer(entra.api_token(ADELE)))
    assert adele.status_code == 503
    assert adele.headers["Retry-After"] == "30"
    assert adele.json["error"] == "temporarily_unavailable"

    bob = client.get("/api/me", headers=bearer(entra.api_token(BOB)))
    assert bob.status_code == 200
    assert bob.json["id"] == BOB

    calls = len(entra.token_requests)
    again = client.get("/api/me", headers=bearer(entra.api_token(ADELE)))
    assert again.status_code == 503  # Adele stays throttled, without asking Entra again
    assert 0 < int(again.headers["Retry-After"]) <= 30
    assert len(entra.token_requests) == calls


def test_one_users_400_never_blocks_another_user(client, entra: FakeEntra):
    entra.behaviours[ADELE] = Behaviour("invalid_grant")
    assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 401
    bob = client.get("/api/me", headers=bearer(entra.api_token(BOB)))
    assert bob.status_code == 200
    assert entra.obo_calls() == 2


def test_claims_challenge_from_entra_reaches_the_spa(client, entra: FakeEntra):
    entra.behaviours[ADELE] = Behaviour("mfa")
    response = client.get("/api/me", headers=bearer(entra.api_token(ADELE)))
    assert response.status_code == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="flask-obo", error="insufficient_claims", claims="')
    encoded = challenge.split('claims="')[1].rstrip('"')
    assert json.loads(base64.b64decode(encoded)) == {
        "access_token": {"capolids": {"essential": True, "values": ["p1"]}}
    }
    assert response.json["error"] == "insufficient_claims"
    assert response.json["claims"] == encoded


def test_missing_consent_is_403(client, entra: FakeEntra):
    entra.behaviours[ADELE] = Behaviour("consent")
    response = client.get("/api/me", headers=bearer(entra.api_token(ADELE)))
    assert response.status_code == 403
    assert response.json["error"] == "consent_required"


def test_bad_client_credentials_are_a_502_without_details(client, entra: FakeEntra):
    entra.behaviours[ADELE] = Behaviour("invalid_client")
    response = client.get("/api/me", headers=bearer(entra.api_token(ADELE)))
    assert response.status_code == 502
    assert response.json["error"] == "token_acquisition_failed"
    assert "AADSTS" not in response.get_data(as_text=True)


def test_entra_5xx_is_503_with_retry_after(client, entra: FakeEntra):
    entra.behaviours[ADELE] = Behaviour("server_error")
    response = client.get("/api/me", headers=bearer(entra.api_token(ADELE)))
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert "exploded" not in response.get_data(as_text=True)


@pytest.mark.parametrize("failure", [requests.ConnectionError("down"), requests.ReadTimeout("slow")])
def test_entra_unreachable_is_503(settings, store, failure):
    response = me_with_override(settings, store, responses.POST, TOKEN_URL, body=failure)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"


def test_graph_503s_are_retried(client, entra: FakeEntra):
    entra.graph_behaviours[ADELE] = ["503", "503"]
    response = client.get("/api/me", headers=bearer(entra.api_token(ADELE)))
    assert response.status_code == 200
    assert entra.graph_requests == ["/me"] * 3


def test_graph_throttling_that_persists_is_503(client, entra: FakeEntra):
    entra.graph_behaviours[ADELE] = ["429"] * 4
    response = client.get("/api/me", headers=bearer(entra.api_token(ADELE)))
    assert response.status_code == 503
    assert "Retry-After" in response.headers
    assert len(entra.graph_requests) == 4  # the first try and three retries


def test_graph_5xx_is_502(client, entra: FakeEntra):
    entra.graph_behaviours[ADELE] = ["500"]
    response = client.get("/api/me", headers=bearer(entra.api_token(ADELE)))
    assert response.status_code == 502
    assert response.json == {"error": "downstream_error",
                             "error_description": "The downstream API failed to answer the request."}


def test_graph_timeout_is_504(settings, store):
    response = me_with_override(settings, store, responses.GET, f"{GRAPH}/me",
                                body=requests.ReadTimeout("slow"))
    assert response.status_code == 504
    assert response.json["error"] == "downstream_timeout"


def test_graph_claims_challenge_gets_one_fresh_token_and_one_retry(client, entra: FakeEntra):
    headers = bearer(entra.api_token(ADELE))
    assert client.get("/api/me", headers=headers).status_code == 200
    entra.graph_behaviours[ADELE] = ["claims"]
    response = client.get("/api/me", headers=headers)
    assert response.status_code == 200
    assert entra.obo_calls() == 2
    # Graph's challenge, plus the client capability the API declares (cp1: CAE)
    assert json.loads(entra.token_requests[-1]["claims"]) == {
        "access_token": {"nbf": {"essential": True, "value": "1"}, "xms_cc": {"values": ["cp1"]}}
    }
    assert entra.graph_requests == ["/me", "/me", "/me"]


def test_graph_challenging_twice_is_passed_to_the_spa(client, entra: FakeEntra):
    entra.graph_behaviours[ADELE] = ["claims", "claims"]
    response = client.get("/api/me", headers=bearer(entra.api_token(ADELE)))
    assert response.status_code == 401
    assert 'error="insufficient_claims"' in response.headers["WWW-Authenticate"]
    assert entra.obo_calls() == 2


def test_manager_missing_is_404(client, entra: FakeEntra):
    response = client.get("/api/me/manager", headers=bearer(entra.api_token(BOB)))
    assert response.status_code == 404
    assert response.json["error"] == "manager_not_found"


def test_graph_is_asked_for_the_documented_fields_with_the_obo_token(client, entra: FakeEntra):
    assert client.get("/api/me/manager", headers=bearer(entra.api_token(ADELE))).status_code == 200
    (url,) = entra.graph_urls
    assert url == f"{GRAPH}/me/manager?%24select=id%2CdisplayName%2Cmail%2CuserPrincipalName%2CjobTitle"


def _certificate_pem(tmp_path) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flask-obo")])
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    path = tmp_path / "client.pem"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def test_certificate_credential_sends_a_signed_assertion_not_a_secret(entra: FakeEntra, store, tmp_path):
    env = settings_env(AZURE_CLIENT_CERTIFICATE_PATH=_certificate_pem(tmp_path))
    del env["AZURE_CLIENT_SECRET"]
    client = create_app(Settings.from_env(env), store=store).test_client()
    assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    (request,) = entra.token_requests
    assert "client_secret" not in request
    assert request["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    header = json.loads(base64.urlsafe_b64decode(request["client_assertion"].split(".")[0] + "=="))
    assert header["alg"] == "PS256"
    assert "x5t#S256" in header


def test_users_applications_share_one_signed_certificate_assertion(entra: FakeEntra, store, tmp_path):
    """Each user has an msal application of their own; the certificate is still parsed and
    its assertion signed once per process and token endpoint, not once per user (a private
    key load costs about 0.2 s of CPU), and the shared assertion is the one msal would sign."""
    path = _certificate_pem(tmp_path)
    env = settings_env(AZURE_CLIENT_CERTIFICATE_PATH=path)
    del env["AZURE_CLIENT_SECRET"]
    client = create_app(Settings.from_env(env), store=store).test_client()
    for user in (ADELE, BOB):
        assert client.get("/api/me", headers=bearer(entra.api_token(user))).status_code == 200
    assertions = {request["client_assertion"] for request in entra.token_requests}
    assert len(entra.token_requests) == 2 and len(assertions) == 1  # two users, one signature
    (assertion,) = assertions
    certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())
    claims = pyjwt.decode(assertion, certificate.public_key(), algorithms=["PS256"], audience=TOKEN_URL)
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    header = pyjwt.get_unverified_header(assertion)
    thumbprint = base64.urlsafe_b64encode(certificate.fingerprint(hashes.SHA256())).decode()
    assert header["x5t#S256"] == thumbprint
    (chain,) = header["x5c"]  # base64 with line breaks, as msal sends it
    assert base64.b64decode(chain) == certificate.public_bytes(serialization.Encoding.DER)


def test_a_token_due_for_renewal_is_renewed_once_under_the_lock(client, entra: FakeEntra):
    entra.refresh_in = -1  # renewal is due at once, though the token is still valid for an hour
    headers = bearer(entra.api_token(ADELE))
    assert client.get("/api/me", headers=headers).status_code == 200
    entra.refresh_in = None  # the renewed token carries no early-renewal hint
    for _ in range(3):
        assert client.get("/api/me", headers=headers).status_code == 200
    assert entra.obo_calls() == 1
    assert entra.grant_calls("refresh_token") == 1


def test_a_token_due_for_renewal_is_still_served_while_entra_is_down(client, entra: FakeEntra):
    entra.refresh_in = -1
    headers = bearer(entra.api_token(ADELE))
    assert client.get("/api/me", headers=headers).status_code == 200
    entra.behaviours[ADELE] = Behaviour("server_error")
    response = client.get("/api/me", headers=headers)
    assert response.status_code == 200  # msal falls back to the still-valid cached token
    assert entra.grant_calls("refresh_token") == 1  # the renewal was attempted


def test_guest_users_hit_the_cache_too(client, entra: FakeEntra, settings, store):
    # For a B2B guest, msal's home_account_id names the guest's home tenant, not the oid.tid
    # of the API token; the cache must still find the account (and other workers too).
    entra.guests[ADELE] = ("c3c3c3c3-0000-4000-8000-000000000003", "d4d4d4d4-0000-4000-8000-000000000004")
    for _ in range(4):
        assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).json["id"] == ADELE
    other_worker = create_app(settings, store=store).test_client()
    assert other_worker.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 200
    assert len(entra.token_requests) == 1


@pytest.mark.parametrize(("status", "body"), [(403, "<html>Forbidden by proxy</html>"),
                                              (200, "<html>captive portal</html>"), (400, "")])
def test_a_token_endpoint_answer_that_is_not_json_is_503(settings, store, caplog, status, body):
    response = me_with_override(settings, store, responses.POST, TOKEN_URL, status=status, body=body)
    assert response.status_code == 503
    assert response.json["error"] == "temporarily_unavailable"
    assert "proxy" not in caplog.text and "portal" not in caplog.text


def test_after_an_entra_outage_the_same_users_next_request_fails_fast(client, entra: FakeEntra):
    entra.behaviours[ADELE] = Behaviour("server_error")
    assert client.get("/api/me", headers=bearer(entra.api_token(ADELE))).status_code == 503
    calls = len(entra.token_requests)
    queued = client.get("/api/me", headers=bearer(entra.api_token(ADELE)))
    assert queued.status_code == 503  # not another call to a struggling Entra ID
    assert len(entra.token_requests) == calls
    assert client.get("/api/me", headers=bearer(entra.api_token(BOB))).status_code == 200


def test_user_data_is_never_stored_by_shared_caches(client, entra: FakeEntra):
    for path in ("/api/me", "/api/whoami"):
        response = client.get(path, headers=bearer(entra.api_token(ADELE)))
        assert response.status_code == 200
        assert response.headers["Cache-Control"] == "no-store"
        assert "Origin" in response.headers["Vary"]
    assert client.get("/api/me").headers["Cache-Control"] == "no-store"  # the 401 too
