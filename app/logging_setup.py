"""Logging with a last line of defence: anything shaped like a token is redacted.

The code never logs tokens, secrets or cache blobs on purpose (users appear by
partition hash); this filter catches what a library or a future change might let slip.
"""

from __future__ import annotations

import logging
import os
import re

_SECRETS = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # JWTs
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/-]{16,}=*"  # bearer credentials
    r"|gAAAAA[A-Za-z0-9_-]{20,}=*"  # Fernet tokens
)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _SECRETS.sub("[redacted]", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def configure_logging() -> None:
    """Give the root logger one redacting stderr handler (idempotent; keeps gunicorn's)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())
    for handler in root.handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
