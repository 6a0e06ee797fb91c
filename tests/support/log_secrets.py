"""Secrets in logs, looked for over the whole suite: no JWT, refresh token, client secret,
Fernet key or Fernet token may appear in a log line the API writes, in-process (every
record reaching the root logger, after the redaction the API's handlers apply) or from
a gunicorn it runs (its log file, checked when it stops)."""

from __future__ import annotations

import logging
import re

from app.logging_setup import RedactSecrets
from tests.support.fake_entra import CLIENT_SECRET

_DEVTENANT_SECRET = "Dev8Q~flaskobo.devtenant.secret-NOT-FOR-PRODUCTION"  # devtenant.API_CLIENT_SECRET
SECRET = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\."  # a JWT (header.payload.)
    r"|gAAAAA[A-Za-z0-9_-]{20,}"  # a Fernet token
    r"|(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}="  # a Fernet key
    r"|(?<![A-Za-z0-9_.-])[01]\.A[A-Za-z0-9_.-]{20,}"  # an Entra ID (or dev tenant) refresh token
    r"|rt-[0-9a-f]{8}-[0-9a-f-]{27}-\d+-"  # the test double's refresh tokens
    rf"|{re.escape(CLIENT_SECRET)}|{re.escape(_DEVTENANT_SECRET)}"
)


def find_secret(text: str) -> str | None:
    """A short, non-secret description of the first secret in ``text``, if any."""
    match = SECRET.search(text)
    return f"{match.group()[:8]}… at {match.start()}" if match else None


class SecretDetector(logging.Handler):
    """A root handler that records where a secret would have been written."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RedactSecrets())  # what the API's own handlers do first
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = find_secret(record.getMessage())
        if found:
            self.leaks.append(f"{record.name} {record.levelname}: {found}")
