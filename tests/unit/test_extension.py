"""FlaskOBO as a user's own Flask API adopts it: settings from ``app.config``, views and
blueprints protected with the public API, ``downstream(name)``, clear errors for misuse."""

from __future__ import annotations

import pytest
from flask import Blueprint, Flask

from flask_obo import FlaskOBO, SettingsError, current_token
from flask_obo.extension import services_of
from tests.support.fake_entra import ADELE, GRAPH, FakeEntra, settings_env

OTHER_API = "https://tasks.example.com/v1"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def users_app(obo: FlaskOBO, **config: str) -> Flask:
    """A user's API: its own app, its own routes, flask-obo for auth and downstream calls."""
    app = Flask(__name__)
    app.config.update(settings_env(**config))
    obo.init_app(app)

    @app.get("/profile")
    @obo.require_scope("user_impersonation")
    def profile():
        me = obo.downstream("graph").get("/me").json()
        return {"oid": current_token.oid, "name": me["displayName"]}

    @app.get("/admin")
    @obo.require_scope("Admin.Manage")
    def admin():
        return {"ok": True}

    reports = Blueprint("reports", __name__, url_prefix="/reports")
    obo.protect(reports)

    @reports.get("/mine")
    def mine():
        return {"tid": current_token.tid, "scopes": sorted(current_token.scopes)}

    app.register_blueprint(reports)
    return app


def test_a_users_app_is_protected_and_calls_graph_as_the_user(entra: FakeEntra, monkeypatch):
    for name in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)  # settings come from app.config alone
    client = users_app(FlaskOBO()).test_client()
    token = entra.api_token(ADELE)

    assert client.get("/profile").status_code == 401
    response = client.get("/profile", headers=bearer(token))
    assert response.status_code == 200
    assert response.json["oid"] == ADELE and response.json["name"]
    assert response.headers["Cache-Control"] == "no-store"
    assert entra.obo_calls() == 1

    forbidden = client.get("/admin", headers=bearer(token))
    assert forbidden.status_code == 403
    assert forbidden.json["error"] == "insufficient_scope"
    assert 'scope="Admin.Manage"' in forbidden.headers["WWW-Authenticate"]

    assert client.get("/reports/mine").status_code == 401
    assert client.get("/reports/mine", headers=bearer(token)).json["scopes"] == ["user_impersonation"]
    preflight = {"Origin": "https://spa.example", "Access-Control-Request-Method": "GET"}
    assert client.options("/reports/mine", headers=preflight).status_code == 200  # carries no token
    assert client.options("/reports/mine").status_code == 401  # a plain OPTIONS is no preflight
    assert client.options("/reports/mine", headers={"Origin": "https://spa.example"}).status_code == 401


def test_a_views_own_options_handler_is_protected_unless_the_request_is_a_preflight(entra: FakeEntra):
    obo = FlaskOBO()
    app = Flask(__name__)
    app.config.update(settings_env())
    obo.init_app(app)
    reports = Blueprint("reports", __name__, url_prefix="/reports")
    obo.protect(reports)

    @reports.route("/mine", methods=["GET", "OPTIONS"])
    def mine():  # answers OPTIONS itself, with data that needs the caller's token
        return {"tid": current_token.tid}

    app.register_blueprint(reports)
    client = app.test_client()
    assert client.options("/reports/mine").status_code == 401
    response = client.options("/reports/mine", headers=bearer(entra.api_token(ADELE)))
    assert response.status_code == 200 and response.json["tid"]
    # Anyone can add the preflight's two headers: that must not run the view without a token.
    spoofed = client.options("/reports/mine", headers={"Origin": "https://evil.example",
                                                       "Access-Control-Request-Method": "GET"})
    assert spoofed.status_code == 401 and "tid" not in spoofed.json


def test_one_extension_object_serves_two_apps_with_their_own_settings(entra: FakeEntra):
    obo = FlaskOBO()
    first = users_app(obo, API_REQUIRED_SCOPE="user_impersonation")
    second = users_app(obo, TOKEN_CACHE_PREFIX="second")
    assert services_of(first).settings.token_cache_prefix == "flask-obo"
    assert services_of(second).settings.token_cache_prefix == "second"
    assert second.test_client().get("/profile", headers=bearer(entra.api_token())).status_code == 200


def test_prefixed_env_settings_name_more_downstream_apis(entra: FakeEntra, monkeypatch):
    """``app.config.from_prefixed_env()`` nests ``__`` into dicts; that is undone."""
    monkeypatch.setenv("FLASK_DOWNSTREAM_APIS__TASKS__BASE_URL", OTHER_API)
    monkeypatch.setenv("FLASK_DOWNSTREAM_APIS__TASKS__SCOPES", "api://tasks/.default")
    app = Flask(__name__)
    app.config.update(settings_env())
    app.config.from_prefixed_env()
    obo = FlaskOBO(app)

    with app.app_context():
        tasks = obo.downstream("tasks")
        assert (tasks.base_url, tasks.scopes) == (OTHER_API, ("api://tasks/.default",))
        assert obo.downstream("graph").base_url == GRAPH
        with pytest.raises(LookupError, match="configured: graph, tasks"):
            obo.downstream("mail")


@pytest.mark.parametrize(("variable", "message"), [
    ("DOWNSTREAM_APIS__TASKS__BASEURL", "DOWNSTREAM_APIS__TASKS__BASEURL: unknown"),
    ("DOWNSTREAM_APIS__TASKS__SCOPES", "DOWNSTREAM_APIS__TASKS__BASE_URL: missing"),
    ("DOWNSTREAM_APIS__GRAPH__SCOPES", "graph is set by GRAPH_BASE_URL, GRAPH_SCOPES, GRAPH_APP_SCOPES"),
    ("DOWNSTREAM_APIS__TA-SKS__SCOPES", "the API's name must be letters, digits and _"),
])
def test_a_malformed_downstream_setting_names_the_variable(variable: str, message: str):
    app = Flask(__name__)
    app.config.update(settings_env(**{variable: "api://tasks/.default"}))
    with pytest.raises(SettingsError, match=message):
        FlaskOBO(app)


def test_a_downstream_api_needs_https():
    app = Flask(__name__)
    app.config.update(settings_env(DOWNSTREAM_APIS__TASKS__BASE_URL="http://tasks.example.com",
                                   DOWNSTREAM_APIS__TASKS__SCOPES="api://tasks/.default"))
    with pytest.raises(SettingsError, match="DOWNSTREAM_APIS__TASKS__BASE_URL: must be an https://"):
        FlaskOBO(app)


def test_misuse_gets_a_clear_error(entra: FakeEntra):
    obo = FlaskOBO()
    bare = Flask(__name__)
    with bare.app_context(), pytest.raises(RuntimeError, match=r"init_app\(app\) has not been called"):
        obo.downstream("graph")

    app = users_app(obo)
    with app.test_request_context("/profile", headers=bearer(entra.api_token())):
        obo.authenticate()
        with pytest.raises(TypeError, match="list of scopes"):
            obo.acquire_token("https://graph.microsoft.com/.default")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="relative to the downstream API's base URL"):
            obo.downstream("graph").get("https://evil.example.com/me")


def test_init_app_twice_on_one_app_is_refused(entra: FakeEntra):
    obo = FlaskOBO()
    app = Flask(__name__)
    app.config.update(settings_env())
    obo.init_app(app)
    with pytest.raises(RuntimeError, match="already been called"):
        obo.init_app(app)
    with pytest.raises(RuntimeError, match="already been called"):
        FlaskOBO().init_app(app)  # another FlaskOBO object: the same hooks twice all the same


def test_an_adopters_own_error_pages_and_handlers_stay_theirs(entra: FakeEntra):
    app = users_app(FlaskOBO())

    @app.errorhandler(404)
    def html_not_found(exc):
        return "<h1>Nothing here</h1>", 404, {"Content-Type": "text/html"}

    @app.get("/broken")
    def broken():
        raise KeyError("an unrelated bug")

    app.config["PROPAGATE_EXCEPTIONS"] = False  # as in production: Flask's own 500 page
    client = app.test_client()
    missing = client.get("/no-such-page")
    assert missing.status_code == 404 and missing.mimetype == "text/html"
    assert missing.text == "<h1>Nothing here</h1>"
    failing = client.get("/broken")
    assert failing.status_code == 500 and failing.mimetype == "text/html"  # not flask-obo's JSON
    assert client.get("/profile").json["error"] == "missing_token"  # its own errors: still JSON
