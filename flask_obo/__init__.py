"""flask-obo: protect a Flask API with Microsoft Entra ID and call Microsoft Graph (or any
Entra ID-protected API) on behalf of the signed-in user.

    from flask_obo import FlaskOBO, current_token

    obo = FlaskOBO(app)                     # or obo = FlaskOBO(); obo.init_app(app)

    @app.get("/api/files")
    @obo.require_scope("user_impersonation")
    def files():
        return obo.downstream("graph").get("/me/drive").json()

The seams, as in Microsoft.Identity.Web: protecting the API (``require_scope``,
``require_app_role``, ``protect``, ``current_token``), acquiring tokens (``acquire_token``,
On-Behalf-Of through msal; ``acquire_app_token``, client credentials, for calls as the
app), the token cache (``TokenCacheStore``: Redis, sealed per user, with a memory tier;
a store raises ``StoreUnavailable`` and ``LockBusy``, never an HTTP error)
and downstream APIs (``downstream``, as the user or ``as_app``). Errors are
``flask_obo.errors``.
Beyond the request: ``background_handle`` and ``on_behalf_of=`` (jobs acting as a user,
``flask_obo.background``) and azure-core credentials for Azure SDKs and the Graph SDK
(``user_credential``, ``app_credential``: ``flask_obo.azure_credentials``, the ``azure`` extra).
A server's hooks call ``share_across_workers()`` in the master before it forks workers,
``prepare_worker(app)`` in a worker before it accepts requests, and ``retire_worker()``
when a worker process begins to go away.
"""

from .bulkhead import retire_worker
from .cache_store import MemoryTokenCacheStore, RedisTokenCacheStore, TokenCacheStore
from .cli import loading_for_a_command, operator_app, settings_error_lines
from .downstream import DownstreamApi
from .extension import FlaskOBO, prepare_worker
from .protector import EntraAccessToken, current_token
from .request_ids import RequestIdFilter, current_request_id
from .settings import DownstreamApiSettings, Env, Settings, SettingsError
from .store_errors import LockBusy, StoreUnavailable
from .tracing import TraceContextFilter
from .worker_state import share_across_workers

# The release, single-sourced: setup.cfg reads it (version = attr: flask_obo.__version__) and
# CHANGELOG.md's top entry names it.
__version__ = "1.0.0"

__all__ = [
    "DownstreamApi",
    "DownstreamApiSettings",
    "EntraAccessToken",
    "Env",
    "FlaskOBO",
    "LockBusy",
    "MemoryTokenCacheStore",
    "RedisTokenCacheStore",
    "RequestIdFilter",
    "Settings",
    "SettingsError",
    "StoreUnavailable",
    "TokenCacheStore",
    "TraceContextFilter",
    "__version__",
    "current_request_id",
    "current_token",
    "loading_for_a_command",
    "operator_app",
    "prepare_worker",
    "retire_worker",
    "settings_error_lines",
    "share_across_workers",
]
