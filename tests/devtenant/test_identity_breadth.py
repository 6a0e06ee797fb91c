"""Identity breadth, with real msal against a real served dev tenant (one per module):
workload identity federation (a federated token file, rotated), an App Service managed
identity as the federated credential, v1 tokens, a second tenant, and CAE revocation.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msal
import pytest
import requests
from joserfc import jwt
from joserfc.jwk import KeySet
from msal.managed_identity import APP_SERVICE, get_managed_identity_source

from devtenant import (
    API_APP_ID_URI,
    API_CLIENT_ID,
    FEDERATED_SUBJECT,
    GRAPH_RESOURCE,
    MANAGED_IDENTITY_CLIENT_ID,
    MANAGED_IDENTITY_OBJECT_ID,
    SECOND_TENANT_DOMAIN,
    SECOND_TENANT_ID,
    SPA_CLIENT_ID,
    TENANT_ID,
    TOKEN_EXCHANGE_AUDIENCE,
    USER_ASSIGNED_IDENTITY_CLIENT_ID,
    USER_ASSIGNED_IDENTITY_OBJECT_ID,
)
from tests.devtenant.conftest import REPO, Server, claims_of

GRAPH_DEFAULT = [f"{GRAPH_RESOURCE}/.default"]


def graph(server: Server, token: str, path: str = "/me") -> requests.Response:
    return server.get(f"/v1.0{path}", headers={"Authorization": f"Bearer {token}"})


def from_file(path: Path):
    """msal calls a callable client_assertion on every token request: re-read the file,
    as the Azure SDKs do with AZURE_FEDERATED_TOKEN_FILE."""
    return lambda: path.read_text().strip()


# --- workload identity federation -------------------------------------------------------


def test_federation_issuer_discovery_and_jwks(dt_server: Server) -> None:
    issuer = dt_server.tenant.federation_issuer()
    assert issuer == f"{dt_server.url}/federation/aks"
    config = dt_server.get("/federation/aks/.well-known/openid-configuration").json()
    assert config["issuer"] == issuer and config["jwks_uri"] == f"{issuer}/openid/v1/jwks"
    jwks = dt_server.get("/federation/aks/openid/v1/jwks").json()
    token = dt_server.tenant.federated_token()
    decoded = jwt.decode(token, KeySet.import_key_set(jwks))  # its own key, not the tenant's
    assert decoded.claims["iss"] == issuer and decoded.claims["sub"] == FEDERATED_SUBJECT
    assert decoded.claims["aud"] == [TOKEN_EXCHANGE_AUDIENCE]
    tenant_keys = dt_server.get(f"/{TENANT_ID}/discovery/v2.0/keys").json()
    assert not {k["kid"] for k in tenant_keys["keys"]} & {k["kid"] for k in jwks["keys"]}
    assert dt_server.get("/federation/nope/.well-known/openid-configuration").status_code == 404


def test_obo_with_federated_token_file_and_rotation(dt_server: Server, msal_app, tmp_path: Path) -> None:
    token_file = dt_server.tenant.write_federated_token(tmp_path / "azure-identity-token")
    app = msal_app({"client_assertion": from_file(token_file)})
    result = app.acquire_token_on_behalf_of(dt_server.tenant.api_token("adele"), GRAPH_DEFAULT)
    assert "access_token" in result, result
    claims = claims_of(result["access_token"])
    assert claims["azp"] == API_CLIENT_ID and claims["azpacr"] == "2"
    assert graph(dt_server, result["access_token"]).json()["displayName"] == "Adele Vance"

    # AKS rewrites the file before the token expires; the next request reads it again.
    first = token_file.read_text()
    dt_server.tenant.write_federated_token(token_file, lifetime=600)
    assert token_file.read_text() != first
    again = app.acquire_token_on_behalf_of(dt_server.tenant.api_token("nestor"), GRAPH_DEFAULT)
    assert "access_token" in again, again
    # ... which the failure of a stale (expired) rewrite proves:
    dt_server.tenant.write_federated_token(token_file, expired=True)
    stale = app.acquire_token_on_behalf_of(dt_server.tenant.api_token("patti"), GRAPH_DEFAULT)
    assert stale["error"] == "invalid_client" and stale["error_codes"] == [700024], stale


def test_federated_client_credentials_and_refresh(dt_server: Server, msal_app, tmp_path: Path) -> None:
    token_file = dt_server.tenant.write_federated_token(tmp_path / "token")
    app = msal_app({"client_assertion": from_file(token_file)})
    app_only = app.acquire_token_for_client([f"{API_APP_ID_URI}/.default"])
    assert claims_of(app_only["access_token"])["roles"] == ["access_as_application"], app_only
    app.acquire_token_on_behalf_of(dt_server.tenant.api_token("megan"), GRAPH_DEFAULT)
    [account] = app.get_accounts()
    refreshed = app.acquire_token_silent(GRAPH_DEFAULT, account=account, force_refresh=True)
    assert refreshed and refreshed["token_source"] == "identity_provider", refreshed


def test_federated_assertion_errors_are_entras(dt_server: Server, msal_app) -> None:
    tenant = dt_server.tenant
    user_token = tenant.api_token("adele")

    def obo(assertion: str) -> dict:
        app = msal_app({"client_assertion": lambda: assertion})
        return app.acquire_token_on_behalf_of(user_token, GRAPH_DEFAULT)

    # The issuer is trusted, the subject is not the credential's: Entra names the subject.
    wrong_subject = obo(tenant.federated_token(subject="system:serviceaccount:default:intruder"))
    assert wrong_subject["error"] == "invalid_client" and wrong_subject["error_codes"] == [700213]
    assert ("No matching federated identity record found for presented assertion subject "
            "'system:serviceaccount:default:intruder'.") in wrong_subject["error_description"]
    case_only = obo(tenant.federated_token(subject="system:serviceaccount:default:Flask-OBO"))
    assert case_only["error_codes"] == [7002138]

    # An issuer no federated credential of the app names: AADSTS70021.
    foreign = {**claims_of(tenant.federated_token()), "iss": "https://issuer.example/cluster"}
    untrusted = obo(jwt.encode({"alg": "RS256"}, foreign, tenant._minter().keys.active))
    assert untrusted["error"] == "invalid_client" and untrusted["error_codes"] == [70021]
    assert (
        "No matching federated identity record found for presented assertion. "
        "Assertion Issuer: 'https://issuer.example/cluster'. "
        "Assertion Subject: 'system:serviceaccount:default:flask-obo'. "
        f"Assertion Audience: '{TOKEN_EXCHANGE_AUDIENCE}'."
    ) in untrusted["error_description"]

    wrong_audience = obo(tenant.federated_token(audience="api://not-token-exchange"))
    assert wrong_audience["error"] == "invalid_client" and wrong_audience["error_codes"] == [700212]
    assert "presented assertion audience 'api://not-token-exchange'" in wrong_audience["error_description"]

    expired = obo(tenant.federated_token(expired=True))
    assert expired["error"] == "invalid_client" and expired["error_codes"] == [700024]
    assert "Client assertion is not within its valid time range." in expired["error_description"]

    # Right issuer name and claims, wrong key (signed by the tenant instead): AADSTS700027.
    forged_claims = claims_of(tenant.federated_token())
    forged = jwt.encode(
        {"alg": "RS256"}, forged_claims, tenant._minter().keys.active
    )
    bad_signature = obo(forged)
    assert bad_signature["error"] == "invalid_client" and bad_signature["error_codes"] == [700027]

    raw = dt_server.post(
        f"/{TENANT_ID}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": API_CLIENT_ID,
            "scope": f"{API_APP_ID_URI}/.default",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": tenant.federated_token(subject="system:serviceaccount:x:y"),
        },
    )
    assert raw.status_code == 401 and raw.json()["error_codes"] == [700213]


# --- managed identity (App Service) as the federated credential ------------------------


@pytest.fixture
def app_service_env(dt_server: Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = dt_server.tenant.managed_identity_env()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(dt_server.tenant.ca_bundle_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.mark.parametrize(
    ("identity", "client_id", "object_id"),
    [
        (msal.SystemAssignedManagedIdentity(), MANAGED_IDENTITY_CLIENT_ID, MANAGED_IDENTITY_OBJECT_ID),
        (
            msal.UserAssignedManagedIdentity(client_id=USER_ASSIGNED_IDENTITY_CLIENT_ID),
            USER_ASSIGNED_IDENTITY_CLIENT_ID,
            USER_ASSIGNED_IDENTITY_OBJECT_ID,
        ),
    ],
    ids=["system-assigned", "user-assigned"],
)
def test_obo_with_managed_identity_assertion(
    dt_server: Server, msal_app, app_service_env, identity, client_id: str, object_id: str
) -> None:
    assert app_service_env["IDENTITY_ENDPOINT"] == f"{dt_server.url}/msi/token"
    mi = msal.ManagedIdentityClient(identity, http_client=requests.Session())
    assert get_managed_identity_source() == APP_SERVICE
    dt_server.post("/_devtenant/counters/reset")
    minted = mi.acquire_token_for_client(resource=TOKEN_EXCHANGE_AUDIENCE)
    assert "access_token" in minted, minted
    assert dt_server.counters()["managed_identity"] == {client_id: 1}
    claims = claims_of(minted["access_token"])
    assert claims["aud"] == TOKEN_EXCHANGE_AUDIENCE and claims["sub"] == object_id
    assert claims["azp"] == client_id and claims["iss"] == dt_server.tenant.issuer

    def assertion() -> str:
        return mi.acquire_token_for_client(resource=TOKEN_EXCHANGE_AUDIENCE)["access_token"]

    app = msal_app({"client_assertion": assertion})
    result = app.acquire_token_on_behalf_of(dt_server.tenant.api_token("adele"), GRAPH_DEFAULT)
    assert "access_token" in result, result
    assert graph(dt_server, result["access_token"]).status_code == 200


def test_managed_identity_endpoint_errors(dt_server: Server, app_service_env) -> None:
    endpoint = "/msi/token"
    query = {"api-version": "2019-08-01", "resource": TOKEN_EXCHANGE_AUDIENCE}
    header = {"X-IDENTITY-HEADER": app_service_env["IDENTITY_HEADER"]}
    assert dt_server.get(endpoint, params=query).status_code == 401
    wrong = dt_server.get(endpoint, params=query, headers={"X-IDENTITY-HEADER": "nope"})
    assert wrong.status_code == 401 and wrong.json()["statusCode"] == 401
    unknown = dt_server.get(endpoint, params={**query, "client_id": API_CLIENT_ID}, headers=header)
    assert unknown.status_code == 400
    no_resource = dt_server.get(endpoint, params={**query, "resource": "api://nope"}, headers=header)
    assert no_resource.status_code == 500
    ok = dt_server.get(endpoint, params=query, headers=header).json()
    assert ok["client_id"] == MANAGED_IDENTITY_CLIENT_ID and int(ok["expires_on"]) > 0
    assert ok["resource"] == TOKEN_EXCHANGE_AUDIENCE and ok["token_type"] == "Bearer"


# --- v1 tokens --------------------------------------------------------------------------


def test_v1_token_shape_discovery_and_obo(dt_server: Server, msal_app) -> None:
    tenant = dt_server.tenant
    v1 = tenant.api_token("adele", v1=True)
    claims = claims_of(v1)
    assert claims["ver"] == "1.0"
    assert claims["iss"] == f"{tenant.v1_issuer_host}/{TENANT_ID}/" == f"{dt_server.url}/sts/{TENANT_ID}/"
    assert claims["aud"] == API_APP_ID_URI and claims["appid"] == SPA_CLIENT_ID
    assert claims["scp"] == "user_impersonation" and claims["tid"] == TENANT_ID
    assert claims["upn"] == claims["unique_name"] == "adele@flaskobodev.onmicrosoft.com"
    assert "azp" not in claims and "preferred_username" not in claims and claims["oid"]

    config = dt_server.get(f"/{TENANT_ID}/.well-known/openid-configuration").json()
    assert config["issuer"] == claims["iss"]
    keys = dt_server.get("/common/discovery/keys").json()
    assert config["jwks_uri"] == f"{dt_server.url}/common/discovery/keys"
    jwt.decode(v1, KeySet.import_key_set(keys))  # same keys as v2 tokens

    result = msal_app().acquire_token_on_behalf_of(v1, GRAPH_DEFAULT)
    assert "access_token" in result, result
    assert claims_of(result["access_token"])["oid"] == claims["oid"]
    env = tenant.env()
    assert env["AZURE_V1_ISSUER_HOST"] == f"{dt_server.url}/sts"


# --- a second tenant --------------------------------------------------------------------


def test_second_tenant_discovery_and_common_endpoints(dt_server: Server) -> None:
    for ref in (SECOND_TENANT_ID, SECOND_TENANT_DOMAIN):
        config = dt_server.get(f"/{ref}/v2.0/.well-known/openid-configuration").json()
        assert config["issuer"] == f"{dt_server.url}/{SECOND_TENANT_ID}/v2.0"
        assert config["token_endpoint"] == f"{dt_server.url}/{SECOND_TENANT_ID}/oauth2/v2.0/token"
    home_keys = dt_server.get(f"/{TENANT_ID}/discovery/v2.0/keys").json()["keys"]
    for authority in ("organizations", "common"):
        config = dt_server.get(f"/{authority}/v2.0/.well-known/openid-configuration").json()
        assert config["issuer"] == f"{dt_server.url}/{{tenantid}}/v2.0"
        keys = dt_server.get(f"/{authority}/discovery/v2.0/keys").json()["keys"]
        assert [k["kid"] for k in keys] == [k["kid"] for k in home_keys]  # shared keys
        assert keys[0]["issuer"] == f"{dt_server.url}/{{tenantid}}/v2.0"


def test_obo_in_the_second_tenant(dt_server: Server, msal_app) -> None:
    megan = dt_server.tenant.api_token("megan", tenant=SECOND_TENANT_ID)
    claims = claims_of(megan)
    assert claims["tid"] == SECOND_TENANT_ID and claims["iss"] == f"{dt_server.url}/{SECOND_TENANT_ID}/v2.0"
    app = msal_app(tenant=SECOND_TENANT_ID)
    result = app.acquire_token_on_behalf_of(megan, GRAPH_DEFAULT)
    assert "access_token" in result, result
    graph_claims = claims_of(result["access_token"])
    assert graph_claims["tid"] == SECOND_TENANT_ID and graph_claims["scp"] == "User.Read"
    [account] = app.get_accounts()
    assert account["home_account_id"] == f"{claims['oid']}.{SECOND_TENANT_ID}"
    me = graph(dt_server, result["access_token"]).json()
    assert (me["displayName"], me["userPrincipalName"]) == ("Megan Bowen", "megan@contosodev.onmicrosoft.com")
    assert graph(dt_server, result["access_token"], "/me/manager").json()["displayName"] == "Isaiah Langer"
    # The same name in the home tenant is another user.
    assert claims_of(dt_server.tenant.api_token("megan"))["oid"] != claims["oid"]

    wrong_tenant = msal_app().acquire_token_on_behalf_of(megan, GRAPH_DEFAULT)
    assert wrong_tenant["error"] == "invalid_grant" and wrong_tenant["error_codes"] == [50020], wrong_tenant
    assert "megan@contosodev.onmicrosoft.com" in wrong_tenant["error_description"]
    adele = msal_app(tenant=SECOND_TENANT_ID).acquire_token_on_behalf_of(
        dt_server.tenant.api_token("adele"), GRAPH_DEFAULT
    )
    assert adele["error"] == "invalid_grant" and adele["error_codes"] == [50020], adele


def test_second_tenant_with_federated_credential(dt_server: Server, msal_app, tmp_path: Path) -> None:
    """Federated credentials belong to the app registration: they work in every tenant."""
    token_file = dt_server.tenant.write_federated_token(tmp_path / "token")
    app = msal_app({"client_assertion": from_file(token_file)}, tenant=SECOND_TENANT_DOMAIN)
    megan = dt_server.tenant.api_token("megan@contosodev.onmicrosoft.com")
    result = app.acquire_token_on_behalf_of(megan, GRAPH_DEFAULT)
    assert claims_of(result["access_token"])["tid"] == SECOND_TENANT_ID, result


# --- continuous access evaluation -------------------------------------------------------


@pytest.fixture
def revocations(dt_server: Server) -> Iterator[None]:
    yield
    dt_server.tenant.clear_revocation()


def challenge_claims(response: requests.Response) -> str:
    """The decoded ``claims`` of Graph's insufficient_claims challenge."""
    header = response.headers["WWW-Authenticate"]
    assert 'error="insufficient_claims"' in header, header
    encoded = header.split('claims="', 1)[1].split('"', 1)[0]
    return base64.b64decode(encoded).decode()


def test_revoke_then_graph_challenge_then_obo_with_claims(dt_server: Server, msal_app, revocations) -> None:
    tenant = dt_server.tenant
    spa_token = tenant.api_token("patti")
    cae = msal_app(client_capabilities=["cp1"])
    first = cae.acquire_token_on_behalf_of(spa_token, GRAPH_DEFAULT)
    assert claims_of(first["access_token"])["xms_cc"] == ["cp1"], first
    legacy = msal_app().acquire_token_on_behalf_of(spa_token, GRAPH_DEFAULT)
    assert "xms_cc" not in claims_of(legacy["access_token"])
    assert graph(dt_server, first["access_token"]).status_code == 200

    revoked = subprocess.run(
        [sys.executable, "-m", "devtenant", "revoke", "patti", "--state-dir", tenant.state_dir],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert revoked.stdout.startswith("revoked at ")

    challenged = graph(dt_server, first["access_token"])
    assert challenged.status_code == 401
    assert challenged.json()["error"]["code"] == "InvalidAuthenticationToken"
    claims = challenge_claims(challenged)
    nbf = json.loads(claims)["access_token"]["nbf"]
    assert nbf["essential"] is True and int(nbf["value"]) >= claims_of(first["access_token"])["iat"]
    # A client that did not declare cp1 holds a short-lived token, not revoked in real time.
    assert graph(dt_server, legacy["access_token"]).status_code == 200

    [account] = cae.get_accounts()
    stale_refresh = cae.acquire_token_silent_with_error(GRAPH_DEFAULT, account=account, force_refresh=True)
    assert stale_refresh["error"] == "invalid_grant", stale_refresh
    assert stale_refresh["error_codes"] == [50173]

    renewed = cae.acquire_token_on_behalf_of(spa_token, GRAPH_DEFAULT, claims_challenge=claims)
    assert "access_token" in renewed, renewed
    assert claims_of(renewed["access_token"])["iat"] >= int(nbf["value"])
    assert graph(dt_server, renewed["access_token"]).status_code == 200


def test_revoke_requiring_sign_in_passes_the_challenge_to_the_client(
    dt_server: Server, msal_app, revocations
) -> None:
    tenant = dt_server.tenant
    cae = msal_app(client_capabilities=["cp1"])
    old_assertion = tenant.api_token("nestor")
    first = cae.acquire_token_on_behalf_of(old_assertion, GRAPH_DEFAULT)
    revoked = dt_server.post("/_devtenant/revoke", json={"user": "nestor", "require_sign_in": True})
    assert revoked.status_code == 200 and revoked.json()["require_sign_in"] is True
    claims = challenge_claims(graph(dt_server, first["access_token"]))

    refused = cae.acquire_token_on_behalf_of(old_assertion, GRAPH_DEFAULT, claims_challenge=claims)
    assert refused["error"] == "interaction_required" and refused["error_codes"] == [50173], refused
    assert json.loads(refused["claims"]) == json.loads(claims)  # what the API hands the SPA

    new_assertion = tenant.api_token("nestor")  # the SPA signed in again
    assert claims_of(new_assertion)["iat"] >= revoked.json()["at"]
    renewed = cae.acquire_token_on_behalf_of(new_assertion, GRAPH_DEFAULT, claims_challenge=claims)
    assert graph(dt_server, renewed["access_token"]).status_code == 200, renewed


def test_revoke_requiring_mfa(dt_server: Server, msal_app, revocations) -> None:
    tenant = dt_server.tenant
    tenant.revoke("megan", require_mfa=True)
    app = msal_app()
    no_mfa = app.acquire_token_on_behalf_of(tenant.api_token("megan"), GRAPH_DEFAULT)
    assert no_mfa["error"] == "interaction_required" and no_mfa["error_codes"] == [50079], no_mfa
    assert '"capolids"' in no_mfa["claims"]
    ok = app.acquire_token_on_behalf_of(tenant.api_token("megan", mfa=True), GRAPH_DEFAULT)
    assert "access_token" in ok, ok
    # The other tenant's Megan is another user: not revoked.
    other = msal_app(tenant=SECOND_TENANT_ID).acquire_token_on_behalf_of(
        tenant.api_token("megan", tenant=SECOND_TENANT_ID), GRAPH_DEFAULT
    )
    assert "access_token" in other, other
