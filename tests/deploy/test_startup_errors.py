"""A bad setting under the shipped gunicorn config: one line naming the variable, from the
master, before any worker is forked; never a traceback, never once per worker.

Each case runs the real ``gunicorn -c config/gunicorn.conf.py wsgi:app`` (in an empty
directory, so no stray ``.env`` is read) and bounds it with a timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.fake_entra import CLIENT_ID, settings_env
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "startup-secret-value-7c1e9d"
OTHER_API = "5d0c6a4e-1111-4000-8000-00000000abcd"
# Whatever the test runner's environment says about these must not leak into a case.
CLEARED = ("AZURE_", "API_", "GRAPH_", "REDIS_", "TOKEN_", "CORS_", "ENTRA_", "AUTHORITY_", "GUNICORN_",
           "LOG_LEVEL")


def gunicorn(cwd: Path, *extra: str, timeout: float = 60, **overrides: str | None) -> tuple[int, str]:
    """Run gunicorn with the shipped config and a valid environment changed by ``overrides``
    (None removes a variable); its exit status and stderr. Killed, and failed, if it is
    still running after ``timeout`` (it started when it should not have)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEARED)}
    env.update(settings_env(AZURE_CLIENT_SECRET=SECRET), PYTHONPATH=str(ROOT),
               GUNICORN_WORKER_TMP_DIR=str(cwd))
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "config/gunicorn.conf.py"),
         "--bind", f"127.0.0.1:{free_port()}", *extra, "wsgi:app"],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        pytest.fail(f"gunicorn was still running after {timeout} s:\n{stderr[-3000:]}")
    return process.returncode, stderr


CASES = {
    "log-level": ({"LOG_LEVEL": "VERBOSE"}, "LOG_LEVEL", "debug, info"),
    "workers-not-a-number": ({"GUNICORN_WORKERS": "abc"}, "GUNICORN_WORKERS", "whole number"),
    "zero-threads": ({"GUNICORN_THREADS": "0"}, "GUNICORN_THREADS", "positive"),
    "app-id-uri": ({"AZURE_APP_ID_URI": "not a uri"}, "AZURE_APP_ID_URI", "api://"),
    "graph-query": ({"GRAPH_BASE_URL": "https://graph.microsoft.com/v1.0?$top=5"}, "GRAPH_BASE_URL",
                    "query"),
    "scope-of-another-api": ({"API_REQUIRED_SCOPE": f"api://{OTHER_API}/user_impersonation"},
                             "API_REQUIRED_SCOPE", "user_impersonation"),
    "missing-tenant": ({"AZURE_TENANT_ID": None}, "AZURE_TENANT_ID", "missing"),
    "secret-and-certificate": ({"AZURE_CLIENT_CERTIFICATE_PATH": "/run/secrets/api.pem"},
                               "AZURE_CLIENT_SECRET", "only one"),
}


@pytest.mark.parametrize(("overrides", "variable", "says"), list(CASES.values()), ids=list(CASES))
def test_a_bad_setting_stops_gunicorn_with_one_line_before_any_worker(tmp_path, overrides, variable, says):
    status, stderr = gunicorn(tmp_path, **overrides)

    assert status != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr  # not gunicorn's start-up lines, not once per worker
    assert variable in lines[0] and says in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert "Booting worker" not in stderr
    for value in (SECRET, *(v for v in overrides.values() if v)):
        assert value not in stderr


@pytest.mark.parametrize("scope", ["user_impersonation", f"api://{CLIENT_ID}/user_impersonation"])
def test_good_settings_pass_the_check(tmp_path, scope):
    """The check lets a valid environment through (``--check-config`` loads the config and
    the app, then exits without forking), including the scope in MSAL.js's full form."""
    status, stderr = gunicorn(tmp_path, "--check-config", API_REQUIRED_SCOPE=scope)

    assert status == 0, stderr
    assert "configuration error" not in stderr
