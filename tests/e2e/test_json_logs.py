"""``LOG_FORMAT=json`` under real gunicorn against the dev tenant: the app's lines, gunicorn's
error log and its access log are one JSON object per line, with the request id that the
response carried, the route (app lines) and the status (access lines)."""

from __future__ import annotations

import json

import pytest
import requests

from tests.support.servers import wait_until
from tests.support.stack import api_env, devtenant, gunicorn

pytestmark = pytest.mark.e2e


def test_every_line_is_json_with_the_request_id(tmp_path):
    access_log = tmp_path / "access.log"
    with devtenant(tmp_path / "devtenant") as tenant:
        env = api_env(tenant, LOG_FORMAT="json", LOG_LEVEL="info", GUNICORN_ACCESS_LOG=str(access_log))
        with gunicorn(env, workers=1) as api:
            token = tenant.tenant.api_token("adele")
            response = requests.get(f"{api.url}/api/me", timeout=30, headers={
                "Authorization": f"Bearer {token}", "X-Request-ID": "json-e2e-1"})
            assert response.status_code == 200 and response.headers["X-Request-ID"] == "json-e2e-1"
            wait_until(lambda: "json-e2e-1" in access_log.read_text(), what="the access line")
            app_lines = [json.loads(line) for line in api.log.read_text().splitlines()]
            access = [json.loads(line) for line in access_log.read_text().splitlines()]

    assert app_lines and access  # every line parsed as JSON above
    for line in app_lines + access:
        assert {"time", "level", "logger", "message", "request_id"} <= line.keys(), line
    exchange = next(line for line in app_lines if "on-behalf-of exchange" in line["message"])
    assert (exchange["request_id"], exchange["route"]) == ("json-e2e-1", "/api/me")
    assert any(line["logger"] == "gunicorn.error" for line in app_lines)  # "Booting worker ..."
    (me,) = [line for line in access if line["request_id"] == "json-e2e-1"]
    assert me["status"] == 200 and me["logger"] == "gunicorn.access" and "GET /api/me" in me["message"]
    assert token not in json.dumps(app_lines + access)
