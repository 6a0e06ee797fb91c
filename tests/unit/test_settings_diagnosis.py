"""Issue 16 in the small: every bad setting at once, TOKEN_CACHE_KEYS split on commas only,
warnings for misspelt names, the AADSTS codes named, a misconfiguration logged once a
minute and cleared by a success, /readyz 503 for it, and a downstream name that is not
configured answered and logged clearly."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import responses
from cryptography.fernet import Fernet

from app import create_app
from flask_obo import settings as settings_module
from flask_obo.diagnosis import AADSTS, Diagnosis, cause_of_answer, redis_cause
from flask_obo.settings import API_SETTINGS, KNOWN_SETTINGS, Settings, SettingsError
from tests.support.fake_entra import GRAPH, JWKS_URL, METADATA_URL, TOKEN_URL, FakeEntra, settings_env

KEY, OTHER_KEY = Fernet.generate_key().decode(), Fernet.generate_key().decode()


def errors_of(environ: dict[str, str]) -> tuple[str, ...]:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(environ)
    return raised.value.errors


def test_every_bad_setting_is_reported_at_once_one_line_each():
    errors = errors_of(settings_env(AZURE_CLIENT_ID="nope", LOG_LEVEL="loud", REDIS_URL="http://x",
                                    TOKEN_CACHE_TTL_SECONDS="-1", GRAPH_BASE_URL="http://graph"))
    assert [line.partition(":")[0] for line in errors] == [
        "AZURE_CLIENT_ID", "REDIS_URL", "TOKEN_CACHE_TTL_SECONDS", "GRAPH_BASE_URL", "LOG_LEVEL"]
    assert all("\n" not in line for line in errors)


def test_a_missing_setting_is_one_line_not_one_per_check_that_reads_it():
    environ = settings_env()
    del environ["AZURE_TENANT_ID"], environ["AZURE_CLIENT_SECRET"]
    assert errors_of(environ) == (
        "AZURE_CLIENT_SECRET: missing (or set AZURE_CLIENT_CERTIFICATE_PATH, "
        "AZURE_FEDERATED_TOKEN_FILE or AZURE_CLIENT_ASSERTION=managed_identity)",
        "AZURE_TENANT_ID: missing",
    )


@pytest.mark.parametrize("keys", [f"{KEY} {OTHER_KEY}", f"{KEY}\t{OTHER_KEY}", "a b"])
def test_token_cache_keys_separated_by_whitespace_are_refused_naming_the_separator(keys):
    errors = errors_of(settings_env(TOKEN_CACHE_KEYS=keys))
    assert errors == ("TOKEN_CACHE_KEYS: key 1 contains whitespace; separate keys with commas only "
                      "(new,old)",)
    assert KEY not in errors[0]


def test_token_cache_keys_are_split_on_commas_and_a_bad_one_names_its_position():
    assert Settings.from_env(settings_env(TOKEN_CACHE_KEYS=f"{KEY} , {OTHER_KEY}")).token_cache_keys == (
        KEY, OTHER_KEY)
    assert errors_of(settings_env(TOKEN_CACHE_KEYS=f"{KEY},{OTHER_KEY[:-4]}")) == (
        "TOKEN_CACHE_KEYS: key 2 is not a Fernet key (32 url-safe base64 bytes)",)


@pytest.mark.parametrize(("name", "closest"), [
    ("LOG_FROMAT", "LOG_FORMAT"), ("GUNICORN_WORKER", "GUNICORN_WORKERS"),
    ("REDIS_SENTINEL", "REDIS_SENTINELS"), ("AZURE_CLIENT_SECERT", "AZURE_CLIENT_SECRET"),
    ("TOKEN_CACHE_KEY", "TOKEN_CACHE_KEYS"),
])
def test_a_misspelt_name_is_a_warning_with_the_closest_known_name(name, closest):
    settings = Settings.from_env(settings_env(**{name: "x"}))
    assert settings.warnings == (f"{name}: not a setting of flask-obo, ignored; did you mean {closest}?",)


def test_names_outside_the_prefixes_and_known_names_are_not_warned_about():
    environ = settings_env(PATH="/bin", FLASK_APP="wsgi", REDIS_PASSWORD="x", AZURE_SUBSCRIPTION_ID="x",
                           DOWNSTREAM_APIS__TASKS__BASE_URL="https://tasks.example",
                           DOWNSTREAM_APIS__TASKS__SCOPES="api://tasks/.default")
    assert Settings.from_env(environ).warnings == ()


def test_app_config_keys_are_checked_too_and_init_app_logs_the_warning(caplog):
    from flask import Flask

    from flask_obo import FlaskOBO

    app = Flask(__name__)
    app.config.update(settings_env(CORS_ALLOWED_ORIGIN="https://spa.example"))
    with caplog.at_level(logging.WARNING, logger="flask_obo.extension"):
        FlaskOBO(app)
    assert ("CORS_ALLOWED_ORIGIN: not a setting of flask-obo, ignored; did you mean "
            "CORS_ALLOWED_ORIGINS?") in caplog.messages


def test_known_settings_hold_every_name_the_settings_read(monkeypatch):
    """KNOWN_SETTINGS must keep up with the code, or a real setting would be warned about."""
    seen: set[str] = set()

    class Recording(settings_module.Env):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.read = seen

    monkeypatch.setattr(settings_module, "Env", Recording)
    Settings.from_env(settings_env(REDIS_URL="redis://r:6379/0", TOKEN_CACHE_KEYS=KEY))
    assert seen == set(API_SETTINGS)
    assert seen <= KNOWN_SETTINGS


def test_token_cache_settings_need_no_entra_settings():
    settings = Settings.for_token_cache({"REDIS_URL": "redis://r:6379/0", "TOKEN_CACHE_KEYS": KEY})
    assert settings.redis_url == "redis://r:6379/0" and settings.token_cache_keys == (KEY,)
    with pytest.raises(SettingsError, match="TOKEN_CACHE_KEYS: required when REDIS_URL is set"):
        Settings.for_token_cache({"REDIS_URL": "redis://r:6379/0"})


# --- the causes --------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [90002, 700016, 7000215, 700027, 7000274, 700213, 70021])
def test_each_aadsts_code_of_the_issue_is_named(code):
    cause = cause_of_answer({"error": "invalid_client", "error_codes": [code]})
    assert cause is not None and cause.reason == f"AADSTS{code}" and cause.fix
    assert cause.component == ("authority" if code == 90002 else "credential")
    assert cause.status == ("misconfigured" if code == 90002 else "rejected")


def test_a_transient_or_user_error_is_no_misconfiguration():
    for code in (50076, 65001, 50013, 700082):  # MFA, consent, a bad assertion, an expired grant
        assert code not in AADSTS and cause_of_answer({"error_codes": [code]}) is None
    assert cause_of_answer({"error": "temporarily_unavailable"}) is None


def test_redis_refusals_are_named_and_outages_are_not():
    from redis.exceptions import AuthenticationError, ConnectionError, NoPermissionError, ResponseError

    assert redis_cause(AuthenticationError("invalid username-password pair")).reason == "redis_auth"
    assert redis_cause(ResponseError("NOAUTH Authentication required.")).reason == "redis_auth"
    assert redis_cause(NoPermissionError("this user has no permissions")).reason == "redis_acl"
    assert redis_cause(ConnectionError("Connection refused")) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_cause_is_logged_once_a_minute_and_cleared_by_a_success(caplog):
    clock = Clock()
    diagnosis = Diagnosis(clock=clock)
    cause = cause_of_answer({"error_codes": [90002]})
    assert cause is not None
    with caplog.at_level(logging.ERROR, logger="flask_obo.diagnosis"):
        for _ in range(100):
            diagnosis.report(cause, "https://login.example/t/v2.0/.well-known/openid-configuration")
        assert len(caplog.records) == 1
        clock.now += 59
        diagnosis.report(cause, "https://login.example/t/v2.0/.well-known/openid-configuration")
        assert len(caplog.records) == 1
        clock.now += 1
        diagnosis.report(cause, "https://login.example/t/v2.0/.well-known/openid-configuration")
        assert len(caplog.records) == 2
    assert "AADSTS90002 (tenant not found)" in caplog.messages[0]
    assert "https://login.example/t/v2.0/.well-known/openid-configuration" in caplog.messages[0]
    assert set(diagnosis.findings()) == {"authority"}
    diagnosis.clear("authority")
    assert diagnosis.findings() == {}


# --- at run time, in-process -------------------------------------------------------------------
def test_readyz_is_503_misconfigured_for_a_wrong_tenant_and_200_once_fixed():
    fake = FakeEntra()
    tenant_exists = False
    wrong = {"error": "invalid_tenant", "error_codes": [90002],
             "error_description": "AADSTS90002: Tenant not found."}

    def metadata(request: Any) -> tuple[int, dict[str, str], str]:
        return fake._metadata(request) if tenant_exists else (400, {}, json.dumps(wrong))

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add_callback(responses.GET, METADATA_URL, callback=metadata)
        rsps.add_callback(responses.GET, JWKS_URL, callback=fake._jwks)
        rsps.add_callback(responses.POST, TOKEN_URL, callback=fake._token)
        rsps.add_callback(responses.GET, f"{GRAPH}/me", callback=fake._graph)
        client = create_app(settings_env()).test_client()
        headers = {"Authorization": f"Bearer {fake.api_token()}"}
        for _ in range(3):  # the user's request meets it; never a 500
            assert client.get("/api/me", headers=headers).status_code == 503
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json["status"] == "misconfigured"
        assert ready.json["reasons"] == {"authority": "AADSTS90002"}
        assert ready.json["checks"]["authority"] == "misconfigured"
        tenant_exists = True  # the setting is fixed (or the tenant created)
        assert client.get("/api/me", headers=headers).status_code == 200
        assert client.get("/readyz").status_code == 200  # not sticky


def test_an_unconfigured_downstream_name_is_logged_with_the_configured_ones(entra, caplog):
    from flask_obo import FlaskOBO

    app = create_app(settings_env())

    @app.get("/api/tasks")
    def tasks() -> Any:
        return FlaskOBO().downstream("taks").get("/tasks").json()

    token = entra.api_token()
    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/api/tasks", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 500
    assert response.json == {"error": "server_error", "error_description":
                             "This route needs a downstream API that is not configured on the server."}
    assert any("no downstream API named 'taks'; configured: graph" in m for m in caplog.messages)
    assert not any(m.startswith("unhandled") for m in caplog.messages)
