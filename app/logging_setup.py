"""Logging: text or JSON lines, a request id on every line, and a last line of defence
that redacts anything shaped like a secret.

``LOG_FORMAT=text`` (the default) writes ``time level logger [request id] message``;
``LOG_FORMAT=json`` writes one JSON object per line (python-json-logger) with ``time``,
``level``, ``logger``, ``message``, ``request_id`` and, where known, ``route`` (in the
app's lines), ``status`` (in gunicorn's access lines) and, while an OpenTelemetry span is
active (docs/how-to/tracing.md), ``trace_id`` and ``span_id``. Under gunicorn the same
handlers come from ``logconfig_dict`` (config/gunicorn.conf.py, via ``logging_config``),
so the app, gunicorn's error log and its access log write the same format.

The code never logs tokens, secrets or cache blobs on purpose (users appear by
partition hash); ``RedactSecrets`` catches what a library or a future change might let
slip. One library does, at DEBUG: msal logs each token response (``msal.token_cache``,
``event={... "client_info": "eyJ1aWQiOi..."}``) with the tokens masked but not
``client_info``, the base64 of the user's object id and (home) tenant id.

Filters sit on the handlers, not on loggers: a logger's filters see only records logged
through that very logger, not those its children (``msal.*``) propagate, whereas a
handler's see every record it writes, at every level. Redaction runs before formatting,
so it covers both formats.
"""

from __future__ import annotations

import logging
import logging.config
import re
from typing import Any

from flask_obo import RequestIdFilter, TraceContextFilter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(route)s"
JSON_RENAMED = {"asctime": "time", "levelname": "level", "name": "logger"}

_SECRETS = re.compile(
    # client_info's value, as JSON or repr ("client_info": "...") or a parameter (client_info=...)
    r"(?P<key>client_info[\"']?\s*[:=]\s*[\"']?)(?:\{[^}]*\}|[A-Za-z0-9_+/=-]+)"
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # JWTs
    r"|eyJ[A-Za-z0-9_+/-]{8,}=*"  # base64 of a JSON object: client_info anywhere, a JWT's payload
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/-]{16,}=*"  # bearer credentials
    r"|gAAAAA[A-Za-z0-9_-]{20,}=*"  # Fernet tokens
    r"|(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}="  # Fernet keys (32 url-safe base64 bytes)
    r"|(?<![A-Za-z0-9_.-])[01]\.A[A-Za-z0-9_.-]{20,}"  # Entra ID refresh tokens
    r"|[A-Za-z0-9_.-]{3}\dQ~[A-Za-z0-9_~.-]{31,}"  # Entra ID client secrets
)


def redact(message: str) -> str:
    """``message`` with every secret-shaped value replaced by ``[redacted]`` (keys kept)."""
    return _SECRETS.sub(lambda m: (m.group("key") or "") + "[redacted]", message)


class RedactSecrets(logging.Filter):
    """Redacts the formatted message of every record it sees; drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def logging_config(level: str = "INFO", log_format: str = "text") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` document: the root logger writes ``log_format`` to
    stderr through the redacting, request-id-adding filters. gunicorn's
    ``logconfig_dict`` extends it with its own loggers."""
    formatter: dict[str, Any] = (
        {"()": "pythonjsonlogger.json.JsonFormatter", "fmt": JSON_FIELDS, "rename_fields": JSON_RENAMED}
        if log_format == "json" else {"format": TEXT_FORMAT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": RedactSecrets}, "request_id": {"()": RequestIdFilter},
                    "trace": {"()": TraceContextFilter}},
        "formatters": {"flask_obo": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "flask_obo",
                                "filters": ["request_id", "trace", "redact"],
                                "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Configure the root logger unless someone (gunicorn's ``logconfig_dict``, a test
    harness) already has; either way every root handler gets the three filters."""
    root = logging.getLogger()
    if not root.handlers:
        logging.config.dictConfig(logging_config(level, log_format))
    for handler in root.handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
        if not any(isinstance(f, TraceContextFilter) for f in handler.filters):
            handler.addFilter(TraceContextFilter())
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
