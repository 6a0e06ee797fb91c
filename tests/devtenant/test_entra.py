"""Entra v2 endpoints through the Flask test client: discovery, JWKS, token grants, errors."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
from flask.testing import FlaskClient
from joserfc import jwt
from joserfc.jwk import RSAKey

from devtenant import (
    API_CLIENT_ID,
    API_CLIENT_SECRET,
    GRAPH_RESOURCE,
    SPA_CLIENT_ID,
    TENANT_DOMAIN,
    TENANT_ID,
)
from devtenant.directory import Directory
from devtenant.server import create_app
from tests.devtenant.conftest import BASE, TOKEN_PATH, TokenEndpoint, claims_of, header_of

ISSUER = f"{BASE}/{TENANT_ID}/v2.0"
PREFIXED = f"{GRAPH_RESOURCE}/User.Read {GRAPH_RESOURCE}/User.ReadBasic.All openid profile email"
SHORT = "User.Read User.ReadBasic.All openid profile email"


def assert_entra_error(response, status: int, error: str, code: int) -> dict:
    assert response.status_code == status, response.get_json()
    body = response.get_json()
    assert body["error"] == error
    assert body["error_codes"] == [code]
    description = body["error_description"]
    assert description.startswith(f"AADSTS{code}: ")
    for line in ("Trace ID: ", "Correlation ID: ", "Timestamp: "):
        assert line in description
    assert {"timestamp", "trace_id", "correlation_id"} <= body.keys()
    return body


def test_openid_configuration_shape(dt_client: FlaskClient) -> None:
    url = f"/{TENANT_ID}/v2.0/.well-known/openid-configuration"
    body = dt_client.get(url, base_url=BASE).get_json()
    assert body["issuer"] == ISSUER
    assert body["authorization_endpoint"] == f"{BASE}/{TENANT_ID}/oauth2/v2.0/authorize"
    assert body["token_endpoint"] == f"{BASE}/{TENANT_ID}/oauth2/v2.0/token"
    assert body["jwks_uri"] == f"{BASE}/{TENANT_ID}/discovery/v2.0/keys"
    assert body["id_token_signing_alg_values_supported"] == ["RS256"]
    for key in (
        "response_types_supported", "subject_types_supported", "scopes_supported",
        "claims_supported", "tenant_region_scope", "cloud_instance_name", "msgraph_host",
    ):  # fmt: skip
        assert body[key]
    # The host is whatever the client used (docker-compose name included).
    other = dt_client.get(url, base_url="https://devtenant:9443").get_json()
    assert other["issuer"] == f"https://devtenant:9443/{TENANT_ID}/v2.0"
    # The verified domain is an alias of the tenant; the issuer still names the GUID.
    alias = dt_client.get(f"/{TENANT_DOMAIN}/v2.0/.well-known/openid-configuration", base_url=BASE)
    assert alias.get_json()["issuer"] == ISSUER


def test_public_url_overrides_request_host(dt_state_dir) -> None:
    app = create_app(dt_state_dir, public_url="https://devtenant:8443/")
    body = app.test_client().get(f"/{TENANT_ID}/v2.0/.well-known/openid-configuration").get_json()
    assert body["issuer"] == f"https://devtenant:8443/{TENANT_ID}/v2.0"


@pytest.mark.parametrize(
    "path", ["/v2.0/.well-known/openid-configuration", "/discovery/v2.0/keys", "/oauth2/v2.0/token"]
)
def test_unknown_tenant_is_aadsts90002(dt_client: FlaskClient, path: str) -> None:
    tenant = "11111111-2222-3333-4444-555555555555"
    method = dt_client.post if path.endswith("token") else dt_client.get
    body = assert_entra_error(method(f"/{tenant}{path}", base_url=BASE), 400, "invalid_tenant", 90002)
    assert tenant in body["error_description"]


def test_jwks_publishes_signing_kid_public_only(dt_client: FlaskClient, dt_tenant) -> None:
    keys = dt_client.get(f"/{TENANT_ID}/discovery/v2.0/keys", base_url=BASE).get_json()["keys"]
    assert dt_tenant.active_kid() in [k["kid"] for k in keys]
    for key in keys:
        assert key["kty"] == "RSA" and key["use"] == "sig" and key["n"] and key["e"]
        assert not {"d", "p", "q", "dp", "dq", "qi"} & key.keys()


def test_obo_with_secret_returns_entra_fields_and_graph_token(dt_token: TokenEndpoint) -> None:
    response = dt_token.obo_for("adele", headers={"client-request-id": "abc-123"})
    assert response.status_code == 200, response.get_json()
    assert response.headers["Cache-Control"].startswith("no-store")
    body = response.get_json()
    assert body.keys() >= {
        "token_type", "scope", "expires_in", "ext_expires_in", "access_token",
        "refresh_token", "id_token", "client_info",
    }  # fmt: skip
    assert body["token_type"] == "Bearer"
    assert isinstance(body["expires_in"], int) and 3600 <= body["expires_in"] <= 5000
    assert body["scope"] == PREFIXED
    adele = Directory.load().require_user("adele")
    info = json.loads(base64.urlsafe_b64decode(body["client_info"] + "=="))
    assert info == {"uid": adele.oid, "utid": TENANT_ID}
    access = claims_of(body["access_token"])
    assert header_of(body["access_token"])["alg"] == "RS256"
    assert access["aud"] == GRAPH_RESOURCE and access["iss"] == ISSUER
    assert access["azp"] == API_CLIENT_ID and access["azpacr"] == "1"
    assert access["scp"] == "User.Read User.ReadBasic.All"
    assert access["oid"] == adele.oid and access["tid"] == TENANT_ID and access["ver"] == "2.0"
    assert access["preferred_username"] == "adele@flaskobodev.onmicrosoft.com"
    for claim in ("aio", "rh", "uti", "sub", "name", "iat", "nbf", "exp"):
        assert claim in access
    assert claims_of(body["id_token"])["aud"] == API_CLIENT_ID
    me = dt_token.client.get(
        "/v1.0/me", base_url=BASE, headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert me.status_code == 200 and me.get_json()["displayName"] == "Adele Vance"


def test_obo_with_http_basic_client_auth(dt_token: TokenEndpoint, dt_tenant) -> None:
    basic = base64.b64encode(f"{API_CLIENT_ID}:{API_CLIENT_SECRET}".encode()).decode()
    data = {
        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "requested_token_use": "on_behalf_of",
        "assertion": dt_tenant.api_token("megan"),
        "scope": f"{GRAPH_RESOURCE}/User.Read",
    }
    response = dt_token.post(data, headers={"Authorization": f"Basic {basic}"})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["scope"] == f"{GRAPH_RESOURCE}/User.Read"  # explicit scope, no OIDC extras
    assert "refresh_token" not in body and "id_token" not in body  # no offline_access/openid
    assert claims_of(body["access_token"])["scp"] == "User.Read"


def test_short_scope_form_via_runtime_switch_and_flag(dt_token: TokenEndpoint, dt_state_dir) -> None:
    client = dt_token.client
    assert client.post("/_devtenant/config", json={"short_scopes": True}).get_json()["short_scopes"] is True
    assert dt_token.obo_for("adele").get_json()["scope"] == SHORT
    explicit = dt_token.obo_for("adele", scope=f"{GRAPH_RESOURCE}/User.Read openid")
    assert explicit.get_json()["scope"] == "User.Read openid profile email"
    client.post("/_devtenant/config", json={"short_scopes": False})
    assert dt_token.obo_for("adele").get_json()["scope"] == PREFIXED
    flagged = create_app(dt_state_dir, short_scopes=True).test_client()
    assert TokenEndpoint(flagged, dt_token.tenant).obo_for("adele").get_json()["scope"] == SHORT


def test_explicit_scope_not_consented_is_consent_required(dt_token: TokenEndpoint) -> None:
    response = dt_token.obo_for("adele", scope=f"{GRAPH_RESOURCE}/User.Read.All openid")
    body = assert_entra_error(response, 400, "invalid_grant", 65001)
    assert body["suberror"] == "consent_required"


def test_consent_missing_user(dt_token: TokenEndpoint) -> None:
    body = assert_entra_error(dt_token.obo_for("lynne"), 400, "invalid_grant", 65001)
    assert body["suberror"] == "consent_required"
    assert API_CLIENT_ID in body["error_description"]


def test_mfa_required_user_gets_claims_challenge_then_succeeds_with_mfa(
    dt_token: TokenEndpoint,
) -> None:
    body = assert_entra_error(dt_token.obo_for("alex"), 400, "interaction_required", 50079)
    claims = json.loads(body["claims"])  # a JSON *string*, as Entra sends it
    assert claims["access_token"]["capolids"]["essential"] is True
    assert uuid.UUID(claims["access_token"]["capolids"]["values"][0])
    ok = dt_token.obo_for("alex", mfa=True)
    assert ok.status_code == 200, ok.get_json()
    assert "mfa" in claims_of(ok.get_json()["access_token"])["amr"]
    # The refreshed token keeps satisfying the policy (amr travels with the RT).
    refreshed = dt_token.refresh(ok.get_json()["refresh_token"])
    assert refreshed.status_code == 200, refreshed.get_json()


def test_expired_assertion_is_aadsts500133(dt_token: TokenEndpoint) -> None:
    assert_entra_error(dt_token.obo_for("adele", expired=True), 400, "invalid_grant", 500133)


def test_foreign_and_misaddressed_assertions_are_aadsts50013(dt_token: TokenEndpoint, dt_tenant) -> None:
    genuine = claims_of(dt_tenant.api_token("adele"))
    foreign_key = RSAKey.generate_key(2048, auto_kid=True)
    forged = jwt.encode({"alg": "RS256", "kid": foreign_key.kid}, genuine, foreign_key)
    assert_entra_error(dt_token.obo(forged), 400, "invalid_grant", 50013)
    assert_entra_error(dt_token.obo("not-a-jwt"), 400, "invalid_grant", 50013)
    # A token for another audience (here: a Graph token) cannot be exchanged by the API.
    graph_token = dt_token.obo_for("adele").get_json()["access_token"]
    body = assert_entra_error(dt_token.obo(graph_token), 400, "invalid_grant", 50013)
    assert "audience" in body["error_description"]


def test_client_authentication_errors(dt_token: TokenEndpoint, dt_tenant) -> None:
    assertion = dt_tenant.api_token("adele")
    assert_entra_error(dt_token.obo(assertion, secret="wrong"), 401, "invalid_client", 7000215)
    unknown = str(uuid.uuid4())
    body = assert_entra_error(dt_token.obo(assertion, client_id=unknown), 401, "invalid_client", 700016)
    assert unknown in body["error_description"]
    no_creds = {
        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "requested_token_use": "on_behalf_of",
        "assertion": assertion,
        "scope": f"{GRAPH_RESOURCE}/.default",
        "client_id": API_CLIENT_ID,
    }
    assert_entra_error(dt_token.post(no_creds), 401, "invalid_client", 7000218)
    spa = dt_token.obo(assertion, client_id=SPA_CLIENT_ID, secret="anything")
    assert_entra_error(spa, 401, "invalid_client", 700025)


def test_request_shape_errors(dt_token: TokenEndpoint, dt_tenant) -> None:
    missing_use = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": "x"}
    assert_entra_error(dt_token.post(missing_use), 400, "invalid_request", 900144)
    assert_entra_error(dt_token.post({}), 400, "invalid_request", 900144)
    no_scope = assert_entra_error(dt_token.obo_for("adele", scope=""), 400, "invalid_request", 900144)
    assert "'scope'" in no_scope["error_description"]
    body = assert_entra_error(dt_token.post({"grant_type": "password"}), 400, "unsupported_grant_type", 70003)
    assert "'password'" in body["error_description"]
    mixed = dt_token.obo_for("adele", scope=f"{GRAPH_RESOURCE}/User.Read api://{API_CLIENT_ID}/x")
    assert_entra_error(mixed, 400, "invalid_scope", 28000)
    unknown = dt_token.obo_for("adele", scope="https://unknown.example/.default")
    assert_entra_error(unknown, 400, "invalid_resource", 500011)


def test_correlation_id_echoes_client_request_id(dt_token: TokenEndpoint) -> None:
    response = dt_token.obo_for("lynne", headers={"client-request-id": "corr-42"})
    assert response.get_json()["correlation_id"] == "corr-42"
    assert "Correlation ID: corr-42" in response.get_json()["error_description"]


def test_refresh_token_rotation(dt_token: TokenEndpoint) -> None:
    first = dt_token.obo_for("adele").get_json()
    second = dt_token.refresh(first["refresh_token"])
    assert second.status_code == 200, second.get_json()
    body = second.get_json()
    assert body["refresh_token"] != first["refresh_token"]
    assert body["scope"] == PREFIXED
    assert claims_of(body["access_token"])["oid"] == claims_of(first["access_token"])["oid"]
    assert "client_info" in body and "id_token" in body
    # The redeemed token is spent; the rotated one works (also without a scope).
    assert_entra_error(dt_token.refresh(first["refresh_token"]), 400, "invalid_grant", 70000)
    assert dt_token.refresh(body["refresh_token"], scope=None).status_code == 200
    assert_entra_error(dt_token.refresh("garbage"), 400, "invalid_grant", 9002313)


def test_client_credentials_app_only_token(dt_token: TokenEndpoint) -> None:
    data = {
        "grant_type": "client_credentials",
        "scope": f"{GRAPH_RESOURCE}/.default",
        "client_id": API_CLIENT_ID,
        "client_secret": API_CLIENT_SECRET,
    }
    response = dt_token.post(data)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert set(body) == {"token_type", "expires_in", "ext_expires_in", "access_token"}
    claims = claims_of(body["access_token"])
    assert claims["idtyp"] == "app" and "scp" not in claims and claims["roles"] == ["User.Read.All"]
    assert claims["aud"] == GRAPH_RESOURCE and claims["azp"] == API_CLIENT_ID
    own = dt_token.post({**data, "scope": f"api://{API_CLIENT_ID}/.default"}).get_json()
    assert claims_of(own["access_token"])["roles"] == ["access_as_application"]
    bad = dt_token.post({**data, "scope": f"{GRAPH_RESOURCE}/User.Read"})
    assert_entra_error(bad, 400, "invalid_scope", 1002012)


def _client_assertion(key: RSAKey, cert_der_sha256: str, alg: str = "PS256", **claims) -> str:
    now = int(time.time())
    payload = {
        "aud": f"{BASE}{TOKEN_PATH}",
        "iss": API_CLIENT_ID,
        "sub": API_CLIENT_ID,
        "jti": str(uuid.uuid4()),
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        **claims,
    }
    return jwt.encode({"alg": alg, "x5t#S256": cert_der_sha256}, payload, key, algorithms=[alg])


def test_private_key_jwt_client_assertion(dt_token: TokenEndpoint, dt_tenant) -> None:
    from devtenant import pki

    pem = dt_tenant.client_certificate_path.read_bytes()
    key = RSAKey.import_key(pki.key_pem(pki.load_pem_key(pem)))
    thumb = pki.thumbprint(pki.load_pem_certs(pem)[0], "sha256")

    def obo(client_assertion: str):
        return dt_token.post(
            {
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "requested_token_use": "on_behalf_of",
                "assertion": dt_tenant.api_token("adele"),
                "scope": f"{GRAPH_RESOURCE}/.default",
                "client_id": API_CLIENT_ID,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": client_assertion,
            }
        )

    for alg in ("PS256", "RS256"):
        ok = obo(_client_assertion(key, thumb, alg))
        assert ok.status_code == 200, ok.get_json()
        assert claims_of(ok.get_json()["access_token"])["azpacr"] == "2"
    stranger = RSAKey.generate_key(2048)
    assert_entra_error(obo(_client_assertion(stranger, thumb)), 401, "invalid_client", 700027)
    assert_entra_error(obo(_client_assertion(key, "AAAA")), 401, "invalid_client", 700027)
    wrong_aud = _client_assertion(key, thumb, aud="https://elsewhere/token")
    assert_entra_error(obo(wrong_aud), 401, "invalid_client", 700027)
    expired = _client_assertion(key, thumb, exp=int(time.time()) - 3600)
    assert_entra_error(obo(expired), 401, "invalid_client", 700024)
