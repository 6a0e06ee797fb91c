"""msal's client_info (the base64 of the user's object id and home tenant) is redacted
from the logs at DEBUG, where msal logs every token response; and gunicorn's access-log
atoms (app/gunicorn_logging.py) cannot carry a client-made field or line."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import runpy
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import msal
import pytest
from gunicorn.config import Config

from app import create_app
from app.gunicorn_logging import SanitisingLogger, text, token
from app.logging_setup import RedactSecrets, redact
from flask_obo.cache_store import TokenCacheStore
from flask_obo.settings import Settings
from tests.support.fake_entra import ADELE, TENANT_ID, FakeEntra

GUNICORN_CONF = Path(__file__).resolve().parents[2] / "config" / "gunicorn.conf.py"
CLIENT_INFO = base64.urlsafe_b64encode(
    json.dumps({"uid": ADELE, "utid": TENANT_ID}).encode()).decode().rstrip("=")


@dataclass
class RootLog:
    handler: logging.Handler
    stream: io.StringIO

    def output(self) -> str:
        return self.stream.getvalue()


@pytest.fixture
def root_debug() -> Iterator[RootLog]:
    """The root logger at DEBUG with one plain handler, alone: pytest's own handlers may
    carry a filter from an earlier test, and would redact records before ours sees them."""
    root, stream = logging.getLogger(), io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG)
    yield RootLog(handler, stream)
    root.handlers[:] = handlers
    root.setLevel(level)


def msal_logs_a_token_response() -> None:
    """A real msal record: TokenCache.add logs the event at DEBUG on ``msal.token_cache``."""
    msal.TokenCache().add({
        "client_id": "api", "scope": ["User.Read"],
        "token_endpoint": f"https://login.microsoftonline.com/{TENANT_ID}/oauth2/v2.0/token",
        "response": {"access_token": "at", "token_type": "Bearer", "expires_in": 3600,
                     "client_info": CLIENT_INFO},
    })


def test_the_app_redacts_msal_client_info_at_debug(
    root_debug: RootLog, entra: FakeEntra, settings: Settings, store: TokenCacheStore
) -> None:
    """The whole OBO path with msal unpatched: its DEBUG dump of Entra's answer is logged,
    client_info included, and reaches the log redacted."""
    client = create_app(settings, store=store).test_client()  # filters the root handlers, ours too
    response = client.get("/api/me", headers={"Authorization": f"Bearer {entra.api_token(ADELE)}"})
    assert response.status_code == 200

    output = root_debug.output()
    assert "DEBUG msal.token_cache: event=" in output  # msal did log the token response ...
    assert '"client_info": "[redacted]"' in output  # ... with client_info, redacted
    assert CLIENT_INFO not in output
    assert ADELE not in output


def test_a_filter_on_the_msal_logger_would_miss_it(root_debug: RootLog) -> None:
    """Why the filter sits on handlers: a logger's filters never see its children's records.
    Also the negative control: without the handler filter, client_info is in the log."""
    msal_logger = logging.getLogger("msal")
    msal_logger.addFilter(logger_filter := RedactSecrets())
    try:
        msal_logs_a_token_response()
    finally:
        msal_logger.removeFilter(logger_filter)
    assert CLIENT_INFO in root_debug.output()


def test_the_handler_filter_redacts_msal_records(root_debug: RootLog) -> None:
    root_debug.handler.addFilter(RedactSecrets())
    msal_logs_a_token_response()
    output = root_debug.output()
    assert '"client_info": "[redacted]"' in output
    assert CLIENT_INFO not in output


@pytest.mark.parametrize(
    "message",
    [
        f'event={{"response": {{"client_info": "{CLIENT_INFO}"}}}}',  # msal's JSON dump
        f"response was {{'client_info': '{CLIENT_INFO}=='}}",  # a dict's repr, padded base64
        f"POST token client_info={CLIENT_INFO}&scope=x",  # a form body
        f"account {{'client_info': {{'uid': '{ADELE}', 'utid': '{TENANT_ID}'}}}}",  # decoded
        f"home blob {CLIENT_INFO} without its key",  # shaped like base64 JSON: redacted anyway
    ],
    ids=["json", "repr", "form", "decoded", "bare"],
)
def test_client_info_is_redacted_in_any_form(message: str) -> None:
    redacted = redact(message)
    assert CLIENT_INFO not in redacted and ADELE not in redacted, redacted
    assert "[redacted]" in redacted


def test_redaction_keeps_the_rest_of_the_line() -> None:
    message = f'"client_info": "{CLIENT_INFO}", "expires_in": 3600, partition 9f86d081884c7d65'
    assert redact(message) == '"client_info": "[redacted]", "expires_in": 3600, partition 9f86d081884c7d65'


# --- gunicorn's access-log atoms ------------------------------------------------------------


def test_token_atoms_keep_identifier_characters_only() -> None:
    assert token("0f8c2a9e-41d7.req:7_x") == "0f8c2a9e-41d7.req:7_x"
    assert token('abc status=200 user="admin"\n') == "abc_status_200_user__admin__"
    assert token("x" * 200) == "x" * 64
    assert token("") == "-"


def test_text_atoms_are_escaped_like_nginx() -> None:
    assert text("curl/8.5.0 (x86_64) ok") == "curl/8.5.0 (x86_64) ok"
    assert text('a" user=admin \\" b\r\nnext\x00é') == (
        "a\\x22 user=admin \\x5C\\x22 b\\x0D\\x0Anext\\x00\\xE9")
    assert len(text("x" * 5000)) == 1024


def test_the_logger_cleans_every_client_atom(tmp_path: Path) -> None:
    """gunicorn's access() with the shipped format: the request id (the response's, printed
    bare: the API answers only well-formed ones, but the log does not rely on that), the
    path and the user agent (quoted), and the address ProxyFix took from the client."""
    cfg = Config()
    cfg.set("accesslog", str(tmp_path / "access.log"))
    cfg.set("errorlog", str(tmp_path / "error.log"))
    cfg.set("access_log_format", runpy.run_path(str(GUNICORN_CONF))["access_log_format"])
    logger = SanitisingLogger(cfg)
    environ = {"REMOTE_ADDR": "6.6.6.6 admin=1", "REQUEST_METHOD": "GET", "RAW_URI": "/x",
               "PATH_INFO": '/x\n1.2.3.4 "GET / HTTP/1.1" 200', "QUERY_STRING": "",
               "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_USER_AGENT": 'ua\\" status=200 "'}
    request = SimpleNamespace(headers=[])
    response = SimpleNamespace(status="200 OK", sent=2,
                               headers=[("X-Request-ID", "abc status=200 user=admin")])
    logger.access(response, request, environ, timedelta(milliseconds=3))
    for handler in logger.access_log.handlers:
        handler.close()

    (line,) = (tmp_path / "access.log").read_text().splitlines()
    assert line == ('6.6.6.6_admin_1 "GET /x\\x0A1.2.3.4 \\x22GET / HTTP/1.1\\x22 200 HTTP/1.1" 200 2 3ms '
                    '"ua\\x5C\\x22 status=200 \\x22" request_id=abc_status_200_user_admin '
                    f"pid=<{os.getpid()}>")
    fields = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', line)
    assert [f.split("=")[0] for f in fields if "=" in f and not f.startswith('"')] == ["request_id", "pid"]
