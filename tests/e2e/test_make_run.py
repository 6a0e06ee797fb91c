"""What a newcomer does: ``make run``, paste the printed curl, get a 200; Ctrl-C stops all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import requests

from tests.support.servers import free_port
from tests.support.stack import ROOT

pytestmark = pytest.mark.e2e


@pytest.mark.skipif((ROOT / ".env").exists(), reason="a local .env changes what make run does")
def test_make_run_prints_a_curl_that_returns_the_manager(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AZURE_", "GRAPH_", "TOKEN_CACHE", "REDIS_URL"))}
    env.update(API_PORT=str(free_port()), DEVTENANT_PORT=str(free_port()),
               DEVTENANT_STATE_DIR=str(tmp_path / "state"), PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "scripts/run_local.py"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        printed = []
        for line in process.stdout:  # the script prints the curl once both processes answer
            printed.append(line)
            if line.startswith("curl "):
                break
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
