"""Test hooks: counters per grant type / Graph path, reset, config switch, health."""

from __future__ import annotations

import time
from pathlib import Path

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


def test_latency_switch_slows_the_token_endpoint_and_validates_input(dt_token: TokenEndpoint) -> None:
    client = dt_token.client
    assert client.get("/_devtenant/latency").get_json() == {"token_seconds": [0.0, 0.0]}
    for bad in ({"token_seconds": "slow"}, {"token_seconds": [0.3, 0.1]}, {"token_seconds": -1},
                {"token_seconds": [0, 31]}, {"token_seconds": True}, []):
        assert client.post("/_devtenant/latency", json=bad).status_code == 400, bad
    assert client.post("/_devtenant/latency", json={"token_seconds": 0.2}).get_json() == {
        "token_seconds": [0.2, 0.2]}
    started = time.monotonic()
    assert dt_token.obo_for("adele").status_code == 200
    assert time.monotonic() - started >= 0.2  # the answer waited, as a loaded Entra ID's does


def test_load_users_join_the_home_tenant(tmp_path: Path) -> None:
    from devtenant.directory import Directory, load_user_name, write_load_users
    from devtenant.state import ensure_state

    ensure_state(tmp_path)  # the apps' certificates, which a directory reads
    write_load_users(tmp_path, 3)
    directory = Directory.load(tmp_path)
    third = directory.require_user(load_user_name(3))
    assert third.short == "load00003" and third.upn == f"load00003@{directory.domain}"
    assert directory.user(third.oid) is third and directory.user(third.upn.upper()) is third
    assert directory.user("adele") is not None and directory.user(load_user_name(4)) is None
    assert Directory.load(None).user(load_user_name(1)) is None  # no file: none
