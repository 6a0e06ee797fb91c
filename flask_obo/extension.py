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
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.fernet import Fernet
from flask import Blueprint, Flask, Response, after_this_request, current_app, g, request

from .authority import AuthorityDiskCache, OpenIdConfiguration, SigningKeys, TenantConfigurations
from .cache_store import MemoryTokenCacheStore, RedisTokenCacheStore, TokenCacheStore
from .cli import register_commands
from .credentials import client_credential
from .diagnosis import REDIS, STATUS, Diagnosis
from .downstream import DownstreamApi
from .errors import DownstreamNotConfigured, register_error_handlers
from .http import build_session
from .metrics import Metrics
from .protector import EntraResourceProtector, EntraTokenValidator, current_token
from .request_ids import REQUEST_ID_HEADER, begin_request, end_request
from .settings import Settings
from .token_acquisition import OnBehalfOfTokenProvider
from .token_cache import TokenCacheCodec, partition_key
from .tracing import VALIDATE_SPAN, instrument_app, span

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
        entra_timeout = (settings.entra_connect_timeout, settings.entra_read_timeout)
        metadata = OpenIdConfiguration(settings.openid_configuration_url, session, disk=disk,
                                       timeout=entra_timeout, diagnosis=diagnosis)
        keys = SigningKeys(metadata, session, disk=disk, timeout=entra_timeout, diagnosis=diagnosis)
        metrics = Metrics()  # this application's own registry: apps in one process never collide
        store = store or _default_store(settings, metrics)
        if isinstance(store, RedisTokenCacheStore):
            store.report_to(metrics)
            store.diagnosis = diagnosis
        # Without REDIS_URL the in-process cache is sealed too, with a key that dies with the process.
        codec = TokenCacheCodec(settings.token_cache_keys or (Fernet.generate_key().decode(),))
        tenants = TenantConfigurations(
            metadata, session, authority_host=settings.authority_host, allowed=settings.tenant_allowed,
            multi_tenant=settings.multi_tenant, disk=disk, timeout=entra_timeout, diagnosis=diagnosis)
        tokens = OnBehalfOfTokenProvider(settings, store, codec, session, tenants,
                                         client_credential(settings, session), metrics)
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
        )
        register_error_handlers(app)
        app.before_request(_begin_request)
        app.after_request(_return_request_id)
        app.teardown_request(_end_request)
        register_commands(app)
        start_timer, count_request = _request_hooks(metrics)
        app.before_request(start_timer)
        app.after_request(count_request)
        instrument_app(app)  # OpenTelemetry, when OTEL_EXPORTER_OTLP_*ENDPOINT asks (flask_obo.tracing)

    # --- protecting the API ----------------------------------------------------------------------
    def require_scope(self, scope: str | None = None) -> Callable[[View], View]:
        """A view decorator: the request needs a valid access token with ``scope``
        (default: ``API_REQUIRED_SCOPE``), else 401/403 with an RFC 6750 challenge.
        The answer is marked ``Cache-Control: no-store``: it is one user's data."""

        def decorate(view: View) -> View:
            @functools.wraps(view)
            def protected(*args: Any, **kwargs: Any) -> Any:
                after_this_request(_private)  # errors too: they are about this user's token
                self.authenticate(scope)
                return view(*args, **kwargs)

            return protected  # type: ignore[return-value]

        return decorate

    def protect(self, blueprint: Blueprint, scope: str | None = None) -> None:
        """Require ``scope`` (default: ``API_REQUIRED_SCOPE``) on every route of
        ``blueprint``. Only a CORS preflight passes without a token (browsers send none
        with it): an ``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method`` that
        Flask answers itself. Any other ``OPTIONS`` is authenticated like every method, and
        so is every ``OPTIONS`` to a view that handles that method itself."""

        @blueprint.before_request
        def _authenticate() -> None:
            if not _is_cors_preflight():
                self.authenticate(scope)

        blueprint.after_request(_private)

    def authenticate(self, scope: str | None = None) -> None:
        """Validate the current request's token for ``scope`` (default: ``API_REQUIRED_SCOPE``);
        then ``current_token`` holds it. Raises the ``ApiError`` to answer with."""
        services = self._services()
        with span(VALIDATE_SPAN):
            services.protector.authenticate(scope or services.settings.required_scope)

    # --- acquiring tokens and calling downstream APIs --------------------------------------------
    def acquire_token(self, scopes: Sequence[str], claims_challenge: str | None = None) -> str:
        """An access token for ``scopes`` (one resource) on behalf of ``current_token``'s user,
        from the memory tier, the shared cache or Entra ID (On-Behalf-Of) in that order.
        With ``claims_challenge`` (a downstream API's decoded claims), always a fresh one."""
        if isinstance(scopes, str):
            raise TypeError("scopes must be a list of scopes, not one string")
        return self._services().tokens.acquire_token(current_token, scopes, claims_challenge)

    def downstream(self, name: str) -> DownstreamApi:
        """The configured downstream API ``name``: ``graph`` (``GRAPH_BASE_URL``,
        ``GRAPH_SCOPES``) or one of ``DOWNSTREAM_APIS__<NAME>__BASE_URL`` / ``__SCOPES``."""
        apis = self._services().downstream_apis
        try:
            return apis[name.lower()]
        except KeyError:
            error = DownstreamNotConfigured(name, tuple(sorted(apis)))
            log.error("%s (set DOWNSTREAM_APIS__%s__BASE_URL and __SCOPES, or fix the name)",
                      error, name.upper() if name.isidentifier() else "<NAME>")
            raise error from None

    def forget_user(self) -> None:
        """Sign-out: remove ``current_token``'s user's cached downstream tokens everywhere.

        The entry goes from the shared cache under the user's lock (after any acquisition
        in flight), and this worker's memory copy at once; other workers and instances drop
        theirs within a second (the invalidation channel). The user's next downstream call
        makes a new On-Behalf-Of exchange. Raises ``CacheUnavailable`` (503) when Redis
        cannot be reached: nothing was removed then."""
        self._services().tokens.forget(partition_key(current_token.oid, current_token.tid))
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


def services_of(app: Flask) -> OboServices:
    """``app``'s services (for tests and tools; routes go through ``FlaskOBO``)."""
    services = app.extensions.get(EXTENSION_KEY)
    if not isinstance(services, OboServices):
        raise RuntimeError("FlaskOBO.init_app(app) has not been called for this application")
    return services


def _begin_request() -> None:
    g.flask_obo_request_id, g.flask_obo_request_id_token = begin_request(
        request.headers.get(REQUEST_ID_HEADER))


def _return_request_id(response: Response) -> Response:
    request_id = g.get("flask_obo_request_id")
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


def _end_request(_: BaseException | None) -> None:
    token = g.pop("flask_obo_request_id_token", None)
    if token is not None:
        end_request(token)
_STARTED = "flask_obo.started"  # the request's start (time.perf_counter()), in its WSGI environ


def _request_hooks(metrics: Metrics) -> tuple[Callable[[], None], Callable[[Response], Response]]:
    """The ``before_request``/``after_request`` pair counting ``app``'s requests in
    ``flask_obo_requests_total{route, status}`` and ``flask_obo_request_seconds``.

    The route is the URL rule (``/api/me``, ``/items/<int:item>``), never the raw path, so
    a client cannot make up label values; unmatched requests (404, 405) share one.
    ``after_request`` functions run in reverse order of registration, so those an app
    registers after ``init_app`` (CORS, say) have run by then. Bound to ``metrics`` and
    touching Flask's context proxies once each: they are the costly part (see
    docs/how-to/metrics-and-logs.md)."""

    def start_timer() -> None:
        request.environ[_STARTED] = time.perf_counter()

    def count_request(response: Response) -> Response:
        current = request._get_current_object()  # type: ignore[attr-defined]
        started = current.environ.get(_STARTED)
        rule = current.url_rule
        metrics.request(rule.rule if rule is not None else None, response.status_code,
                        None if started is None else time.perf_counter() - started)
        return response

    return start_timer, count_request


def _is_cors_preflight() -> bool:
    """The one request a browser sends without credentials before a cross-origin call
    (Fetch standard, "CORS-preflight request"), answered by Flask's automatic ``OPTIONS``
    response: it reveals nothing and changes nothing. Anyone can send those two headers,
    so a route whose view handles ``OPTIONS`` itself is never exempted: its view would
    run without a token."""
    headers = request.headers
    return (request.method == "OPTIONS" and "Origin" in headers
            and "Access-Control-Request-Method" in headers
            and bool(getattr(request.url_rule, "provide_automatic_options", False)))


def _private(response: Response) -> Response:
    """No shared cache (CDN, proxy) may keep a protected answer, whichever origin asked.
    (The header is edited as a string: ``response.vary`` builds a ``HeaderSet`` with an
    update callback, several times the cost, on every protected request.)"""
    headers = response.headers
    headers["Cache-Control"] = "no-store"
    vary = headers.get("Vary")
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
