"""What a newcomer does: ``make run``, paste the printed curl, get a 200; open the printed
SPA URL (its own origin, which the API's CORS allows); Ctrl-C stops all. Also after
``cp config/example.env .env`` (the compose instructions): its placeholders must not
switch ``make run`` to a real tenant. Without node/npm, it says how to install them and
still runs the API."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet

from tests.support.servers import free_port
from tests.support.stack import ROOT

pytestmark = pytest.mark.e2e


def _make_run_prints_a_curl_that_returns_the_manager(checkout: Path, tmp_path: Path,
                                                     **extra_env: str) -> list[str]:
    """Runs make run's script until it printed the curl and the ``SPA:`` line; checks the
    curl; returns what it printed."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AZURE_", "GRAPH_", "TOKEN_CACHE", "REDIS_URL", "CORS_", "SPA_"))}
    env.update(API_PORT=str(free_port()), DEVTENANT_PORT=str(free_port()), SPA_PORT=str(free_port()),
               DEVTENANT_STATE_DIR=str(tmp_path / "state"), PYTHONUNBUFFERED="1", **extra_env)
    process = subprocess.Popen([sys.executable, "scripts/run_local.py"], cwd=checkout, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        printed = []
        for line in process.stdout:  # the script prints the curl once both processes answer
            printed.append(line)
            if line.startswith("curl "):
                break
        assert printed and printed[-1].startswith("curl "), "".join(printed)
        curl = printed[-1]
        while not any(line.startswith("SPA:") for line in printed):  # after the curl, or before
            printed.append(process.stdout.readline())
            assert printed[-1], "".join(printed)
        assert any("devtenant ready at https://" in line for line in printed)
        token, url = re.fullmatch(r'curl -s -H "Authorization: Bearer (\S+)" (\S+)\n', curl).groups()
        assert url == f"http://127.0.0.1:{env['API_PORT']}/api/me/manager"
        response = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert response.status_code == 200
        assert response.json()["displayName"] == "Nestor Wilke"
        spa_line = next(line for line in printed if line.startswith("SPA:"))
        if spa_line.startswith("SPA: http"):
            _check_the_spa(spa_line.split()[1], url.removesuffix("/api/me/manager"), env)
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(timeout=30) == 0
    for port in (env["API_PORT"], env["DEVTENANT_PORT"], env["SPA_PORT"]):
        with pytest.raises(requests.ConnectionError):  # all children are gone
            requests.get(f"https://127.0.0.1:{port}/healthz", timeout=2, verify=False)
    return printed


def _check_the_spa(spa_url: str, api_url: str, env: dict[str, str]) -> None:
    """The SPA on its own origin, configured for the dev tenant and the API, whose CORS
    lets that origin send a bearer token."""
    assert spa_url == f"http://localhost:{env['SPA_PORT']}/"
    assert "Sign in" in requests.get(spa_url, timeout=10).text
    config = requests.get(f"{spa_url}config.json", timeout=10).json()
    assert config["apiBaseUrl"] == api_url and config["redirectUri"] == spa_url
    assert config["authority"].startswith("https://localhost:") and config["knownAuthorities"]
    origin = spa_url.rstrip("/")
    preflight = requests.options(f"{api_url}/api/me", timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.headers.get("Access-Control-Allow-Origin") == origin


@pytest.mark.skipif((ROOT / ".env").exists(), reason="a local .env changes what make run does")
def test_make_run_prints_a_curl_that_returns_the_manager(tmp_path: Path) -> None:
    if not (ROOT / "spa" / "node_modules").is_dir() and not shutil.which("npm"):
        pytest.skip("npm is missing: make run cannot serve the SPA (apt-get install npm)")
    printed = _make_run_prints_a_curl_that_returns_the_manager(ROOT, tmp_path)
    assert any(line.startswith("SPA: http://localhost:") for line in printed), "".join(printed)


def _copy_checkout(tmp_path: Path, *extra: str) -> Path:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("app", "devtenant", "config", "scripts", *extra):
        shutil.copytree(ROOT / name, checkout / name,
                        ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
    shutil.copy(ROOT / "wsgi.py", checkout)
    return checkout


def test_make_run_without_node_says_how_to_install_it_and_runs_the_api(tmp_path: Path) -> None:
    """spa/ without node_modules, and neither node nor npm on PATH (the script starts its
    children with its own interpreter, so an empty PATH is enough)."""
    checkout = _copy_checkout(tmp_path, "spa")
    empty = tmp_path / "empty-path"
    empty.mkdir()
    printed = _make_run_prints_a_curl_that_returns_the_manager(checkout, tmp_path, PATH=str(empty))
    spa_line = next(line for line in printed if line.startswith("SPA:"))
    assert "node/npm are missing" in spa_line and "npm ci" in spa_line, spa_line


def test_make_run_after_copying_example_env_still_runs_the_dev_tenant(tmp_path: Path) -> None:
    """In a copy of the checkout: ``cp config/example.env .env``, fill in what the compose
    instructions ask for (TOKEN_CACHE_KEYS, REDIS_PASSWORD), then ``make run``."""
    checkout = _copy_checkout(tmp_path)
    dotenv = (ROOT / "config" / "example.env").read_text()
    dotenv, keys = re.subn(r"(?m)^TOKEN_CACHE_KEYS=.*$", f"TOKEN_CACHE_KEYS={Fernet.generate_key().decode()}",
                           dotenv)
    dotenv, passwords = re.subn(r"(?m)^REDIS_PASSWORD=.*$", "REDIS_PASSWORD=s3cret-for-compose", dotenv)
    assert keys == passwords == 1, "config/example.env no longer has the lines compose needs"
    (checkout / ".env").write_text(dotenv)
    _make_run_prints_a_curl_that_returns_the_manager(checkout, tmp_path)
