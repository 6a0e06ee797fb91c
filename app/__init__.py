"""The reference API: flask-obo's own Flask API, built only from ``flask_obo``'s public API.

It is the example for users: ``/api/whoami`` reads the validated token (a user's, or an
application's with the app role ``API_APP_ROLE``), ``/api/me`` and
``/api/me/manager`` call Microsoft Graph on behalf of the caller, ``DELETE
/api/me/token-cache`` signs the caller out of the token cache, ``/healthz`` and
``/readyz`` are the probes, ``/openapi.json`` describes them all and ``/metrics`` is for
Prometheus. Everything else here is
deployment: logging, CORS for the SPA, a small body limit.
"""

from __future__ import annotations

from collections.abc import Mapping

from flask import Flask, current_app, request
from flask_cors import CORS
from werkzeug.exceptions import RequestEntityTooLarge

from flask_obo import Settings, TokenCacheStore

from .errors import register_json_errors
from .extensions import obo
from .health import health
from .logging_setup import configure_logging
from .openapi import openapi
from .routes import api, identity_blueprint


def create_app(settings: Settings | Mapping[str, str] | None = None,
               store: TokenCacheStore | None = None) -> Flask:
    """Build the API. Nothing touches the network here: keys and metadata load lazily.

    ``settings`` may be a ``Settings``, a mapping of environment variables, or None for
    the process environment (plus ``.env``). ``store`` overrides the token-cache store.
    """
    if not isinstance(settings, Settings):
        settings = Settings.from_env(settings)  # None: the environment and .env
    configure_logging(settings.log_level, settings.log_format)
    app = Flask(__name__, static_folder=None)  # no static files: every route is API (/openapi.json)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    app.json.sort_keys = False  # type: ignore[attr-defined]
    obo.init_app(app, settings, store=store)
    register_json_errors(app)
    # Prometheus's scrape, on the API port with no token: nginx refuses it from outside.
    app.add_url_rule("/metrics", "metrics", obo.metrics_view)
    app.before_request(_refuse_large_bodies)
    app.register_blueprint(health)
    app.register_blueprint(identity_blueprint(settings.api_app_role))
    app.register_blueprint(api)
    app.register_blueprint(openapi)
    if settings.cors_allowed_origins:
        CORS(
            app,
            resources={r"/api/*": {"origins": list(settings.cors_allowed_origins)}},
            # traceparent/tracestate: an SPA's OpenTelemetry (W3C trace context) continues into the API.
            allow_headers=["Authorization", "Content-Type", "traceparent", "tracestate"],
            expose_headers=["WWW-Authenticate", "Retry-After"],
            methods=["GET", "DELETE", "OPTIONS"],  # DELETE: the SPA's sign-out (token cache)
            max_age=600,
        )
    return app


def _refuse_large_bodies() -> None:
    """No route reads a body, so Werkzeug's own limit would never fire: check up front."""
    if (request.content_length or 0) > current_app.config["MAX_CONTENT_LENGTH"]:
        raise RequestEntityTooLarge()
