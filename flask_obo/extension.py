"""``FlaskOBO``: the extension object, the one thing an application holds.

``init_app`` builds each application's services once (the pooled HTTP session, the
authority's metadata and keys, the protector, the token cache store, the token
provider and the downstream APIs) and keeps them in one typed ``OboServices`` under
``app.extensions["flask-obo"]``, as Flask extensions do, so one ``FlaskOBO`` can serve
several applications (an app factory called by each test, say). Nothing touches the
network there: keys and metadata load on first use.

The request path reads top-down: ``require_scope``/``protect`` (the protector) →
``acquire_token`` (the token provider and the user's cache) → ``downstream(name)``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.fernet import Fernet
from flask import Blueprint, Flask, Response, after_this_request, current_app, g, request

from .app_tokens import AppTokenProvider
from .authority import AuthorityDiskCache, OpenIdConfiguration, SigningKeys, TenantConfigurations
from .background import BackgroundHandles
from .cache_store import MemoryTokenCacheStore, RedisTokenCacheStore, TokenCacheStore
from .cli import register_commands
from .credentials import client_credential
from .diagnosis import REDIS, STATUS, Diagnosis
from .downstream import DownstreamApi
from .errors import (
    DownstreamNotConfigured,
    UserTokenRequired,
    register_error_handlers,
    store_signals_answered,
)
from .http import build_session
from .metrics import Metrics
from .protector import (
    EntraAccessToken,
    EntraResourceProtector,
    EntraTokenValidator,
    current_token,
    validated_token,
)
from .request_ids import REQUEST_ID_ENVIRON, REQUEST_ID_HEADER, begin_request, end_request
from .settings import Settings
from .token_acquisition import OnBehalfOfTokenProvider
from .token_cache import TokenCacheCodec, partition_key
from .tracing import VALIDATE_SPAN, instrument_app, span

if TYPE_CHECKING:  # azure-core is an optional extra (flask-obo[azure])
    from .azure_credentials import AppCredential, AsyncCredential, UserCredential

log = logging.getLogger(__name__)

EXTENSION_KEY = "flask-obo"
View = TypeVar("View", bound=Callable[..., Any])


@dataclass(frozen=True)
class OboServices:
    """One application's flask-obo services, built by ``FlaskOBO.init_app``."""

    settings: Settings
    keys: SigningKeys
    protector: EntraResourceProtector
    store: TokenCacheStore
    codec: TokenCacheCodec
    tokens: OnBehalfOfTokenProvider
    downstream_apis: Mapping[str, DownstreamApi]
    metrics: Metrics
    diagnosis: Diagnosis  # misconfigurations met at run time (/readyz, the log)
    app_tokens: AppTokenProvider
    downstream_app_apis: Mapping[str, DownstreamApi]  # the same APIs, called as the app
    handles: BackgroundHandles


class FlaskOBO:
    """Protect a Flask API with Entra ID and call downstream APIs on behalf of its users.

    ``FlaskOBO(app)``, or ``obo = FlaskOBO()`` then ``obo.init_app(app)`` in a factory.
    """

    def __init__(self, app: Flask | None = None, **options: Any) -> None:
        if app is not None:
            self.init_app(app, **options)

    def init_app(self, app: Flask, settings: Settings | Mapping[str, str] | None = None,
                 store: TokenCacheStore | None = None) -> None:
        """Build ``app``'s services, register the JSON rendering of flask-obo's own errors
        (``ApiError``; the application's other errors stay its own) and the ``flask
        token-cache`` commands, and count every request in the application's metrics
        (``metrics_view`` serves them). Once per application: a second call raises
        ``RuntimeError``.

        ``settings``: a ``Settings``, a mapping of setting names to values (used alone),
        or None for ``app.config`` overlaid on the environment (``Settings.from_app_config``).
        ``store``: the token cache store; by default Redis when ``REDIS_URL`` is set,
        else this process's memory. Raises ``SettingsError`` naming a bad setting.
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                f"FlaskOBO.init_app has already been called for the application {app.name!r}: "
                "its hooks and commands would be registered twice")
        if settings is None:
            settings = Settings.from_app_config(app.config)
        elif not isinstance(settings, Settings):
            settings = Settings.from_env(settings)
        for warning in settings.warnings:  # a typo in a setting's name would otherwise pass unseen
            log.warning("%s", warning)
        diagnosis = Diagnosis()
        session = build_session([api.base_url for api in settings.downstream_apis.values()],
                                [settings.authority_host])
        # The last good metadata and keys on disk: a recycled worker validates during an outage.
        disk = AuthorityDiskCache(settings.authority_cache_dir)
        entra_timeout = settings.entra_timeout
        metadata = OpenIdConfiguration(settings.openid_configuration_url, session, disk=disk,
                                       timeout=entra_timeout, diagnosis=diagnosis)
        keys = SigningKeys(metadata, session, disk=disk, timeout=entra_timeout, diagnosis=diagnosis)
        metrics = Metrics()  # this application's own registry: apps in one process never collide
        store = store or _default_store(settings, metrics)
        if isinstance(store, RedisTokenCacheStore):
            store.report_to(metrics)
            store.diagnosis = diagnosis
        # Without REDIS_URL the in-process cache is sealed too, with a key that dies with the process.
        cache_keys = settings.token_cache_keys or (Fernet.generate_key().decode(),)
        codec = TokenCacheCodec(cache_keys)
        tenants = TenantConfigurations(
            metadata, session, authority_host=settings.authority_host, allowed=settings.tenant_allowed,
            multi_tenant=settings.multi_tenant, disk=disk, timeout=entra_timeout, diagnosis=diagnosis)
        credential = client_credential(settings)
        tokens = OnBehalfOfTokenProvider(settings, store, codec, session, tenants, credential, metrics)
        app_tokens = AppTokenProvider(settings, store, codec, session, tenants, credential, metrics)
        app.extensions[EXTENSION_KEY] = OboServices(
            settings=settings,
            keys=keys,
            protector=EntraResourceProtector(EntraTokenValidator(settings, keys)),
            store=store,
            codec=codec,
            tokens=tokens,
            downstream_apis={
                name: DownstreamApi(name, api, session, self.acquire_token, metrics)
                for name, api in settings.downstream_apis.items()
            },
            metrics=metrics,
            diagnosis=diagnosis,
            app_tokens=app_tokens,
            downstream_app_apis={
                # The same API (its timeout too), asked with the app's scopes.
                name: DownstreamApi(name, replace(api, scopes=api.app_scopes), session,
                                    self._app_token_source, metrics)
                for name, api in settings.downstream_apis.items()
            },
            handles=BackgroundHandles(cache_keys, settings.client_id),
        )
        register_error_handlers(app)
        begin, finish = _request_hooks(metrics)
        app.before_request(begin)
        app.after_request(finish)
        app.teardown_request(_end_request)
        register_commands(app)
        instrument_app(app)  # OpenTelemetry, when OTEL_EXPORTER_OTLP_*ENDPOINT asks (flask_obo.tracing)

    # --- protecting the API ----------------------------------------------------------------------
    def require_scope(self, scope: str | None = None, *,
                      app_roles: Sequence[str] = ()) -> Callable[[View], View]:
        """A view decorator: the request needs a valid access token, else 401/403 with an
        RFC 6750 challenge. A delegated token needs ``scope`` (default:
        ``API_REQUIRED_SCOPE``); an app-only token (a daemon's) one of ``app_roles``, and
        with none it is refused (403 ``insufficient_scope``). The answer is marked
        ``Cache-Control: no-store``: it is one caller's data."""
        return self._guard(scope, _roles(app_roles), delegated=True)

    def require_app_role(self, *roles: str) -> Callable[[View], View]:
        """A view decorator for routes only applications call: an app-only token with one
        of ``roles``; any other token (a user's, too) gets 403 ``insufficient_scope``."""
        if not roles:
            raise ValueError("require_app_role needs at least one role")
        return self._guard(None, _roles(roles), delegated=False)

    def _guard(self, scope: str | None, app_roles: tuple[str, ...],
               delegated: bool) -> Callable[[View], View]:
        def decorate(view: View) -> View:
            @functools.wraps(view)
            def protected(*args: Any, **kwargs: Any) -> Any:
                after_this_request(_private)  # errors too: they are about this caller's token
                self._authenticate(scope, app_roles, delegated)
                return view(*args, **kwargs)

            return protected  # type: ignore[return-value]

        return decorate

    def protect(self, blueprint: Blueprint, scope: str | None = None,
                app_roles: Sequence[str] = ()) -> None:
        """``require_scope(scope, app_roles=app_roles)`` on every route of ``blueprint``.
        Only a CORS preflight passes without a token (browsers send none with it): an
        ``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method`` that Flask
        answers itself. Any other ``OPTIONS`` is authenticated like every method, and so
        is every ``OPTIONS`` to a view that handles that method itself."""
        roles = _roles(app_roles)

        @blueprint.before_request
        def _authenticate() -> None:
            if not _is_cors_preflight():
                self._authenticate(scope, roles, delegated=True)

        blueprint.after_request(_private)

    def authenticate(self, scope: str | None = None, app_roles: Sequence[str] = ()) -> None:
        """Validate the current request's token as ``require_scope(scope, app_roles=...)``
        does; then ``current_token`` holds it. Raises the ``ApiError`` to answer with."""
        self._authenticate(scope, _roles(app_roles), delegated=True)

    def _authenticate(self, scope: str | None, app_roles: tuple[str, ...], delegated: bool) -> None:
        services = self._services()
        required = (scope or services.settings.required_scope) if delegated else None
        with span(VALIDATE_SPAN):
            services.protector.authenticate(required, app_roles)

    # --- acquiring tokens and calling downstream APIs --------------------------------------------
    def acquire_token(self, scopes: Sequence[str], claims_challenge: str | None = None, *,
                      on_behalf_of: str | None = None) -> str:
        """An access token for ``scopes`` (one resource) on behalf of ``current_token``'s user,
        from the memory tier, the shared cache or Entra ID (On-Behalf-Of) in that order.
        With ``claims_challenge`` (a downstream API's decoded claims), always a fresh one.

        ``on_behalf_of``: a background handle (``background_handle``) instead, in a job
        (any process with the same settings, within an app context): that user's cache
        entry and refresh token serve it. Raises ``InvalidBackgroundHandle`` (a handle not
        issued here, or altered), ``BackgroundHandleRevoked`` (the user signed out since)
        or ``RefreshTokenExpired`` (Entra ID no longer honours the refresh token)."""
        if isinstance(scopes, str):
            raise TypeError("scopes must be a list of scopes, not one string")
        services = self._services()
        if on_behalf_of is not None:
            return services.tokens.acquire_token(services.handles.open(on_behalf_of), scopes,
                                                 claims_challenge)
        # The token itself, not the ``current_token`` proxy: the proxy would look it up
        # again for every attribute read on the way (is_app, oid, tid).
        user = _refuse_app_tokens(validated_token())
        return services.tokens.acquire_token(user, scopes, claims_challenge)

    def acquire_app_token(self, scopes: Sequence[str], tenant: str | None = None) -> str:
        """The API's own access token (client credentials, no user) for ``scopes``: exactly
        one ``<resource>/.default``, e.g. ``["https://graph.microsoft.com/.default"]``.

        Works inside or outside a request (a CLI command, a background job) within an
        application context. ``tenant``: a tenant id (GUID) this API serves; None is
        ``AZURE_TENANT_ID`` (a multi-tenant API must name one). Served from this worker's
        memory, then Redis, then Entra ID, one call at a time per tenant and resource across
        workers and instances; renewed in the background before it expires; served while
        unexpired through Entra ID and Redis outages.

        Returns the access token (a string) to send as ``Authorization: Bearer <token>``.
        Raises ``TypeError``/``ValueError`` for bad ``scopes`` or ``tenant``;
        ``IdentityProviderUnavailable`` (503) when Entra ID is unreachable,
        slow or throttling and no unexpired token is cached; ``TokenAcquisitionFailed``
        (502) when Entra ID refuses (the API's credential, an unknown resource, no admin
        consent: logged with its AADSTS codes); ``TokenAcquisitionBusy``/``TooManyWaiting``
        (503) when another caller's acquisition holds it up past
        ``TOKEN_ACQUISITION_TIMEOUT_SECONDS``; ``RuntimeError`` outside an application
        context. The 502 and 503 ones are ``flask_obo.errors.ApiError``s: in a route they
        become the JSON answer by themselves; in a job, a 503's ``headers["Retry-After"]``
        says when to retry."""
        return self._services().app_tokens.acquire(scopes, tenant)

    def _app_token_source(self, scopes: Sequence[str], claims_challenge: str | None) -> str:
        """What ``downstream(name, as_app=True)`` sends: the app token of the API's tenant
        (a multi-tenant API: of the caller's tenant, in a protected request)."""
        services = self._services()
        tenant = None
        if services.settings.multi_tenant and isinstance(g.get("flask_obo_token"), dict):
            tenant = current_token.tid
        return services.app_tokens.acquire(scopes, tenant, claims_challenge)

    def downstream(self, name: str, as_app: bool = False, *,
                   on_behalf_of: str | None = None) -> DownstreamApi:
        """The configured downstream API ``name``: ``graph`` (``GRAPH_BASE_URL``,
        ``GRAPH_SCOPES``) or one of ``DOWNSTREAM_APIS__<NAME>__BASE_URL`` / ``__SCOPES``,
        called on behalf of the current request's user; with ``as_app``, as the API itself
        with app tokens (``acquire_app_token``) for ``GRAPH_APP_SCOPES`` /
        ``DOWNSTREAM_APIS__<NAME>__APP_SCOPES`` (default ``<resource>/.default``); with
        ``on_behalf_of`` (a background handle), as the handle's user."""
        if as_app and on_behalf_of is not None:
            raise TypeError("downstream() calls as the app or as a handle's user, not both")
        services = self._services()
        apis = services.downstream_app_apis if as_app else services.downstream_apis
        try:
            api = apis[name.lower()]
        except KeyError:
            error = DownstreamNotConfigured(name, tuple(sorted(apis)))
            log.error("%s (set DOWNSTREAM_APIS__%s__BASE_URL and __SCOPES, or fix the name)",
                      error, name.upper() if name.isidentifier() else "<NAME>")
            raise error from None
        if on_behalf_of is None:
            return api
        user = services.handles.open(on_behalf_of)  # refused here, before any I/O, if not genuine
        tokens = services.tokens
        return api.with_tokens(lambda scopes, claims: tokens.acquire_token(user, scopes, claims))

    # --- work that outlives the request, and Azure SDK credentials ------------------------------
    def background_handle(self, scopes: Sequence[str] | None = None) -> str:
        """An opaque handle on the current request's user, for a background job to act as
        them later (``acquire_token``/``downstream``/``user_credential`` with
        ``on_behalf_of=handle``), in any process with the same settings.

        The user's cache entry must hold a refresh token for the job to renew from: this
        acquires a token for ``scopes`` first (default: ``GRAPH_SCOPES``; from the cache
        when there is one, else one On-Behalf-Of exchange). The handle is encrypted and
        authenticated (keys derived from ``TOKEN_CACHE_KEYS``): it names no one to whoever
        holds it, and stops working when the user signs out (``forget_user``)."""
        services = self._services()
        user = _request_user("obo.background_handle()")
        self.acquire_token(list(scopes or services.settings.graph_scopes))
        return services.handles.issue(user, services.tokens.generation(user))

    def user_credential(self, *, on_behalf_of: str | None = None) -> UserCredential:
        """An azure-core ``TokenCredential`` (``get_token``, ``get_token_info``) acting for
        the current request's user, for Azure SDK clients and ``msgraph-sdk``: tokens for
        whatever scopes the SDK asks come through ``acquire_token``'s cache, single flight
        and claims-challenge handling. Make it inside the request (it keeps the user);
        outside one, pass a background handle as ``on_behalf_of``. Needs azure-core
        (``pip install flask-obo[azure]``)."""
        from .azure_credentials import UserCredential

        services = self._services()
        user = (_request_user("obo.user_credential()") if on_behalf_of is None
                else services.handles.open(on_behalf_of))
        return UserCredential(services.tokens, user)

    def async_user_credential(self, *, on_behalf_of: str | None = None) -> AsyncCredential:
        """``user_credential`` for async clients (azure-core's ``AsyncTokenCredential``),
        such as ``msgraph-sdk``'s ``GraphServiceClient``: acquisition runs in a worker
        thread, never blocking the event loop."""
        from .azure_credentials import AsyncCredential

        return AsyncCredential(self.user_credential(on_behalf_of=on_behalf_of))

    def app_credential(self, tenant: str | None = None) -> AppCredential:
        """An azure-core ``TokenCredential`` acting as the API itself (client credentials,
        ``acquire_app_token``'s cache and renewal), inside or outside a request within an
        application context. ``tenant``: as ``acquire_app_token``'s (an SDK's ``tenant_id``
        wins). Needs azure-core (``pip install flask-obo[azure]``)."""
        from .azure_credentials import AppCredential

        return AppCredential(self._services().app_tokens, tenant)

    def async_app_credential(self, tenant: str | None = None) -> AsyncCredential:
        """``app_credential`` for async clients (azure-core's ``AsyncTokenCredential``)."""
        from .azure_credentials import AsyncCredential

        return AsyncCredential(self.app_credential(tenant))

    def forget_user(self) -> None:
        """Sign-out: remove ``current_token``'s user's cached downstream tokens everywhere.

        The entry goes from the shared cache under the user's lock (after any acquisition
        in flight), and this worker's memory copy at once; other workers and instances drop
        theirs within a second (the invalidation channel). The user's next downstream call
        makes a new On-Behalf-Of exchange. Raises ``CacheUnavailable`` (503) when Redis
        cannot be reached: nothing was removed then, ``TokenAcquisitionBusy`` (503) when the
        user's lock stays taken, and ``UserTokenRequired`` (403) for an app-only token: it
        has no user's tokens."""
        user = _refuse_app_tokens(validated_token())
        with store_signals_answered():  # the request cannot go on without the store
            self._services().tokens.forget(partition_key(user.oid, user.tid))
    # --- metrics -------------------------------------------------------------------------------
    def metrics_view(self) -> Response:
        """A view serving the current application's metrics in Prometheus's text format
        (``app.add_url_rule("/metrics", view_func=obo.metrics_view)``). Under gunicorn with
        ``config/gunicorn.conf.py``, every worker's counts, summed. It needs no token:
        keep it off the public network (``config/nginx.conf`` refuses it from outside)."""
        body, content_type = self._services().metrics.exposition()
        response = Response(body, content_type=content_type)
        response.headers["Cache-Control"] = "no-store"
        return response

    # --- state -----------------------------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        """The current application's settings."""
        return self._services().settings

    def readiness(self) -> dict[str, str]:
        """What a readiness probe reports, with no call to Entra ID and at most one Redis
        PING: ``redis`` is ``ok``, ``degraded`` (down or its circuit open: users are served
        from memory and Entra ID meanwhile), ``misconfigured`` (it refuses the password or
        ACL user: served from memory meanwhile too) or ``not_configured``; ``authority`` is
        ``ok``, ``stale`` (keys kept past their refresh time while Entra ID is down),
        ``unavailable`` (none loaded yet) or ``misconfigured`` (a wrong tenant, an untrusted
        CA); ``credential`` is there only as ``rejected`` (Entra ID refuses the API's own
        credential or does not know its client id). ``misconfiguration`` says why."""
        services = self._services()
        checks = {"redis": services.store.status(), "authority": services.keys.status()}
        if checks["redis"] == "ok":
            services.diagnosis.clear(REDIS)  # it answered: a fixed password is not a sticky failure
        for component in services.diagnosis.findings():
            checks[component] = STATUS[component]
        return checks

    def misconfiguration(self) -> dict[str, str]:
        """For each misconfigured component (see ``readiness``), its reason code
        (``AADSTS90002``, ``AADSTS7000215``, ``untrusted_ca``, ``redis_auth``...): what
        ``/readyz`` answers 503 with. Empty when nothing is known to be misconfigured."""
        return {component: finding.cause.reason
                for component, finding in self._services().diagnosis.findings().items()}

    @staticmethod
    def _services() -> OboServices:
        return services_of(current_app)


def prepare_worker(app: object) -> None:
    """Look at the token cache's Redis once, before a server's worker takes its first
    request: one PING, bounded by ``REDIS_TIMEOUT_SECONDS``.

    Call it in each worker once the application is loaded and before it accepts
    connections (gunicorn: ``post_worker_init``, with ``worker.wsgi``, as
    ``config/gunicorn.conf.py`` does). A worker started while Redis hangs (recycled in a
    pause, say) then opens its circuit there, and its siblings' with
    ``share_across_workers()``, while the others serve, instead of in a user's request
    that would wait the timeout and then exchange. ``app``: the worker's WSGI application;
    one that is not a Flask application with flask-obo is left alone.
    """
    services = app.extensions.get(EXTENSION_KEY) if isinstance(app, Flask) else None
    if isinstance(services, OboServices):
        services.store.status()


def services_of(app: Flask) -> OboServices:
    """``app``'s services (for tests and tools; routes go through ``FlaskOBO``)."""
    services = app.extensions.get(EXTENSION_KEY)
    if not isinstance(services, OboServices):
        raise RuntimeError("FlaskOBO.init_app(app) has not been called for this application")
    return services


def _request_user(what: str) -> EntraAccessToken:
    """The current request's validated token, itself (not the proxy): kept by an object
    that may be used after the request, or in another thread."""
    try:
        token = validated_token()
    except RuntimeError:  # no request, or no token validated in it
        raise RuntimeError(
            f"{what} acts for the user of a protected request: call it inside a view protected by "
            "require_scope or protect (a background job passes on_behalf_of=<background handle>)"
        ) from None
    return _refuse_app_tokens(token)


def _roles(app_roles: Sequence[str]) -> tuple[str, ...]:
    if isinstance(app_roles, str):
        raise TypeError("app_roles must be a list of role names, not one string")
    return tuple(app_roles)


def _refuse_app_tokens(token: EntraAccessToken) -> EntraAccessToken:
    """``token``, unless it is app-only: on-behalf-of work needs a user, and such a token
    is refused before any call."""
    if token.is_app:
        raise UserTokenRequired(services_of(current_app).settings.required_scope)
    return token


def _end_request(_: BaseException | None) -> None:
    token = request.environ.pop(_REQUEST_ID_TOKEN, None)
    if token is not None:
        end_request(token)


# In the request's WSGI environ, where one lookup of ``request`` reaches all three (``g``
# would cost a context lookup per attribute): its start (``time.perf_counter()``), its id,
# and the context variable's token that ends it.
_STARTED = "flask_obo.started"
_REQUEST_ID = "flask_obo.request_id"
_REQUEST_ID_TOKEN = "flask_obo.request_id_token"


def _request_hooks(metrics: Metrics) -> tuple[Callable[[], None], Callable[[Response], Response]]:
    """The ``before_request``/``after_request`` pair of every request: the request id
    (taken or made, then returned in ``X-Request-ID``), and the count in
    ``flask_obo_requests_total{route, status}`` and ``flask_obo_request_seconds``.

    One hook each way, not one per concern: Flask pays a few microseconds per hook
    (``ensure_sync`` inspects each function on every call), a measurable share of a
    request that only validates a token. The route is the URL rule (``/api/me``,
    ``/items/<int:item>``), never the raw path, so a client cannot make up label values;
    unmatched requests (404, 405) share one. ``after_request`` functions run in reverse
    order of registration, so those an app registers after ``init_app`` (CORS, say) have
    run by then. Bound to ``metrics`` and touching Flask's context proxies once each:
    they are the costly part (see docs/how-to/metrics-and-logs.md)."""

    def begin() -> None:
        environ = request.environ
        environ[_STARTED] = time.perf_counter()
        # The header as WSGI hands it over: ``request.headers.get`` would build and catch
        # a KeyError subclass on every request that brings none.
        environ[_REQUEST_ID], environ[_REQUEST_ID_TOKEN] = begin_request(environ.get(REQUEST_ID_ENVIRON))

    def finish(response: Response) -> Response:
        current = request._get_current_object()  # type: ignore[attr-defined]
        environ = current.environ
        started = environ.get(_STARTED)
        rule = current.url_rule
        metrics.request(rule.rule if rule is not None else None, response.status_code,
                        None if started is None else time.perf_counter() - started)
        request_id = environ.get(_REQUEST_ID)
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    return begin, finish


def _is_cors_preflight() -> bool:
    """The one request a browser sends without credentials before a cross-origin call
    (Fetch standard, "CORS-preflight request"), answered by Flask's automatic ``OPTIONS``
    response: it reveals nothing and changes nothing. Anyone can send those two headers,
    so a route whose view handles ``OPTIONS`` itself is never exempted: its view would
    run without a token."""
    current = request._get_current_object()  # type: ignore[attr-defined]
    if current.method != "OPTIONS":  # (every other request: one context lookup)
        return False
    headers = current.headers
    return ("Origin" in headers and "Access-Control-Request-Method" in headers
            and bool(getattr(current.url_rule, "provide_automatic_options", False)))


def _private(response: Response) -> Response:
    """No shared cache (CDN, proxy) may keep a protected answer, whichever origin asked.
    (The header is edited as a string: ``response.vary`` builds a ``HeaderSet`` with an
    update callback, several times the cost, on every protected request.)"""
    headers = response.headers
    headers["Cache-Control"] = "no-store"
    # getlist, not get: get raises and catches a KeyError subclass when there is no Vary
    # (most answers); every Vary header counts, should there be several.
    vary = ", ".join(headers.getlist("Vary"))
    if not vary:
        headers["Vary"] = "Origin"
    elif "origin" not in {value.strip().lower() for value in vary.split(",")}:
        headers["Vary"] = f"{vary}, Origin"
    return response


def _default_store(settings: Settings, metrics: Metrics) -> TokenCacheStore:
    if settings.redis_url:
        return RedisTokenCacheStore.from_settings(settings, metrics)
    log.warning(
        "REDIS_URL is not set: tokens are cached in this process only (for local use; "
        "other workers and instances will not share them)"
    )
    return MemoryTokenCacheStore(settings.token_cache_ttl_seconds)
