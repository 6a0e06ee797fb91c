"""Request ids: one id follows a request everywhere it goes.

A caller's ``X-Request-ID`` is kept when it is well formed (at most 64 characters of
``[A-Za-z0-9._-]``: it is printed in logs and headers, so nothing else may get through);
otherwise one is made: 32 lowercase hex digits, 128 random bits from the operating
system (``secrets.token_hex``: unique across workers and instances, and saying nothing
about the process or the time, where ``uuid4().hex``, the same form, costs three times as
much per request). ``FlaskOBO`` sets it at the start of each request, returns it in
the response's ``X-Request-ID``, and sends it to Entra ID (as msal's ``client-request-id``,
its correlation id) and to downstream APIs (``client-request-id``, as Graph reads it).
``RequestIdFilter`` puts it, and the route, on every log record of the request.

It lives in a context variable rather than ``flask.g`` because msal's HTTP client and the
log filter run where no Flask context is guaranteed, and a context variable is what
each gthread request thread has of its own.
"""

from __future__ import annotations

import logging
import re
import secrets
from contextvars import ContextVar, Token

from flask import has_request_context, request

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_ENVIRON = "HTTP_X_REQUEST_ID"  # the header's key in a WSGI environ
CLIENT_REQUEST_ID_HEADER = "client-request-id"
_WELL_FORMED = re.compile(r"[A-Za-z0-9._-]{1,64}")
_request_id: ContextVar[str | None] = ContextVar("flask_obo_request_id", default=None)


def current_request_id() -> str | None:
    """This request's id; None outside a request."""
    return _request_id.get()


def begin_request(incoming: str | None) -> tuple[str, Token[str | None]]:
    """Take ``incoming`` if well formed, else make an id; it is current until ``end_request``."""
    request_id = incoming if incoming and _WELL_FORMED.fullmatch(incoming) else secrets.token_hex(16)
    return request_id, _request_id.set(request_id)


def end_request(token: Token[str | None]) -> None:
    _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (``-`` outside a request) and ``route`` (the URL rule, ``-``
    when none) to every record it sees; drops nothing. Put it on handlers, as
    ``RedactSecrets`` is: a logger's filters miss what its children propagate."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):  # gunicorn's access lines bring their own
            record.request_id = _request_id.get() or "-"
        if not hasattr(record, "route"):
            rule = request.url_rule if has_request_context() else None
            record.route = rule.rule if rule is not None else "-"
        return True
