"""flask-obo: a Flask API that calls Microsoft Graph on behalf of the signed-in user."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from cryptography.fernet import Fernet
from flask import Flask, current_app, request
from flask_cors import CORS
from werkzeug.exceptions import RequestEntityTooLarge

from . import errors, protector
from .authority import AuthorityDiskCache, OpenIdConfiguration, SigningKeys
from .cache_store import MemoryTokenCacheStore, RedisTokenCacheStore, TokenCacheStore
from .graph_client import GraphClient
from .health import health
from .http import build_session
from .logging_setup import configure_logging
from .routes import api
from .settings import Settings
from .token_acquisition import OnBehalfOfTokenProvider
from .token_cache import TokenCacheCodec

log = logging.getLogger(__name__)


def create_app(settings: Settings | Mapping[str, str] | None = None,
               store: TokenCacheStore | None = None) -> Flask:
    """Build the API. Nothing touches the network here: keys and metadata load lazily.

    ``settings`` may be a ``Settings``, a mapping of environment variables, or None for
    the process environment (plus ``.env``). ``store`` overrides the token-cache store.
    """
    if not isinstance(settings, Settings):
        settings = Settings.from_env(settings)
    configure_logging()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    app.json.sort_keys = False

    session = build_session(settings.graph_base_url)
    # The last good metadata and keys on disk: a recycled worker validates during an outage.
    disk = AuthorityDiskCache(settings.authority_cache_dir)
    entra_timeout = (settings.entra_connect_timeout, settings.entra_read_timeout)
    metadata = OpenIdConfiguration(settings.openid_configuration_url, session, disk=disk,
                                   timeout=entra_timeout)
    keys = SigningKeys(metadata, session, disk=disk, timeout=entra_timeout)
    store = store or _token_cache_store(settings)
    # Without REDIS_URL the in-process cache is sealed too, with a key that dies with the process.
    codec = TokenCacheCodec(settings.token_cache_keys or (Fernet.generate_key().decode(),))

    errors.init_app(app)
    app.before_request(_refuse_large_bodies)
    protector.init_app(app, settings, keys)
    app.extensions.update({
        "flask-obo.settings": settings,
        "flask-obo.keys": keys,
        "flask-obo.store": store,
        "flask-obo.tokens": OnBehalfOfTokenProvider(settings, store, codec, session, metadata),
        "flask-obo.graph": GraphClient(settings.graph_base_url, session),
    })
    app.register_blueprint(health)
    app.register_blueprint(api)
    if settings.cors_allowed_origins:
        CORS(
            app,
            resources={r"/api/*": {"origins": list(settings.cors_allowed_origins)}},
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["WWW-Authenticate", "Retry-After"],
            methods=["GET", "OPTIONS"],
            max_age=600,
        )
    return app


def _refuse_large_bodies() -> None:
    """No route reads a body, so Werkzeug's own limit would never fire: check up front."""
    if (request.content_length or 0) > current_app.config["MAX_CONTENT_LENGTH"]:
        raise RequestEntityTooLarge()


def _token_cache_store(settings: Settings) -> TokenCacheStore:
    if settings.redis_url:
        return RedisTokenCacheStore.from_settings(settings)
    log.warning(
        "REDIS_URL is not set: tokens are cached in this process only (for local use; "
        "other workers and instances will not share them)"
    )
    return MemoryTokenCacheStore(settings.token_cache_ttl_seconds)
