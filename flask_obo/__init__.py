"""flask-obo: protect a Flask API with Microsoft Entra ID and call Microsoft Graph (or any
Entra ID-protected API) on behalf of the signed-in user.

    from flask_obo import FlaskOBO, current_token

    obo = FlaskOBO(app)                     # or obo = FlaskOBO(); obo.init_app(app)

    @app.get("/api/files")
    @obo.require_scope("user_impersonation")
    def files():
        return obo.downstream("graph").get("/me/drive").json()

The seams, as in Microsoft.Identity.Web: protecting the API (``require_scope``,
``protect``, ``current_token``), acquiring tokens (``acquire_token``, On-Behalf-Of
through msal), the token cache (``TokenCacheStore``: Redis, sealed per user, with a
memory tier) and downstream APIs (``downstream``). Errors are ``flask_obo.errors``.
"""

from .cache_store import MemoryTokenCacheStore, RedisTokenCacheStore, TokenCacheStore
from .cli import loading_for_a_command, operator_app, settings_error_lines
from .downstream import DownstreamApi
from .extension import FlaskOBO
from .protector import EntraAccessToken, current_token
from .request_ids import RequestIdFilter, current_request_id
from .settings import DownstreamApiSettings, Env, Settings, SettingsError
from .tracing import TraceContextFilter

# The release, single-sourced: setup.cfg reads it (version = attr: flask_obo.__version__) and
# CHANGELOG.md's top entry names it.
__version__ = "1.0.0"

__all__ = [
    "DownstreamApi",
    "DownstreamApiSettings",
    "EntraAccessToken",
    "Env",
    "FlaskOBO",
    "MemoryTokenCacheStore",
    "RedisTokenCacheStore",
    "RequestIdFilter",
    "Settings",
    "SettingsError",
    "TokenCacheStore",
    "TraceContextFilter",
    "__version__",
    "current_request_id",
    "current_token",
    "loading_for_a_command",
    "operator_app",
    "settings_error_lines",
]
