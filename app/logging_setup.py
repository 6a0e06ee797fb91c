"""Logging with a last line of defence: anything shaped like a token is redacted.

The code never logs tokens, secrets or cache blobs on purpose (users appear by
partition hash); this filter catches what a library or a future change might let slip.
One library does, at DEBUG: msal logs each token response (``msal.token_cache``,
``event={... "client_info": "eyJ1aWQiOi..."}``) with the tokens masked but not
``client_info``, the base64 of the user's object id and (home) tenant id.

The filter sits on the root logger's handlers, not on loggers: a logger's filters see
only records logged through that very logger, not those its children (``msal.*``)
propagate, whereas a handler's see every record it writes, at every level.
"""

from __future__ import annotations

import logging
import re

_SECRETS = re.compile(
    # client_info's value, as JSON or repr ("client_info": "...") or a parameter (client_info=...)
    r"(?P<key>client_info[\"']?\s*[:=]\s*[\"']?)(?:\{[^}]*\}|[A-Za-z0-9_+/=-]+)"
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # JWTs
    r"|eyJ[A-Za-z0-9_+/-]{8,}=*"  # base64 of a JSON object: client_info anywhere, a JWT's payload
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/-]{16,}=*"  # bearer credentials
    r"|gAAAAA[A-Za-z0-9_-]{20,}=*"  # Fernet tokens
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


def configure_logging(level: str = "INFO") -> None:
    """Give the root logger one redacting stderr handler at ``level`` (``LOG_LEVEL``,
    validated by ``Settings``); idempotent, and keeps gunicorn's handlers and level."""
    root = logging.getLogger()
    if not root.handlers:
        handler: logging.Handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(level.upper())
    for handler in root.handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
