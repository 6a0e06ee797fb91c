"""What a newcomer does: ``make run``, paste the printed curl, get a 200; Ctrl-C stops all.
Also after ``cp config/example.env .env`` (the compose instructions): its placeholders
must not switch ``make run`` to a real tenant."""

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


def _make_run_prints_a_curl_that_returns_the_manager(checkout: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AZURE_", "GRAPH_", "TOKEN_CACHE", "REDIS_URL"))}
    env.update(API_PORT=str(free_port()), DEVTENANT_PORT=str(free_port()),
               DEVTENANT_STATE_DIR=str(tmp_path / "state"), PYTHONUNBUFFERED="1")
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
        assert any("devtenant ready at https://" in line for line in printed)
        token, url = re.fullmatch(r'curl -s -H "Authorization: Bearer (\S+)" (\S+)\n', curl).groups()
        assert url == f"http://127.0.0.1:{env['API_PORT']}/api/me/manager"
        response = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert response.status_code == 200
        assert response.json()["displayName"] == "Nestor Wilke"
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(timeout=30) == 0
    for port in (env["API_PORT"], env["DEVTENANT_PORT"]):
        with pytest.raises(requests.ConnectionError):  # both children are gone
            requests.get(f"https://127.0.0.1:{port}/healthz", timeout=2, verify=False)


@pytest.mark.skipif((ROOT / ".env").exists(), reason="a local .env changes what make run does")
def test_make_run_prints_a_curl_that_returns_the_manager(tmp_path: Path) -> None:
    _make_run_prints_a_curl_that_returns_the_manager(ROOT, tmp_path)


def test_make_run_after_copying_example_env_still_runs_the_dev_tenant(tmp_path: Path) -> None:
    """In a copy of the checkout: ``cp config/example.env .env``, fill in what the compose
    instructions ask for (TOKEN_CACHE_KEYS, REDIS_PASSWORD), then ``make run``."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("app", "devtenant", "config", "scripts"):
        shutil.copytree(ROOT / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "wsgi.py", checkout)
    dotenv = (ROOT / "config" / "example.env").read_text()
    dotenv, keys = re.subn(r"(?m)^TOKEN_CACHE_KEYS=.*$", f"TOKEN_CACHE_KEYS={Fernet.generate_key().decode()}",
                           dotenv)
    dotenv, passwords = re.subn(r"(?m)^REDIS_PASSWORD=.*$", "REDIS_PASSWORD=s3cret-for-compose", dotenv)
    assert keys == passwords == 1, "config/example.env no longer has the lines compose needs"
    (checkout / ".env").write_text(dotenv)
    _make_run_prints_a_curl_that_returns_the_manager(checkout, tmp_path)
