"""gunicorn's access log, with what the client sent unable to forge a field or a line.

gunicorn formats access-log atoms verbatim (it only turns ``"`` into ``\\"``, which a
client defeats by sending ``\\"``). A request header such as ``X-Request-Id: abc
status=200 user=admin`` would add fields to the line, and a ``%0A`` in the path (decoded
into ``PATH_INFO``) would start a new one. ``SanitisingLogger`` (``logger_class`` in
config/gunicorn.conf.py) cleans every atom before formatting:

* header, environ and address atoms (``%({x-request-id}i)s``, ``%(h)s``, ``%(u)s``), which
  the format prints unquoted: kept to ``[A-Za-z0-9._:-]`` (anything else becomes ``_``),
  at most 64 characters;
* free-text atoms (path, user agent, referer, ...), which the format prints in quotes:
  escaped as nginx escapes its access log (``"``, ``\\``, and anything outside printable
  ASCII become ``\\xHH``), at most 1024 characters before escaping.
"""

from __future__ import annotations

import re
import traceback
from datetime import timedelta
from typing import Any

from gunicorn.glogging import Logger

from .logging_setup import logging_config as app_logging_config

TOKEN_LIMIT = 64
TEXT_LIMIT = 1024
_NOT_TOKEN = re.compile(r"[^A-Za-z0-9._:-]")
_NOT_PRINTABLE = re.compile(r'[^\x20-\x7e]|["\\]')
# Atoms a format prints bare; "{name}i", "{name}o" and "{name}e" are treated the same.
TOKEN_ATOMS = frozenset({"h", "u", "l"})


def token(value: str) -> str:
    """An identifier safe to print unquoted: no space, quote, ``=`` or control character."""
    return _NOT_TOKEN.sub("_", value[:TOKEN_LIMIT]) or "-"


def text(value: str) -> str:
    """Free text safe inside double quotes, and on one line."""
    return _NOT_PRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02X}", value[:TEXT_LIMIT])


class SanitisingLogger(Logger):
    """gunicorn's logger whose access-log atoms carry no client-made field or line break,
    and whose access records carry ``status`` and ``request_id`` as fields (JSON logs)."""

    def atoms(self, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta) -> dict[str, Any]:
        atoms = super().atoms(resp, req, environ, request_time)
        return {key: _clean(key, value) for key, value in atoms.items()}

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta) -> None:
        # gunicorn's own access(), plus the two fields: it has no hook for extra fields.
        if not self.access_log_enabled:
            return
        safe_atoms = self.atoms_wrapper_class(self.atoms(resp, req, environ, request_time))
        fields = {"status": _status(safe_atoms["s"]), "request_id": safe_atoms["{x-request-id}o"]}
        try:
            self.access_log.info(self.cfg.access_log_format, safe_atoms, extra=fields)
        except Exception:
            self.error(traceback.format_exc())


def logging_config(level: str, log_format: str, accesslog: str | None, errorlog: str) -> dict[str, Any]:
    """gunicorn's ``logconfig_dict``: the app's handlers (app.logging_setup) for the root
    logger and gunicorn's error log, and one more for its access log (stdout or a file)."""
    config = app_logging_config(level, log_format)
    handler = config["handlers"]["stderr"]
    config["handlers"]["error"] = _to(errorlog, handler, "ext://sys.stderr")
    config["loggers"] = {
        "gunicorn.error": {"level": level.upper(), "handlers": ["error"], "propagate": False},
    }
    if accesslog is not None:
        config["handlers"]["access"] = _to(accesslog, handler, "ext://sys.stdout")
        config["loggers"]["gunicorn.access"] = {"level": "INFO", "handlers": ["access"], "propagate": False}
    return config


def _to(destination: str, handler: dict[str, Any], stream: str) -> dict[str, Any]:
    if destination == "-":
        return {**handler, "stream": stream}
    return {key: value for key, value in handler.items() if key != "stream"} | {
        "class": "logging.FileHandler", "filename": destination}


def _status(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _clean(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value  # sizes, durations: gunicorn's own numbers
    return token(value) if key in TOKEN_ATOMS or key.startswith("{") else text(value)
