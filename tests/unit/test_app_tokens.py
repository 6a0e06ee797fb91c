"""App roles on routes, and the API's own tokens (client credentials): what a daemon caller
and a route calling a downstream API as the app see. msal runs unpatched; HTTP is doubled
(tests/support/fake_entra.py), Redis is fakeredis. The same behaviour against the dev
tenant under gunicorn is tests/e2e/test_app_roles.py."""

from __future__ import annotations

import time

import pytest
import responses
from flask import Flask, jsonify

from flask_obo import FlaskOBO, current_token
from flask_obo.app_tokens import RENEW_AHEAD_SECONDS, app_partition, resource_of
from flask_obo.cache_store import RedisTokenCacheStore
from flask_obo.errors import IdentityProviderUnavailable
from tests.support.fake_entra import ADELE, APP, CLIENT_ID, GRAPH, TENANT_ID, Behaviour, FakeEntra

GRAPH_APP = ["https://graph.microsoft.com/.default"]
ROLE = "Jobs.Run"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def app_token(entra: FakeEntra, roles: list[str] | None = None, **claims) -> str:
    """An app-only token for the API, as a daemon holds it (v2: ``idtyp: app``)."""
    return entra.api_token("c3c3c3c3-0000-4000-8000-000000000003", scp=None, idtyp="app",
                           roles=roles, azp="d4d4d4d4-0000-4000-8000-000000000004", name=None,
                           preferred_username=None, **claims)


def daemon_app(settings, store) -> tuple[Flask, FlaskOBO]:
    """A small API of routes for daemons and users, built from flask_obo's public API."""
    app = Flask(__name__)
    obo = FlaskOBO(app, settings=settings, store=store)

    @app.get("/reports")
    @obo.require_scope(app_roles=[ROLE])
    def reports():
        return jsonify(is_app=current_token.is_app, roles=list(current_token.roles),
                       app_id=current_token.app_id)

    @app.get("/jobs")
    @obo.require_app_role(ROLE, "Jobs.Admin")
    def jobs():
        return jsonify(ok=True)

    @app.get("/me")
    @obo.require_scope(app_roles=[ROLE])
    def me():  # acts on behalf of the caller: an app token cannot
        return jsonify(obo.downstream("graph").get("/me").json())

    @app.get("/org")
    @obo.require_app_role(ROLE)
    def org():  # as the app: whoever calls
        return jsonify(obo.downstream("graph", as_app=True).get("/organization").json())

    return app, obo


@pytest.fixture
def daemon(settings, store):
    return daemon_app(settings, store)


@pytest.fixture
def entra():
    """The Entra ID and Graph double, plus Graph's /organization: it answers 200 to the
    app tokens the double issued, and records which token each request carried."""
    fake = FakeEntra()
    fake.organization_tokens = []

    def organization(request):
        token = request.headers["Authorization"].removeprefix("Bearer ")
        fake.organization_tokens.append(token)
        return (200, {}, '{"value": []}') if token in fake.app_tokens else (401, {}, "{}")

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        fake.register(rsps)
        rsps.add_callback(responses.GET, f"{GRAPH}/organization", callback=organization)
        yield fake


# --- current_token --------------------------------------------------------------------------


def test_an_app_token_is_app_with_its_roles_and_client(daemon, entra) -> None:
    app, _ = daemon
    response = app.test_client().get("/reports", headers=bearer(app_token(entra, [ROLE, "Other"])))
    assert response.status_code == 200
    assert response.json == {"is_app": True, "roles": [ROLE, "Other"],
                             "app_id": "d4d4d4d4-0000-4000-8000-000000000004"}


def test_v1_app_token_is_app_by_roles_without_scp(daemon, entra) -> None:
    """v1 app tokens (and v2 without the optional idtyp) have roles and no scp; their
    client is appid."""
    app, _ = daemon
    token = entra.api_token("c3c3c3c3-0000-4000-8000-000000000003", scp=None, roles=[ROLE], azp=None,
                            appid="e5e5e5e5-0000-4000-8000-000000000005")
    response = app.test_client().get("/reports", headers=bearer(token))
    assert response.status_code == 200
    assert response.json["app_id"] == "e5e5e5e5-0000-4000-8000-000000000005"


def test_a_user_token_with_user_roles_is_not_app(daemon, entra) -> None:
    app, _ = daemon
    response = app.test_client().get("/reports", headers=bearer(entra.api_token(ADELE, roles=["Admin"])))
    assert response.status_code == 200
    assert response.json["is_app"] is False and response.json["roles"] == ["Admin"]


# --- require_scope(app_roles=...), require_app_role ------------------------------------------


def test_an_app_token_without_the_role_gets_403_naming_the_roles(daemon, entra) -> None:
    app, _ = daemon
    client = app.test_client()
    for roles in (["Other"], None):  # another role; no roles claim at all (nothing assigned)
        response = client.get("/reports", headers=bearer(app_token(entra, roles)))
        assert response.status_code == 403
        assert response.json["error"] == "insufficient_scope"
        assert ROLE in response.json["error_description"]
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="flask-obo", error="insufficient_scope"'
        assert response.headers["Cache-Control"] == "no-store"


def test_require_app_role_admits_any_listed_role_and_refuses_users(daemon, entra) -> None:
    app, _ = daemon
    client = app.test_client()
    assert client.get("/jobs", headers=bearer(app_token(entra, ["Jobs.Admin"]))).status_code == 200
    user = client.get("/jobs", headers=bearer(entra.api_token(ADELE)))
    assert user.status_code == 403 and user.json["error"] == "insufficient_scope"
    assert "Jobs.Run, Jobs.Admin" in user.json["error_description"]


def test_without_app_roles_app_tokens_are_refused_as_before(client, entra) -> None:
    response = client.get("/api/me", headers=bearer(app_token(entra, [ROLE])))
    assert response.status_code == 403
    assert 'scope="user_impersonation"' in response.headers["WWW-Authenticate"]


def test_app_roles_must_be_a_list(daemon) -> None:
    _, obo = daemon
    with pytest.raises(TypeError):
        obo.require_scope(app_roles=ROLE)
    with pytest.raises(ValueError):
        obo.require_app_role()


def test_a_delegated_user_still_needs_the_scope(daemon, entra) -> None:
    app, _ = daemon
    response = app.test_client().get("/reports", headers=bearer(entra.api_token(ADELE, scp="other")))
    assert response.status_code == 403
    assert 'scope="user_impersonation"' in response.headers["WWW-Authenticate"]


def test_protect_takes_app_roles(settings, store, entra) -> None:
    from flask import Blueprint

    app = Flask(__name__)
    obo = FlaskOBO(app, settings=settings, store=store)
    bp = Blueprint("bp", __name__)
    obo.protect(bp, app_roles=[ROLE])
    bp.add_url_rule("/x", "x", lambda: "ok")
    app.register_blueprint(bp)
    client = app.test_client()
    assert client.get("/x", headers=bearer(app_token(entra, [ROLE]))).status_code == 200
    assert client.get("/x", headers=bearer(app_token(entra, ["Other"]))).status_code == 403
    assert client.get("/x", headers=bearer(entra.api_token(ADELE))).status_code == 200


def test_an_app_token_on_an_obo_route_is_403_without_any_token_request(daemon, entra) -> None:
    app, _ = daemon
    response = app.test_client().get("/me", headers=bearer(app_token(entra, [ROLE])))
    assert response.status_code == 403
    assert response.json["error"] == "user_token_required"
    assert "on behalf of a signed-in user" in response.json["error_description"]
    assert response.headers["WWW-Authenticate"] == (
        'Bearer realm="flask-obo", error="insufficient_scope", scope="user_impersonation"')
    assert entra.token_requests == []


def test_sign_out_with_an_app_token_is_403(client, entra, settings, store) -> None:
    from app import create_app

    roles_app = create_app(settings.__class__(**{**settings.__dict__, "api_app_role": ROLE}), store=store)
    client = roles_app.test_client()
    assert client.get("/api/whoami", headers=bearer(app_token(entra, [ROLE]))).status_code == 200
    response = client.delete("/api/me/token-cache", headers=bearer(app_token(entra, [ROLE])))
    assert response.status_code == 403  # the users-only blueprint refuses it first
    assert response.json["error"] == "insufficient_scope"


# --- acquire_app_token ----------------------------------------------------------------------


def test_acquire_app_token_outside_a_request_caches_in_memory_and_redis(settings, entra,
                                                                        redis_client) -> None:
    first_app, first = daemon_app(settings, _store(redis_client, settings))
    with first_app.app_context():
        token = first.acquire_app_token(GRAPH_APP)
        assert first.acquire_app_token(GRAPH_APP) == token
    assert token == entra.app_tokens[0] and entra.app_calls() == 1
    # Another process (a new application, its own memory) finds it in Redis.
    second_app, second = daemon_app(settings, _store(redis_client, settings))
    with second_app.app_context():
        assert second.acquire_app_token(GRAPH_APP) == token
    assert entra.app_calls() == 1
    (key,) = redis_client.keys("*")
    partition = app_partition(CLIENT_ID, _key())
    assert key == f"flask-obo:cache:{{{partition}}}".encode()
    assert token.encode() not in redis_client.get(key) and b"app-at" not in redis_client.get(key)


def test_downstream_as_app_sends_the_app_token(daemon, entra) -> None:
    app, _ = daemon
    client = app.test_client()
    for _ in range(3):
        assert client.get("/org", headers=bearer(app_token(entra, [ROLE]))).status_code == 200
    assert entra.organization_tokens == [entra.app_tokens[0]] * 3
    assert entra.app_calls() == 1 and entra.obo_calls() == 0
    form = entra.token_requests[0]
    assert form["scope"] == "https://graph.microsoft.com/.default"


def test_a_due_token_is_served_while_it_is_renewed_in_the_background(daemon, entra) -> None:
    app, obo = daemon
    entra.expires_in = RENEW_AHEAD_SECONDS - 60  # 4 minutes from expiry: due at once
    with app.app_context():
        old = obo.acquire_app_token(GRAPH_APP)
        entra.expires_in = 3600
        assert obo.acquire_app_token(GRAPH_APP) == old  # served at once, renewal started
        _wait_for(lambda: entra.app_calls() == 2)
        new = entra.app_tokens[1]
        _wait_for(lambda: obo.acquire_app_token(GRAPH_APP) == new)
        for _ in range(5):
            assert obo.acquire_app_token(GRAPH_APP) == new
    assert entra.app_calls() == 2


def test_an_unexpired_token_is_served_while_entra_is_down(daemon, entra) -> None:
    app, obo = daemon
    entra.expires_in = RENEW_AHEAD_SECONDS - 60
    with app.app_context():
        token = obo.acquire_app_token(GRAPH_APP)
        entra.behaviours[APP] = Behaviour("server_error")
        for _ in range(20):
            assert obo.acquire_app_token(GRAPH_APP) == token
        _wait_for(lambda: entra.app_calls() >= 2)  # the renewal was tried, and failed quietly
        assert obo.acquire_app_token(GRAPH_APP) == token
        assert entra.app_calls() == 2  # and is not retried on every request
    # A cold process has nothing to serve: Entra ID's outage is its answer.
    other_app, other = daemon_app(app.extensions["flask-obo"].settings, memory_store())
    with other_app.app_context(), pytest.raises(IdentityProviderUnavailable):
        other.acquire_app_token(GRAPH_APP)


def test_with_redis_down_a_token_is_acquired_and_kept_in_memory(settings, entra) -> None:
    import fakeredis

    server = fakeredis.FakeServer()
    server.connected = False  # every command fails as with Redis unreachable
    app, obo = daemon_app(settings, _store(fakeredis.FakeRedis(server=server), settings))
    with app.app_context():
        token = obo.acquire_app_token(GRAPH_APP)
        for _ in range(5):
            assert obo.acquire_app_token(GRAPH_APP) == token
    assert entra.app_calls() == 1


def test_entra_refusing_the_api_is_a_502(daemon, entra) -> None:
    app, _ = daemon
    entra.behaviours[APP] = Behaviour("bad_client")
    response = app.test_client().get("/org", headers=bearer(app_token(entra, [ROLE])))
    assert response.status_code == 502 and response.json["error"] == "token_acquisition_failed"


@pytest.mark.parametrize("scopes", [["https://graph.microsoft.com/User.Read"], [], ["/.default"],
                                    ["a/.default", "b/.default"]])
def test_app_tokens_take_one_default_scope(scopes) -> None:
    with pytest.raises(ValueError):
        resource_of(scopes)
    with pytest.raises(TypeError):
        resource_of("https://graph.microsoft.com/.default")


def test_a_tenant_the_api_does_not_serve_is_refused(daemon) -> None:
    app, obo = daemon
    with app.app_context():
        with pytest.raises(ValueError):
            obo.acquire_app_token(GRAPH_APP, tenant="not-a-guid")
        with pytest.raises(ValueError):
            obo.acquire_app_token(GRAPH_APP, tenant="0c0c0c0c-0000-4000-8000-00000000000c")


# --- helpers --------------------------------------------------------------------------------


def _key():
    from flask_obo.app_tokens import AppTokenKey

    return AppTokenKey(TENANT_ID, "https://graph.microsoft.com")


def _store(redis_client, settings) -> RedisTokenCacheStore:
    return RedisTokenCacheStore(redis_client, settings.token_cache_prefix, settings.token_cache_ttl_seconds)


def memory_store():
    """A process of its own with no Redis: nothing cached for it anywhere."""
    from flask_obo.cache_store import MemoryTokenCacheStore

    return MemoryTokenCacheStore(3600)


def _wait_for(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within 5 s"
        time.sleep(0.01)


# --- settings -------------------------------------------------------------------------------


def test_app_scopes_default_to_the_resources_default_scope() -> None:
    from flask_obo import Settings
    from tests.support.fake_entra import settings_env

    settings = Settings.from_env(settings_env(
        DOWNSTREAM_APIS__TASKS__BASE_URL="https://tasks.contoso.example",
        DOWNSTREAM_APIS__TASKS__SCOPES="api://tasks/Tasks.Read",
        DOWNSTREAM_APIS__REPORTS__BASE_URL="https://reports.contoso.example",
        DOWNSTREAM_APIS__REPORTS__SCOPES="api://reports/Reports.Read",
        DOWNSTREAM_APIS__REPORTS__APP_SCOPES="api://reports-app/.default",
        GRAPH_SCOPES="User.Read", API_APP_ROLE="Jobs.Run"))
    apis = settings.downstream_apis
    assert apis["graph"].app_scopes == ("https://graph.microsoft.com/.default",)  # a bare name is Graph's
    assert apis["tasks"].app_scopes == ("api://tasks/.default",)
    assert apis["reports"].app_scopes == ("api://reports-app/.default",)
    assert settings.api_app_role == "Jobs.Run"
    assert Settings.from_env(settings_env()).api_app_role is None


@pytest.mark.parametrize(("name", "value"), [
    ("GRAPH_APP_SCOPES", "https://graph.microsoft.com/User.Read.All"),
    ("GRAPH_APP_SCOPES", "a/.default b/.default"),
    ("DOWNSTREAM_APIS__TASKS__APP_SCOPES", "Tasks.Read"),
    ("API_APP_ROLE", 'Jobs "Run"'),
])
def test_bad_app_settings_are_named(name: str, value: str) -> None:
    from flask_obo import Settings, SettingsError
    from tests.support.fake_entra import settings_env

    env = settings_env(DOWNSTREAM_APIS__TASKS__BASE_URL="https://tasks.contoso.example",
                       DOWNSTREAM_APIS__TASKS__SCOPES="api://tasks/Tasks.Read", **{name: value})
    with pytest.raises(SettingsError, match=f"^{name}: "):
        Settings.from_env(env)


def test_whoami_with_an_app_role_is_described_and_answers_as_described(settings, store, entra) -> None:
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    from app import create_app

    app = create_app(settings.__class__(**{**settings.__dict__, "api_app_role": ROLE}), store=store)
    client = app.test_client()
    document = client.get("/openapi.json").get_json()
    (name, scheme), = document["components"]["securitySchemes"].items()
    app_scope = f"api://{CLIENT_ID}/.default"
    assert list(scheme["flows"]["clientCredentials"]["scopes"]) == [app_scope]
    assert {name: [app_scope]} in document["paths"]["/api/whoami"]["get"]["security"]
    assert ROLE in document["paths"]["/api/whoami"]["get"]["summary"]
    registry = Registry().with_resource("urn:doc", Resource.from_contents(
        document, default_specification=DRAFT202012))
    validator = Draft202012Validator({"$ref": "urn:doc#/components/schemas/Whoami"}, registry=registry)
    for token in (app_token(entra, [ROLE]), entra.api_token(ADELE)):
        response = client.get("/api/whoami", headers=bearer(token))
        assert response.status_code == 200
        validator.validate(response.get_json())
