"""gunicorn's own error answers, in the API's JSON error vocabulary.

gunicorn answers some requests before they reach Flask: a header or a request line over
its limits (431, 414), a malformed request (400), and a few protocol errors. Out of the
box it writes an HTML page quoting what the client sent, which contradicts the API's
document (``/openapi.json``: every error is JSON ``{error, error_description}``).
``install()`` (called by config/gunicorn.conf.py when gunicorn starts, so the workers
inherit it) replaces that page with ``flask_obo.errors.http_error``'s JSON: the same code
and fixed description Flask would answer the status with, never the client's text.
"""

from __future__ import annotations

import json
import socket

from gunicorn import util

from flask_obo.errors import http_error


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error`` signature; ``mesg`` (client text) is never sent."""
    error = http_error(status_int)
    body = json.dumps({"error": error.error, "error_description": error.description}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


def install() -> None:
    """Make gunicorn (this process and the workers it forks) answer its errors as JSON."""
    util.write_error = write_json_error
