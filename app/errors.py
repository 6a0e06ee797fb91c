"""The reference API's error pages: every answer is JSON, as an SPA's fetch expects.

``FlaskOBO`` renders only flask-obo's own errors (``ApiError``); what an API answers for a
route that does not exist, a method it does not take, a body too large or a bug is the
application's choice. This API's choice: the same ``{"error", "error_description"}``
shape for all of them (``flask_obo.errors.http_error``), and a bug is a logged 500 whose
log line names the exception's type and frames, never its text (it may quote a token).
"""

from __future__ import annotations

import logging
import traceback

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from flask_obo.errors import ApiError, http_error

log = logging.getLogger(__name__)


def register_json_errors(app: Flask) -> None:
    """Every HTTP error as JSON; any other exception as a logged JSON 500."""

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        response = http_error(exc.code or 500).response()
        allowed = getattr(exc, "valid_methods", None)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.error("unhandled %s\n%s", type(exc).__name__, frames)
        return ApiError().response()
