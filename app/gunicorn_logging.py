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
from datetime import timedelta
from typing import Any

from gunicorn.glogging import Logger

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
    """gunicorn's logger whose access-log atoms carry no client-made field or line break."""

    def atoms(self, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta) -> dict[str, Any]:
        atoms = super().atoms(resp, req, environ, request_time)
        return {key: _clean(key, value) for key, value in atoms.items()}


def _clean(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value  # sizes, durations: gunicorn's own numbers
    return token(value) if key in TOKEN_ATOMS or key.startswith("{") else text(value)
