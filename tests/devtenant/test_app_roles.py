"""The dev tenant's daemons: client credentials from client applications assigned app
roles on the API (``roles``, ``idtyp: app``) or none; Graph's ``/users/{id}`` for app
tokens; the knob that issues short-lived or slow app tokens."""

from __future__ import annotations

import time

from devtenant import (
    API_APP_ID_URI,
    API_APP_ROLE,
    API_CLIENT_ID,
    API_CLIENT_SECRET,
    DAEMON_CLIENT_ID,
    DAEMON_CLIENT_SECRET,
    GRAPH_RESOURCE,
    UNASSIGNED_DAEMON_CLIENT_ID,
    UNASSIGNED_DAEMON_CLIENT_SECRET,
)
from tests.devtenant.conftest import TokenEndpoint, claims_of
from tests.devtenant.test_graph import assert_graph_error, get, graph_token

ADELE_OID = "b7e3f1a2-4c5d-4e6f-8a9b-0c1d2e3f4a51"


def client_credentials(dt_token: TokenEndpoint, client_id: str, secret: str, resource: str):
    return dt_token.post({"grant_type": "client_credentials", "scope": f"{resource}/.default",
                          "client_id": client_id, "client_secret": secret})


def test_a_daemon_assigned_the_apis_app_role_gets_it_in_an_app_token(dt_token: TokenEndpoint) -> None:
    response = client_credentials(dt_token, DAEMON_CLIENT_ID, DAEMON_CLIENT_SECRET, API_APP_ID_URI)
    assert response.status_code == 200, response.get_json()
    claims = claims_of(response.get_json()["access_token"])
    assert claims["roles"] == [API_APP_ROLE] and claims["idtyp"] == "app" and "scp" not in claims
    assert claims["azp"] == DAEMON_CLIENT_ID and claims["aud"] == API_CLIENT_ID


def test_a_daemon_without_app_roles_gets_a_token_without_roles(dt_token: TokenEndpoint) -> None:
    """As Entra ID: a token is issued, with no ``roles`` claim; the API decides."""
    response = client_credentials(dt_token, UNASSIGNED_DAEMON_CLIENT_ID, UNASSIGNED_DAEMON_CLIENT_SECRET,
                                  API_APP_ID_URI)
    claims = claims_of(response.get_json()["access_token"])
    assert "roles" not in claims and claims["idtyp"] == "app" and "scp" not in claims


def test_graph_users_takes_app_tokens_with_user_read_all(dt_token: TokenEndpoint) -> None:
    app = client_credentials(dt_token, API_CLIENT_ID, API_CLIENT_SECRET, GRAPH_RESOURCE).get_json()
    response = get(dt_token.client, f"/v1.0/users/{ADELE_OID}?$select=displayName", app["access_token"])
    assert response.status_code == 200 and response.get_json()["displayName"] == "Adele Vance"
    assert_graph_error(get(dt_token.client, "/v1.0/users/nobody@example.com", app["access_token"]),
                       404, "Request_ResourceNotFound")
    no_role = client_credentials(dt_token, DAEMON_CLIENT_ID, DAEMON_CLIENT_SECRET, GRAPH_RESOURCE).get_json()
    assert_graph_error(get(dt_token.client, f"/v1.0/users/{ADELE_OID}", no_role["access_token"]),
                       403, "Authorization_RequestDenied")
    delegated = graph_token(dt_token, "adele")  # User.ReadBasic.All is consented
    assert get(dt_token.client, f"/v1.0/users/{ADELE_OID}", delegated).status_code == 200


def test_app_tokens_can_be_issued_short_lived_and_slowly(dt_token: TokenEndpoint) -> None:
    client = dt_token.client
    try:
        assert client.post("/_devtenant/app-tokens", json={"lifetime": 240, "delay": 0.2}).get_json() == {
            "lifetime": 240, "delay": 0.2}
        started = time.monotonic()
        body = client_credentials(dt_token, API_CLIENT_ID, API_CLIENT_SECRET, GRAPH_RESOURCE).get_json()
        assert time.monotonic() - started >= 0.2
        claims = claims_of(body["access_token"])
        assert body["expires_in"] == 240 and claims["exp"] - claims["iat"] == 240
        assert client.post("/_devtenant/app-tokens", json={"lifetime": 0}).status_code == 400
        assert client.post("/_devtenant/app-tokens", json={"lifetime": None, "delay": 31}).status_code == 400
    finally:
        client.post("/_devtenant/app-tokens", json={"lifetime": None})
    body = client_credentials(dt_token, API_CLIENT_ID, API_CLIENT_SECRET, GRAPH_RESOURCE).get_json()
    assert body["expires_in"] >= 3600
