"""The flask-obo-devtenant pytest plugin (its ``pytest11`` entry point), as adopters use it.

``test_adopter_example.py`` is the documented example, a test file of an adopter's API
using the plugin's fixtures alone; this module checks that it is the documented text, and
the fixtures the example does not use: Redis, the environment, app-only tokens, a second
downstream API, MFA at sign-in.
"""

from __future__ import annotations

import ast
import base64
import inspect
import json
import os
import re
from importlib import metadata
from pathlib import Path

import pytest
import redis
from flask import Flask

from devtenant import pytest_plugin
from flask_obo import FlaskOBO
from tests.adopter.test_adopter_example import create_app

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "tests/adopter/test_adopter_example.py"
DOCUMENTED_IN = [ROOT / "docs/how-to/testing-with-the-dev-tenant.md", ROOT / "devtenant-dist/README.md"]
MAX_LINES = 30
ENVIRON_AT_IMPORT = dict(os.environ)


def _python_blocks(markdown: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown.read_text(), flags=re.S)


@pytest.mark.parametrize("page", DOCUMENTED_IN, ids=lambda p: p.name)
def test_the_documented_example_is_the_file_that_runs(page: Path) -> None:
    assert EXAMPLE.read_text() in _python_blocks(page)


def test_the_example_is_short_and_uses_the_plugins_fixtures_alone() -> None:
    code = EXAMPLE.read_text()
    assert len(code.splitlines()) < MAX_LINES
    tree = ast.parse(code)
    imports = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imports |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert imports == {"flask", "flask_obo"}  # nothing of this repository's tests or the dev tenant
    plugin_fixtures = {name for name, value in vars(pytest_plugin).items()
                       if type(value).__name__ == "FixtureFunctionDefinition"}
    assert {"devtenant", "devtenant_settings", "user_token", "spa_sign_in"} <= plugin_fixtures
    (test,) = [node for node in tree.body
               if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    assert {arg.arg for arg in test.args.args} <= plugin_fixtures


def test_the_plugin_is_registered_by_the_distributions_entry_point(pytestconfig: pytest.Config) -> None:
    (entry,) = [e for e in metadata.entry_points(group="pytest11") if e.value == "devtenant.pytest_plugin"]
    assert entry.dist is not None and entry.dist.name == "flask-obo-devtenant"
    assert pytestconfig.pluginmanager.get_plugin(entry.name) is pytest_plugin


def test_a_shared_token_cache_in_redis(devtenant, devtenant_redis, user_token, tmp_path, monkeypatch) -> None:
    settings = devtenant.settings(authority_cache_dir=tmp_path, redis_url=devtenant_redis)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", settings["REQUESTS_CA_BUNDLE"])
    one, two = create_app(settings).test_client(), create_app(settings).test_client()  # two instances
    headers = {"Authorization": f"Bearer {user_token('nestor')}"}
    assert one.get("/api/me", headers=headers).json["name"] == "Nestor Wilke"
    assert two.get("/api/me", headers=headers).json["name"] == "Nestor Wilke"
    assert devtenant.token_calls() == {"on_behalf_of": 1}  # the second instance read Redis
    assert redis.Redis.from_url(devtenant_redis).keys("flask-obo:cache:*")


def test_the_environment_app_tokens_and_a_second_api(devtenant, devtenant_env, user_token, app_token,
                                                    monkeypatch) -> None:
    assert os.environ["AZURE_CLIENT_ID"] == devtenant_env["AZURE_CLIENT_ID"]
    for name, value in devtenant.tasks_api_settings().items():
        monkeypatch.setenv(name, value)
    app = Flask(__name__)
    obo = FlaskOBO(app)  # settings from the environment

    @app.get("/api/tasks")
    @obo.require_scope("user_impersonation")
    def tasks():
        return obo.downstream("tasks").get("/me/tasks").json()

    client = app.test_client()
    adele = user_token("adele")
    answer = client.get("/api/tasks", headers={"Authorization": f"Bearer {adele}"})
    assert answer.status_code == 200, answer.json
    assert answer.json["owner"] == _claims(adele)["oid"] and answer.json["value"]
    # An app-only token (roles, no scp) is a valid token for the API, but never a user's.
    app_only = app_token()
    assert _claims(app_only)["roles"] == ["access_as_application"] and "scp" not in _claims(app_only)
    refused = client.get("/api/tasks", headers={"Authorization": f"Bearer {app_only}"})
    assert refused.status_code == 403 and refused.json["error"] == "insufficient_scope"
    assert devtenant.token_calls() == {"on_behalf_of": 1}  # the user's exchange alone


def test_the_environment_is_restored_after_a_test() -> None:
    """devtenant_env (and the test above) left nothing behind in the process environment."""
    def settings(environ) -> dict[str, str]:
        prefixes = ("DOWNSTREAM_APIS__", "AZURE_", "REQUESTS_")
        return {k: v for k, v in environ.items() if k.startswith(prefixes)}

    assert settings(os.environ) == settings(ENVIRON_AT_IMPORT)


def _claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_a_sign_in_with_mfa_carries_it(spa_sign_in, devtenant) -> None:
    signed_in = spa_sign_in("alex")  # alex's sign-in asks for MFA: the plugin approves
    assert _claims(signed_in["id_token"])["name"] == "Alex Wilber"
    assert _claims(signed_in["access_token"])["amr"] == ["pwd", "mfa"]
    assert devtenant.token_calls() == {"authorization_code": 1}


def test_the_plugin_documents_each_fixture() -> None:
    doc = inspect.getdoc(pytest_plugin) or ""
    page = DOCUMENTED_IN[0].read_text()
    for name in ("devtenant_server", "devtenant", "devtenant_settings", "devtenant_env", "devtenant_redis",
                 "user_token", "app_token", "spa_sign_in"):
        assert f"``{name}``" in doc and f"`{name}`" in page, name
