"""Contoso Tasks API, the second downstream API: its registration, consent, token checks,
and real msal holding Graph and Tasks API tokens for one user in one cache."""

from __future__ import annotations

import pytest
import requests
from flask.testing import FlaskClient

import devtenant
from devtenant import (
    API_CLIENT_SECRET,
    GRAPH_RESOURCE,
    TASKS_API_CLIENT_ID,
    TASKS_API_RESOURCE,
    TENANT_ID,
)
from devtenant.directory import Directory
from tests.devtenant.conftest import BASE, Server, TokenEndpoint, claims_of

TASKS_PATH = "/tasks-api/v1/me/tasks"
TASKS_DEFAULT = f"{TASKS_API_RESOURCE}/.default"
TASKS_READ = f"{TASKS_API_RESOURCE}/Tasks.Read"
TASKS_READWRITE = f"{TASKS_API_RESOURCE}/Tasks.ReadWrite"

# ``dt_server`` / ``msal_app`` (conftest): a real ``python -m devtenant serve`` and msal
# factory; this module gets its own server (the fixture is module-scoped).

def tasks_token(dt_token: TokenEndpoint, user: str, scope: str = TASKS_DEFAULT) -> str:
    response = dt_token.obo_for(user, scope=f"{scope} openid profile offline_access")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["access_token"]


def get_tasks(client: FlaskClient, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.get(TASKS_PATH, base_url=BASE, headers=headers)


def test_registration_and_consent_match_the_constants() -> None:
    directory = Directory.load()
    tasks = directory.app_by_key("tasks")
    assert tasks.display_name == "Contoso Tasks API"
    assert tasks.client_id == TASKS_API_CLIENT_ID and tasks.identifier == TASKS_API_RESOURCE
    assert tasks.audience == TASKS_API_CLIENT_ID  # v2 token for a custom API: aud is its GUID
    assert tasks.scopes == devtenant.TASKS_API_SCOPES
    assert directory.app(TASKS_API_RESOURCE) is tasks
    api = directory.app_by_key("api")
    assert directory.delegated_grant(api, tasks) == devtenant.TASKS_API_DELEGATED_PERMISSIONS


@pytest.mark.parametrize("scope", [TASKS_DEFAULT, TASKS_READ])
def test_obo_token_is_for_the_tasks_api_and_lists_the_users_tasks(dt_token: TokenEndpoint, scope) -> None:
    response = dt_token.obo_for("adele", scope=f"{scope} openid profile offline_access").get_json()
    assert response["scope"] == f"{TASKS_READ} openid profile email"
    claims = claims_of(response["access_token"])
    assert claims["aud"] == TASKS_API_CLIENT_ID and claims["scp"] == "Tasks.Read"
    body = get_tasks(dt_token.client, response["access_token"]).get_json()
    assert body["owner"] == claims["oid"]
    assert [t["title"] for t in body["value"]] == [
        "Send Adele's weekly status report", "Review expense claims",
    ]  # fmt: skip
    assert {t["assignedTo"] for t in body["value"]} == {"adele@flaskobodev.onmicrosoft.com"}
    again = get_tasks(dt_token.client, tasks_token(dt_token, "adele")).get_json()
    assert again == body  # deterministic per user
    nestor = get_tasks(dt_token.client, tasks_token(dt_token, "nestor")).get_json()
    assert nestor["owner"] != body["owner"]
    assert not {t["id"] for t in nestor["value"]} & {t["id"] for t in body["value"]}


def test_unconsented_scope_is_refused_by_the_token_endpoint(dt_token: TokenEndpoint) -> None:
    response = dt_token.obo_for("adele", scope=f"{TASKS_READWRITE} openid profile offline_access")
    assert response.status_code == 400
    body = response.get_json()
    assert body["error"] == "invalid_grant" and body["suberror"] == "consent_required"
    assert body["error_codes"] == [65001]


@pytest.mark.parametrize("kind", ["missing", "garbage", "graph_token", "api_token", "expired", "tampered"])
def test_bad_tokens_get_401_invalid_token(dt_token: TokenEndpoint, dt_tenant, kind) -> None:
    runtime = dt_token.client.application.extensions["devtenant"]
    tokens = {
        "missing": None,
        "garbage": "abc.def.ghi",
        "graph_token": None,
        "api_token": dt_tenant.api_token("adele"),  # the SPA's token for flask-obo itself
        "expired": None,
        "tampered": None,
    }
    if kind == "graph_token":
        tokens[kind] = dt_token.obo_for("adele").get_json()["access_token"]
    elif kind == "expired":
        tokens[kind] = runtime.minter.user_token(
            issuer=f"{BASE}/{TENANT_ID}/v2.0",
            audience=TASKS_API_CLIENT_ID,
            user=runtime.directory.require_user("adele"),
            azp=devtenant.API_CLIENT_ID,
            azpacr="1",
            scp=["Tasks.Read"],
            lifetime=600,
            expired=True,
        )
    elif kind == "tampered":
        tokens[kind] = tasks_token(dt_token, "adele")[:-4] + "AAAA"
    response = get_tasks(dt_token.client, tokens[kind])
    assert response.status_code == 401, response.get_json()
    assert response.get_json()["error"] == "invalid_token"
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer error="invalid_token", error_description="')
    if kind == "graph_token":
        assert f"Invalid audience '{GRAPH_RESOURCE}'" in response.get_json()["error_description"]
    if kind == "expired":
        assert "expired" in response.get_json()["error_description"]


def test_token_without_a_tasks_scope_gets_403(dt_token: TokenEndpoint) -> None:
    app_only = dt_token.post({
        "grant_type": "client_credentials",
        "scope": TASKS_DEFAULT,
        "client_id": devtenant.API_CLIENT_ID,
        "client_secret": API_CLIENT_SECRET,
    }).get_json()["access_token"]  # fmt: skip
    assert claims_of(app_only)["aud"] == TASKS_API_CLIENT_ID  # right audience, no scp
    response = get_tasks(dt_token.client, app_only)
    assert response.status_code == 403
    assert response.get_json()["error"] == "insufficient_scope"
    assert response.headers["WWW-Authenticate"].startswith('Bearer error="insufficient_scope"')


def test_counters_count_tasks_api_calls_apart_from_graph(dt_token: TokenEndpoint) -> None:
    client = dt_token.client
    assert client.get("/_devtenant/counters").get_json()["tasks_api"] == {TASKS_PATH: 0, "errors": 0}
    token = tasks_token(dt_token, "megan")
    get_tasks(client, token)
    get_tasks(client, token)
    get_tasks(client, None)
    counters = client.get("/_devtenant/counters").get_json()
    assert counters["tasks_api"] == {TASKS_PATH: 3, "errors": 1}
    assert counters["tasks_api_errors"] == {"401": 1}
    assert counters["graph"] == {"/v1.0/me": 0, "/v1.0/me/manager": 0, "errors": 0}
    reset = client.post("/_devtenant/counters/reset").get_json()
    assert reset["tasks_api"] == {TASKS_PATH: 0, "errors": 0}


def test_short_scope_form_only_shortens_graph(dt_token: TokenEndpoint) -> None:
    """Entra names a custom API's scopes fully qualified: a bare name would mean Graph."""
    dt_token.client.post("/_devtenant/config", json={"short_scopes": True})
    graph = dt_token.obo_for("adele").get_json()
    assert graph["scope"] == "User.Read User.ReadBasic.All openid profile email"
    tasks = dt_token.obo_for("adele", scope=f"{TASKS_DEFAULT} openid profile").get_json()
    assert tasks["scope"] == f"{TASKS_READ} openid profile email"


# --- real msal against a real server ----------------------------------------------------


def test_one_msal_cache_serves_graph_and_tasks_api(dt_server: Server, msal_app) -> None:
    app = msal_app()
    assertion = dt_server.tenant.api_token("adele")
    graph = app.acquire_token_on_behalf_of(assertion, [f"{GRAPH_RESOURCE}/.default"])
    tasks = app.acquire_token_on_behalf_of(assertion, [TASKS_DEFAULT])
    assert "access_token" in graph, graph
    assert "access_token" in tasks, tasks
    explicit = msal_app().acquire_token_on_behalf_of(assertion, [TASKS_READ])
    assert claims_of(explicit["access_token"])["scp"] == "Tasks.Read"

    def call(path: str, token: str) -> requests.Response:
        return dt_server.get(path, headers={"Authorization": f"Bearer {token}"})

    for token in (tasks["access_token"], explicit["access_token"]):
        listed = call(TASKS_PATH, token)
        assert listed.status_code == 200, listed.text
        assert listed.json()["owner"] == claims_of(token)["oid"] and len(listed.json()["value"]) == 2
    assert call("/v1.0/me", graph["access_token"]).json()["displayName"] == "Adele Vance"
    refused = call(TASKS_PATH, graph["access_token"])  # a Graph token is not for this API
    assert refused.status_code == 401 and "audience" in refused.json()["error_description"]
    assert call("/v1.0/me", tasks["access_token"]).status_code == 401

    [account] = app.get_accounts()  # one user, one account, two resources
    dt_server.post("/_devtenant/counters/reset")
    for scopes in ([f"{GRAPH_RESOURCE}/User.Read"], [TASKS_READ]):
        cached = app.acquire_token_silent(scopes, account=account)
        assert cached["token_source"] == "cache", scopes
    assert dt_server.counters()["token"]["refresh_token"] == 0
    refreshed = app.acquire_token_silent([TASKS_READ], account=account, force_refresh=True)
    assert refreshed["token_source"] == "identity_provider"
    assert claims_of(refreshed["access_token"])["aud"] == TASKS_API_CLIENT_ID
    assert call(TASKS_PATH, refreshed["access_token"]).status_code == 200


def test_msal_sees_consent_required_for_unconsented_tasks_scope(dt_server: Server, msal_app) -> None:
    result = msal_app().acquire_token_on_behalf_of(dt_server.tenant.api_token("adele"), [TASKS_READWRITE])
    assert result["error"] == "invalid_grant" and result["suberror"] == "consent_required"
    assert result["error_codes"] == [65001]
