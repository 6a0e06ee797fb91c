"""The README's "Use flask-obo in your own Flask API" example, exactly as printed, is a
working API: run under ``flask run`` against the dev tenant (real HTTPS, msal unpatched),
with Graph and the dev tenant's second API (``/tasks-api``) as its two downstream APIs.
Then the same public API with Redis: two resources, one sealed entry per user."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from cryptography.fernet import Fernet

from devtenant.testing import DevTenantServer
from tests.support.log_secrets import find_secret
from tests.support.servers import free_port, redis_server, wait_until
from tests.support.stack import api_env

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Use flask-obo in your own Flask API"
MAX_LINES = 20


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_the_example_is_short_and_complete():
    code = readme_example()
    assert len(code.strip().splitlines()) <= MAX_LINES
    imports = {node.module for node in ast.walk(ast.parse(code)) if isinstance(node, ast.ImportFrom)}
    assert imports == {"flask", "flask_obo"}  # nothing from the reference API or the internals


@pytest.fixture
def tenant(devtenant: DevTenantServer) -> DevTenantServer:
    """The flask-obo-devtenant plugin's dev tenant (its counters reset), as an adopter gets it."""
    return devtenant


@dataclass
class Example:
    url: str
    log: Path

    def get(self, path: str, token: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(self.url + path, headers=headers, timeout=30)


@contextmanager
def example_api(tenant: DevTenantServer, workdir: Path, python: str | None = None,
                **settings: str) -> Iterator[Example]:
    """The README's example as ``example.py``, served by ``flask run`` on a free port: by
    ``python`` (an environment where flask-obo is installed), else by this interpreter with
    flask_obo from the checkout."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "example.py").write_text(readme_example())
    env = api_env(tenant, **tenant.tasks_api_settings(), **settings)
    if python is None:
        env["PYTHONPATH"] = str(ROOT)  # flask_obo from the checkout, as `pip install .` would give
    else:
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
    env.setdefault("AUTHORITY_CACHE_DIR", str(workdir / "authority"))  # no other test's keys
    port = free_port()
    log = workdir / "flask.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [python or sys.executable, "-m", "flask", "--app", "example", "run", "--port", str(port)],
            cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT,
        )
    example = Example(f"http://127.0.0.1:{port}", log)
    try:
        wait_until(lambda: _answers(example), what="the README example")
        yield example
    finally:
        process.terminate()
        process.wait(timeout=15)
    assert find_secret(log.read_text(errors="replace")) is None


def _answers(example: Example) -> bool:
    try:
        return example.get("/api/profile").status_code == 401
    except requests.ConnectionError:
        return False


def token_calls(tenant: DevTenantServer) -> dict[str, int]:
    return tenant.token_calls()


def test_the_example_calls_graph_and_a_second_api_as_the_user(tenant, tmp_path):
    adele = tenant.tenant.api_token("adele")
    tenant.reset_counters()
    with example_api(tenant, tmp_path) as api:
        missing = api.get("/api/profile")
        assert missing.status_code == 401
        assert missing.json()["error"] == "missing_token"

        profile = api.get("/api/profile", adele)
        assert profile.status_code == 200, profile.text
        assert profile.json()["name"] == "Adele Vance"
        tasks = api.get("/api/tasks", adele)
        assert tasks.status_code == 200, tasks.text
        assert tasks.json()["owner"] == profile.json()["oid"]
        assert tasks.json()["value"]
        # One exchange; the second resource's token comes from the refresh token it left.
        assert token_calls(tenant) == {"on_behalf_of": 1, "refresh_token": 1}

        for token in (adele, tenant.tenant.api_token("adele")):  # and a new SPA token
            assert api.get("/api/profile", token).status_code == 200
            assert api.get("/api/tasks", token).status_code == 200
        assert token_calls(tenant) == {"on_behalf_of": 1, "refresh_token": 1}  # all cache hits
        assert "Traceback" not in api.log.read_text()


def test_two_resources_share_the_users_one_sealed_entry_across_instances(tenant, tmp_path):
    with redis_server() as redis_url:
        settings = {"REDIS_URL": redis_url, "TOKEN_CACHE_KEYS": Fernet.generate_key().decode()}
        adele = tenant.tenant.api_token("adele")
        tenant.reset_counters()
        with example_api(tenant, tmp_path / "one", **settings) as one:
            assert one.get("/api/profile", adele).status_code == 200
            assert one.get("/api/tasks", adele).status_code == 200
        assert token_calls(tenant) == {"on_behalf_of": 1, "refresh_token": 1}

        client = redis.Redis.from_url(redis_url)
        (entry,) = client.keys("flask-obo:cache:*")  # one entry for the user, both resources
        blob = client.get(entry)
        assert b"eyJ" not in blob and b"Adele" not in blob  # sealed: no token, no name

        with example_api(tenant, tmp_path / "two", **settings) as two:  # another instance
            assert two.get("/api/tasks", adele).status_code == 200
            assert two.get("/api/profile", adele).status_code == 200
        assert token_calls(tenant) == {"on_behalf_of": 1, "refresh_token": 1}  # both from it
