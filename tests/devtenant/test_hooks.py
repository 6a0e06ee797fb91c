"""Test hooks: counters per grant type / Graph path, reset, config switch, health."""

from __future__ import annotations

from flask.testing import FlaskClient

from devtenant import TENANT_ID
from tests.devtenant.conftest import BASE, TokenEndpoint, claims_of


def test_counters_count_grants_errors_and_graph_paths(dt_token: TokenEndpoint) -> None:
    client = dt_token.client
    zero = client.get("/_devtenant/counters").get_json()
    assert zero["token"] == {
        "authorization_code": 0, "on_behalf_of": 0, "refresh_token": 0, "client_credentials": 0,
        "other": 0, "errors": 0,
    }  # fmt: skip
    ok = dt_token.obo_for("adele").get_json()
    dt_token.obo_for("lynne")  # consent error
    dt_token.refresh(ok["refresh_token"])
    dt_token.post({"grant_type": "password"})
    headers = {"Authorization": f"Bearer {ok['access_token']}"}
    client.get("/v1.0/me", base_url=BASE, headers=headers)
    client.get("/v1.0/me", base_url=BASE, headers=headers)
    client.get("/v1.0/me/manager", base_url=BASE)  # 401
    counters = client.get("/_devtenant/counters").get_json()
    assert counters["token"] == {
        "authorization_code": 0, "on_behalf_of": 2, "refresh_token": 1, "client_credentials": 0,
        "other": 1, "errors": 2,
    }  # fmt: skip
    assert counters["token_errors"] == {"invalid_grant": 1, "unsupported_grant_type": 1}
    assert counters["graph"] == {"/v1.0/me": 2, "/v1.0/me/manager": 1, "errors": 1}
    reset = client.post("/_devtenant/counters/reset").get_json()
    assert reset["token"]["on_behalf_of"] == 0 and reset["graph"]["/v1.0/me"] == 0


def test_config_switch_validates_input(dt_client: FlaskClient) -> None:
    assert dt_client.get("/_devtenant/config").get_json() == {
        "short_scopes": False, "access_token_lifetime": None}
    assert dt_client.post("/_devtenant/config", json={"short_scopes": "yes"}).status_code == 400
    assert dt_client.post("/_devtenant/config", json={"short_scopes": True}).status_code == 200
    assert dt_client.get("/_devtenant/config").get_json() == {
        "short_scopes": True, "access_token_lifetime": None}
    for bad in ({}, {"access_token_lifetime": "240"}, {"access_token_lifetime": 5},
                {"access_token_lifetime": True}):
        assert dt_client.post("/_devtenant/config", json=bad).status_code == 400
    assert dt_client.get("/_devtenant/config").get_json()["short_scopes"] is True  # untouched


def test_access_token_lifetime_switch_issues_short_lived_tokens(
        dt_client: FlaskClient, dt_token: TokenEndpoint) -> None:
    answer = dt_client.post("/_devtenant/config", json={"access_token_lifetime": 240}).get_json()
    assert answer == {"short_scopes": False, "access_token_lifetime": 240}
    body = dt_token.obo_for("adele").get_json()
    claims = claims_of(body["access_token"])
    assert body["expires_in"] == 240 and claims["exp"] - claims["iat"] == 240
    refreshed = dt_token.refresh(body["refresh_token"]).get_json()
    assert refreshed["expires_in"] == 240
    dt_client.post("/_devtenant/config", json={"access_token_lifetime": None})
    assert dt_token.obo_for("adele").get_json()["expires_in"] >= 3600  # Entra's 60-90 minutes


def test_healthz(dt_client: FlaskClient, dt_tenant) -> None:
    body = dt_client.get("/healthz").get_json()
    assert body["status"] == "ok" and body["tenant"] == TENANT_ID
    assert body["kid"] == dt_tenant.active_kid()
