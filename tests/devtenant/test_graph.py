"""Graph /v1.0/me and /v1.0/me/manager: $select, manager chain, Graph-shaped errors."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from devtenant import API_CLIENT_SECRET, GRAPH_APP_ID, GRAPH_RESOURCE, TENANT_ID
from tests.devtenant.conftest import BASE, TokenEndpoint

DEFAULT_PROPERTIES = {
    "id", "displayName", "givenName", "surname", "userPrincipalName", "mail", "jobTitle",
    "officeLocation", "businessPhones", "mobilePhone", "preferredLanguage",
}  # fmt: skip


def graph_token(dt_token: TokenEndpoint, user: str, **kwargs) -> str:
    response = dt_token.obo_for(user, **kwargs)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["access_token"]


def get(client: FlaskClient, path: str, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.get(path, base_url=BASE, headers=headers)


def assert_graph_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == code and error["message"]
    assert set(error["innerError"]) == {"date", "request-id", "client-request-id"}
    return error


def test_me_full_and_select(dt_token: TokenEndpoint) -> None:
    token = graph_token(dt_token, "adele")
    full = get(dt_token.client, "/v1.0/me", token).get_json()
    assert full["@odata.context"] == f"{BASE}/v1.0/$metadata#users/$entity"
    assert set(full) - {"@odata.context"} == DEFAULT_PROPERTIES
    assert full["jobTitle"] == "Retail Manager"
    picked = get(dt_token.client, "/v1.0/me?$select=displayName,MAIL, id", token).get_json()
    assert picked == {
        "@odata.context": f"{BASE}/v1.0/$metadata#users(displayName,mail,id)/$entity",
        "displayName": "Adele Vance",
        "mail": "adele@flaskobodev.onmicrosoft.com",
        "id": full["id"],
    }
    bad = get(dt_token.client, "/v1.0/me?$select=shoeSize", token)
    assert "shoeSize" in assert_graph_error(bad, 400, "BadRequest")["message"]


def test_manager_chain_and_patti_has_none(dt_token: TokenEndpoint) -> None:
    adele_boss = get(dt_token.client, "/v1.0/me/manager", graph_token(dt_token, "adele")).get_json()
    assert adele_boss["@odata.type"] == "#microsoft.graph.user"
    assert adele_boss["displayName"] == "Nestor Wilke"
    assert "@odata.context" in adele_boss
    nestor_boss = get(
        dt_token.client, "/v1.0/me/manager?$select=displayName", graph_token(dt_token, "nestor")
    ).get_json()
    assert nestor_boss["displayName"] == "Patti Fernandez" and "mail" not in nestor_boss
    patti = get(dt_token.client, "/v1.0/me/manager", graph_token(dt_token, "patti"))
    error = assert_graph_error(patti, 404, "Request_ResourceNotFound")
    assert error["message"] == (
        "Resource 'manager' does not exist or one of its queried reference-property objects are not present."
    )


@pytest.mark.parametrize("kind", ["missing", "garbage", "expired", "api_token", "tampered"])
def test_invalid_tokens_get_401_with_challenge(dt_token: TokenEndpoint, dt_tenant, kind) -> None:
    tokens = {
        "missing": None,
        "garbage": "abc.def.ghi",
        "expired": None,
        "api_token": dt_tenant.api_token("adele"),  # audience is the API, not Graph
        "tampered": graph_token(dt_token, "adele")[:-4] + "AAAA",
    }
    if kind == "expired":  # mint an expired Graph token with the app's own minter
        runtime = dt_token.client.application.extensions["devtenant"]
        tokens["expired"] = runtime.minter.user_token(
            issuer=f"{BASE}/{TENANT_ID}/v2.0",
            audience=GRAPH_RESOURCE,
            user=runtime.directory.require_user("adele"),
            azp="x",
            azpacr="1",
            scp=["User.Read"],
            lifetime=600,
            expired=True,
        )
    response = get(dt_token.client, "/v1.0/me", tokens[kind])
    error = assert_graph_error(response, 401, "InvalidAuthenticationToken")
    if kind == "expired":
        assert "expired" in error["message"]
    challenge = response.headers["WWW-Authenticate"]
    assert challenge == (
        f'Bearer realm="", authorization_uri="{BASE}/{TENANT_ID}/oauth2/authorize", '
        f'client_id="{GRAPH_APP_ID}"'
    )


def test_app_only_token_cannot_use_me(dt_token: TokenEndpoint) -> None:
    data = {
        "grant_type": "client_credentials",
        "scope": f"{GRAPH_RESOURCE}/.default",
        "client_id": "5e1a7c3d-2b9f-4e6a-8d0c-1f7b3a9e2c64",
        "client_secret": API_CLIENT_SECRET,
    }
    token = dt_token.post(data).get_json()["access_token"]
    assert_graph_error(get(dt_token.client, "/v1.0/me", token), 400, "BadRequest")


def test_graph_echoes_client_request_id(dt_token: TokenEndpoint) -> None:
    response = dt_token.client.get("/v1.0/me", base_url=BASE, headers={"client-request-id": "cid-7"})
    assert response.get_json()["error"]["innerError"]["client-request-id"] == "cid-7"
    assert response.headers["client-request-id"] == "cid-7"
