"""Issue 19: settings may carry the prefix ``OBO_``, which wins over the bare name, in
``app.config`` and in the environment alike; errors and typo warnings name what was set."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from flask import Flask

from flask_obo import FlaskOBO
from flask_obo.settings import OBO_PREFIX, Settings, SettingsError, unknown_setting_warnings
from tests.support.fake_entra import settings_env

KEY = Fernet.generate_key().decode()
APPS_REDIS, CACHE_REDIS, ENV_CACHE_REDIS = "redis://jobs:6379/0", "redis://cache:6379/0", "redis://env:6379/0"


def test_the_prefixed_name_wins_over_the_bare_one_in_app_config() -> None:
    config = {"REDIS_URL": APPS_REDIS, "OBO_REDIS_URL": CACHE_REDIS, "TOKEN_CACHE_KEYS": KEY}
    assert Settings.from_app_config(config, settings_env()).redis_url == CACHE_REDIS
    assert Settings.from_app_config({"REDIS_URL": APPS_REDIS, "TOKEN_CACHE_KEYS": KEY},
                                    settings_env()).redis_url == APPS_REDIS


def test_precedence_config_prefixed_then_env_prefixed_then_config_then_env() -> None:
    env = settings_env(REDIS_URL="redis://env-bare:6379/0", TOKEN_CACHE_KEYS=KEY)
    assert Settings.from_app_config({}, env).redis_url == "redis://env-bare:6379/0"
    assert Settings.from_app_config({"REDIS_URL": APPS_REDIS}, env).redis_url == APPS_REDIS
    env["OBO_REDIS_URL"] = ENV_CACHE_REDIS  # an operator's OBO_ beats the app's own REDIS_URL
    assert Settings.from_app_config({"REDIS_URL": APPS_REDIS}, env).redis_url == ENV_CACHE_REDIS
    assert Settings.from_app_config({"REDIS_URL": APPS_REDIS, "OBO_REDIS_URL": CACHE_REDIS},
                                    env).redis_url == CACHE_REDIS


def test_the_environment_takes_the_prefix_too_for_every_setting() -> None:
    env = settings_env(LOG_LEVEL="info", OBO_LOG_LEVEL="debug", OBO_GRAPH_BASE_URL="https://graph.example/v1",
                       OBO_DOWNSTREAM_APIS__TASKS__BASE_URL="https://tasks.example/v1",
                       OBO_DOWNSTREAM_APIS__TASKS__SCOPES="api://tasks/.default")
    env = {OBO_PREFIX + name if name.startswith("AZURE_") else name: value for name, value in env.items()}
    settings = Settings.from_env(env)
    assert settings.log_level == "DEBUG"
    assert settings.graph_base_url == "https://graph.example/v1"
    assert settings.downstream_apis["tasks"].scopes == ("api://tasks/.default",)
    assert settings.client_id == settings_env()["AZURE_CLIENT_ID"]


def test_an_empty_prefixed_name_still_wins_keeping_the_cache_off_the_apps_redis() -> None:
    settings = Settings.from_app_config({"REDIS_URL": APPS_REDIS, "OBO_REDIS_URL": ""}, settings_env())
    assert settings.redis_url is None


def test_nested_prefixed_env_config_names_downstream_apis() -> None:
    """``FLASK_OBO_DOWNSTREAM_APIS__TASKS__SCOPES`` (from_prefixed_env nests it)."""
    config = {"OBO_DOWNSTREAM_APIS": {"TASKS": {"BASE_URL": "https://tasks.example/v1",
                                                "SCOPES": ["api://tasks/.default"]}}}
    assert Settings.from_app_config(config, settings_env()).downstream_apis["tasks"].base_url == \
        "https://tasks.example/v1"


def test_an_error_names_the_variable_as_it_was_set() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(settings_env(REDIS_URL=APPS_REDIS, OBO_REDIS_URL="http://cache",
                                       OBO_TOKEN_CACHE_TTL_SECONDS="-1"))
    names = [line.partition(":")[0] for line in raised.value.errors]
    assert "OBO_REDIS_URL" in names and "OBO_TOKEN_CACHE_TTL_SECONDS" in names
    assert "REDIS_URL" not in names and "http://cache" not in str(raised.value)


def test_typo_warnings_understand_the_prefix() -> None:
    warnings = unknown_setting_warnings(["OBO_REDIS_URLL", "OBO_REDIS_URL", "OBO_LOG_FROMAT",
                                         "OBO_NOTHING_LIKE_IT_AT_ALL", "PATH", "REDIS_URLL"])
    assert warnings == (
        "OBO_LOG_FROMAT: not a setting of flask-obo, ignored; did you mean OBO_LOG_FORMAT?",
        "OBO_NOTHING_LIKE_IT_AT_ALL: not a setting of flask-obo, ignored; flask-obo reads no similar name",
        "OBO_REDIS_URLL: not a setting of flask-obo, ignored; did you mean OBO_REDIS_URL?",
        "REDIS_URLL: not a setting of flask-obo, ignored; did you mean REDIS_URL?",
    )


def test_init_app_warns_about_a_misspelt_prefixed_name(caplog: pytest.LogCaptureFixture) -> None:
    app = Flask(__name__)
    app.config.update(settings_env(OBO_REDIS_URLL=CACHE_REDIS))
    with caplog.at_level("WARNING", logger="flask_obo.extension"):
        FlaskOBO(app)
    assert any("did you mean OBO_REDIS_URL?" in message for message in caplog.messages)


def test_the_docs_generator_knows_the_same_prefix() -> None:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "gen_reference", Path(__file__).parents[2] / "docs" / "gen_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OPTIONAL_PREFIX == OBO_PREFIX
