"""Test hooks: counters per grant type / Graph path, reset, config switch, health."""

from __future__ import annotations

from flask.testing import FlaskClient

from devtenant import TENANT_ID
from tests.devtenant.conftest import BASE, TokenEndpoint


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
    assert dt_client.get("/_devtenant/config").get_json() == {"short_scopes": False}
    assert dt_client.post("/_devtenant/config", json={"short_scopes": "yes"}).status_code == 400
    assert dt_client.post("/_devtenant/config", json={"short_scopes": True}).status_code == 200
    assert dt_client.get("/_devtenant/config").get_json() == {"short_scopes": True}


def test_healthz(dt_client: FlaskClient, dt_tenant) -> None:
    body = dt_client.get("/healthz").get_json()
    assert body["status"] == "ok" and body["tenant"] == TENANT_ID
    assert body["kid"] == dt_tenant.active_kid()
