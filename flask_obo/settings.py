"""Settings: read from the environment (and ``.env``), validated once at start-up.

Every problem is reported as one line naming the variable; secret values are never
echoed, so a start-up failure is safe to paste into a ticket.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import serialization

_T = TypeVar("_T")

DEFAULT_TTL_SECONDS = 90 * 24 * 3600
# Bounds on waiting for dependencies (see docs/explanation/how-it-works.md, "When a dependency fails").
# Connecting waits just above the 3 s after which TCP resends a lost SYN, so one loss is survived.
DEFAULT_CONNECT_TIMEOUT = 3.05
DEFAULT_ENTRA_CONNECT_TIMEOUT = DEFAULT_CONNECT_TIMEOUT
DEFAULT_ENTRA_READ_TIMEOUT = 10.0
DEFAULT_ENTRA_TIMEOUT = (DEFAULT_ENTRA_CONNECT_TIMEOUT, DEFAULT_ENTRA_READ_TIMEOUT)
DEFAULT_DOWNSTREAM_TIMEOUT = 10.0  # GRAPH_ and DOWNSTREAM_APIS__<NAME>__TIMEOUT_SECONDS
DEFAULT_TOKEN_ACQUISITION_TIMEOUT = 12.0
DEFAULT_ENTRA_MAX_WAITING_THREADS = 4
DEFAULT_REDIS_TIMEOUT = 0.5
DEFAULT_MEMORY_CACHE_USERS = 5000
DEFAULT_VALIDATION_MEMORY_TOKENS = 5000
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d{1,5})?$|^\*$")
_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# What Entra ID takes as an App ID URI: scheme://authority[/path] (api://, https://) or urn:...
_APP_ID_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s?#]+(/[^\s?#]*)?|urn:[^\s?#]+")
LOG_FORMATS = ("text", "json")  # the first is the default
DOWNSTREAM_PREFIX = "DOWNSTREAM_APIS__"
#: ``OBO_<NAME>`` is ``<NAME>`` meant for flask-obo alone, and wins over ``<NAME>`` (in
#: ``app.config`` and in the environment alike): ``OBO_REDIS_URL`` points the token cache at
#: another Redis than the application's own ``REDIS_URL`` (RQ, Celery).
OBO_PREFIX = "OBO_"
# AZURE_TENANT_ID values that make the API multi-tenant (with AZURE_ALLOWED_TENANTS)
MULTI_TENANT_IDS = ("organizations", "common")
#: The fields of ``DOWNSTREAM_APIS__<NAME>__<FIELD>`` and their defaults (None: required;
#: "": derived from the others, as the settings reference says).
DOWNSTREAM_FIELDS: Mapping[str, float | str | None] = {
    "BASE_URL": None, "SCOPES": None, "APP_SCOPES": "", "TIMEOUT_SECONDS": DEFAULT_DOWNSTREAM_TIMEOUT}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")  # gunicorn's and logging's common names
PLACEHOLDER_GUID = "00000000-0000-0000-0000-000000000000"  # stands in for a setting that failed

# --- the names this package reads -------------------------------------------------------------
#: A variable (or app.config key) under one of these prefixes is meant for flask-obo (or its
#: gunicorn and logging configuration): one that is not a known name is a typo until shown
#: otherwise, and start-up warns about it with the closest known name.
SETTING_PREFIXES = ("AZURE_", "REDIS_", "TOKEN_CACHE_", "TOKEN_MEMORY_", "ENTRA_", DOWNSTREAM_PREFIX,
                    "GUNICORN_", "LOG_", "API_", "GRAPH_", "CORS_", "AUTHORITY_")
#: What ``Settings.from_env`` reads (tests/unit/test_settings_diagnosis.py keeps it in step).
API_SETTINGS = (
    "AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ASSERTION",
    "AZURE_MANAGED_IDENTITY_CLIENT_ID", "AZURE_CLIENT_CAPABILITIES", "AZURE_APP_ID_URI",
    "AZURE_AUTHORITY_HOST", "AZURE_V1_ISSUER_HOST", "AZURE_ALLOWED_TENANTS", "API_REQUIRED_SCOPE",
    "API_APP_ROLE", "GRAPH_BASE_URL", "GRAPH_SCOPES", "GRAPH_APP_SCOPES", "GRAPH_TIMEOUT_SECONDS",
    "REDIS_URL", "REDIS_CLUSTER", "REDIS_SENTINELS", "REDIS_SENTINEL_PASSWORD", "REDIS_TIMEOUT_SECONDS",
    "TOKEN_CACHE_KEYS", "TOKEN_CACHE_PREFIX", "TOKEN_CACHE_TTL_SECONDS", "TOKEN_MEMORY_CACHE_USERS",
    "VALIDATION_MEMORY_TOKENS", "TOKEN_ACQUISITION_TIMEOUT_SECONDS", "CORS_ALLOWED_ORIGINS",
    "ENTRA_CONNECT_TIMEOUT_SECONDS",
    "ENTRA_READ_TIMEOUT_SECONDS", "ENTRA_MAX_WAITING_THREADS", "AUTHORITY_CACHE_DIR", "LOG_LEVEL",
    "LOG_FORMAT",
)
#: Read by config/gunicorn.conf.py (and by gunicorn itself: GUNICORN_CMD_ARGS).
GUNICORN_SETTINGS = (
    "GUNICORN_BIND", "GUNICORN_WORKERS", "GUNICORN_THREADS", "GUNICORN_TIMEOUT",
    "GUNICORN_GRACEFUL_TIMEOUT", "GUNICORN_MAX_REQUESTS", "GUNICORN_MAX_REQUESTS_JITTER",
    "GUNICORN_WORKER_TMP_DIR", "GUNICORN_ACCESS_LOG", "GUNICORN_ERROR_LOG", "GUNICORN_CMD_ARGS",
)
#: Others' names under those prefixes, set beside the API's in real deployments: msal's
#: (AZURE_REGIONAL_AUTHORITY_NAME), the Azure SDKs' and CLI's, docker-compose.yml's Redis
#: password, ``make run``'s port.
OTHER_KNOWN_SETTINGS = (
    "AZURE_REGIONAL_AUTHORITY_NAME", "AZURE_SUBSCRIPTION_ID", "AZURE_USERNAME", "AZURE_PASSWORD",
    "AZURE_CLIENT_CERTIFICATE_SEND_CERTIFICATE_CHAIN", "AZURE_LOG_LEVEL", "AZURE_CONFIG_DIR",
    "AZURE_CLOUD", "REDIS_PASSWORD", "API_PORT",
)
KNOWN_SETTINGS = frozenset(API_SETTINGS + GUNICORN_SETTINGS + OTHER_KNOWN_SETTINGS)


def unknown_setting_warnings(names: Iterable[str]) -> tuple[str, ...]:
    """One warning per name under ``SETTING_PREFIXES`` (or ``OBO_``, which is flask-obo's
    alone) that this package does not read, with the closest known name, spelled as the
    name was (``LOG_FROMAT`` → ``LOG_FORMAT``, ``OBO_REDIS_URLL`` → ``OBO_REDIS_URL``).
    ``DOWNSTREAM_APIS__*`` names are checked where they are read (an unknown field is an
    error there)."""
    warnings = []
    for name in sorted(set(names)):
        prefix = OBO_PREFIX if name.startswith(OBO_PREFIX) else ""
        bare = name[len(prefix):]
        if ((not prefix and not bare.startswith(SETTING_PREFIXES)) or bare in KNOWN_SETTINGS
                or bare.startswith(DOWNSTREAM_PREFIX)):
            continue
        close = difflib.get_close_matches(bare, sorted(KNOWN_SETTINGS), n=1, cutoff=0.6)
        hint = f"did you mean {prefix}{close[0]}?" if close else "flask-obo reads no similar name"
        warnings.append(f"{name}: not a setting of flask-obo, ignored; {hint}")
    return tuple(warnings)


class SettingsError(ValueError):
    """Missing or malformed settings: ``errors`` holds one line per setting, each naming
    the variable (never its value); ``str()`` is those lines."""

    def __init__(self, *errors: str) -> None:
        super().__init__("\n".join(errors))
        self.errors: tuple[str, ...] = errors


@dataclass(frozen=True)
class ClientCertificate:
    """msal's certificate credential (the key is decrypted once at start-up)."""

    private_key_pem: str = field(repr=False)
    certificate_pem: str

    def as_msal_credential(self) -> dict[str, str]:
        return {"private_key": self.private_key_pem, "public_certificate": self.certificate_pem}


@dataclass(frozen=True)
class DownstreamApiSettings:
    """A downstream API: ``DOWNSTREAM_APIS__<NAME>__BASE_URL``, ``..._SCOPES`` and
    ``..._TIMEOUT_SECONDS`` (``graph``'s come from ``GRAPH_BASE_URL``, ``GRAPH_SCOPES`` and
    ``GRAPH_TIMEOUT_SECONDS``).

    ``app_scopes``: what its app tokens ask for (``downstream(name, as_app=True)``),
    ``..._APP_SCOPES`` (``GRAPH_APP_SCOPES``); by default ``<resource>/.default``."""

    base_url: str
    scopes: tuple[str, ...]
    app_scopes: tuple[str, ...] = ()
    timeout_seconds: float = DEFAULT_DOWNSTREAM_TIMEOUT  # how long one attempt waits for the answer

    def __post_init__(self) -> None:
        if not self.app_scopes and self.scopes:  # (no scopes: a bad setting, being reported)
            object.__setattr__(self, "app_scopes", (f"{scope_resource(self.scopes[0])}/.default",))

    @property
    def timeout(self) -> tuple[float, float]:
        """requests' (connect, read) timeout of one attempt: never longer than the setting."""
        return min(DEFAULT_CONNECT_TIMEOUT, self.timeout_seconds), self.timeout_seconds


GRAPH_RESOURCE = "https://graph.microsoft.com"


def scope_resource(scope: str) -> str:
    """The resource a scope belongs to: ``api://x/Tasks.Read`` -> ``api://x``; a bare name
    (``User.Read``) is Microsoft Graph's, as Entra ID reads it."""
    resource, slash, _ = scope.rpartition("/")
    return resource if slash and resource else GRAPH_RESOURCE


@dataclass(frozen=True)
class Settings:
    tenant_id: str
    client_id: str
    # The API's credential: exactly one of a secret, a certificate, a federated token
    # file or a managed identity (``flask_obo.credentials`` turns it into msal's).
    client_secret: str | None = field(default=None, repr=False)
    client_certificate: ClientCertificate | None = field(default=None, repr=False)
    client_certificate_path: str | None = None
    client_certificate_password: str | None = field(default=None, repr=False)
    federated_token_file: str | None = None  # AZURE_FEDERATED_TOKEN_FILE (workload identity)
    client_assertion: str | None = None  # AZURE_CLIENT_ASSERTION: "managed_identity"
    managed_identity_client_id: str | None = None  # a user-assigned identity; None: system-assigned
    client_capabilities: tuple[str, ...] = ("cp1",)  # cp1: Continuous Access Evaluation
    app_id_uri: str = ""
    authority_host: str = "https://login.microsoftonline.com"
    # v1 access tokens' issuer is <v1_issuer_host>/<tid>/ (sovereign clouds have their own)
    v1_issuer_host: str = "https://sts.windows.net"
    # Multi-tenant (tenant_id "organizations" or "common"): the tenants whose users may call;
    # ("*",) is any tenant, which must be said explicitly.
    allowed_tenants: tuple[str, ...] = ()
    required_scope: str = "user_impersonation"
    graph_base_url: str = "https://graph.microsoft.com/v1.0"
    graph_scopes: tuple[str, ...] = ("https://graph.microsoft.com/.default",)
    graph_app_scopes: tuple[str, ...] = ()  # GRAPH_APP_SCOPES; empty: <Graph>/.default
    graph_timeout_seconds: float = DEFAULT_DOWNSTREAM_TIMEOUT
    # The app role the reference API's /api/whoami admits app-only tokens with (API_APP_ROLE);
    # None: app-only tokens are refused there. Routes of your own name theirs in app_roles=.
    api_app_role: str | None = None
    # More downstream APIs by lower-case name; "graph" is always the one above.
    extra_downstream_apis: Mapping[str, DownstreamApiSettings] = field(default_factory=dict)
    redis_url: str | None = field(default=None, repr=False)
    redis_cluster: bool = False  # REDIS_URL names any node of a Redis Cluster
    redis_sentinels: tuple[tuple[str, int], ...] = ()  # REDIS_URL's host names the master service
    redis_sentinel_password: str | None = field(default=None, repr=False)
    token_cache_keys: tuple[str, ...] = field(default=(), repr=False)
    token_cache_prefix: str = "flask-obo"
    token_cache_ttl_seconds: int = DEFAULT_TTL_SECONDS
    cors_allowed_origins: tuple[str, ...] = ()
    entra_connect_timeout: float = DEFAULT_ENTRA_CONNECT_TIMEOUT
    entra_read_timeout: float = DEFAULT_ENTRA_READ_TIMEOUT
    token_acquisition_timeout: float = DEFAULT_TOKEN_ACQUISITION_TIMEOUT
    entra_max_waiting_threads: int = DEFAULT_ENTRA_MAX_WAITING_THREADS
    redis_timeout: float = DEFAULT_REDIS_TIMEOUT
    memory_cache_users: int = DEFAULT_MEMORY_CACHE_USERS
    validation_memory_tokens: int = DEFAULT_VALIDATION_MEMORY_TOKENS
    authority_cache_dir: str | None = None  # None: a private directory under the system temp dir
    log_level: str = "INFO"  # LOG_LEVEL, checked here; the application's logging applies it
    log_format: str = "text"  # LOG_FORMAT: text or json (one JSON object per line)
    # Names set under flask-obo's prefixes that it does not read (typos): ``init_app`` logs them.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.app_id_uri:
            object.__setattr__(self, "app_id_uri", f"api://{self.client_id}")

    # Everything Entra-specific derives from the authority host and the tenant, so a
    # private authority (or the dev tenant) works by changing AZURE_AUTHORITY_HOST alone.
    @property
    def authority(self) -> str:
        return f"{self.authority_host}/{self.tenant_id}"

    @property
    def issuer(self) -> str:
        return f"{self.authority}/v2.0"

    @property
    def multi_tenant(self) -> bool:
        return self.tenant_id in MULTI_TENANT_IDS

    def tenant_allowed(self, tid: str) -> bool:
        """May users of tenant ``tid`` call? (Single-tenant: only the configured one.)"""
        if not self.multi_tenant:
            return tid.lower() == self.tenant_id
        return "*" in self.allowed_tenants or tid.lower() in self.allowed_tenants

    def issuers_for(self, tid: str) -> tuple[str, str]:
        """The v2 and v1 issuers of tokens from tenant ``tid``."""
        return f"{self.authority_host}/{tid}/v2.0", f"{self.v1_issuer_host}/{tid}/"

    def authority_for(self, tid: str) -> str:
        """Where to exchange a token from tenant ``tid``: its own tenant when multi-tenant."""
        return f"{self.authority_host}/{tid}" if self.multi_tenant else self.authority

    @property
    def entra_timeout(self) -> tuple[float, float]:
        """requests' (connect, read) timeout of each call to Entra ID."""
        return self.entra_connect_timeout, self.entra_read_timeout

    @property
    def openid_configuration_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def downstream_apis(self) -> dict[str, DownstreamApiSettings]:
        """Every downstream API by name: ``graph`` and those of ``DOWNSTREAM_APIS__*``."""
        graph = DownstreamApiSettings(self.graph_base_url, self.graph_scopes, self.graph_app_scopes,
                                      self.graph_timeout_seconds)
        return {"graph": graph, **self.extra_downstream_apis}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default: ``.env`` overlaid by ``os.environ``).

        Raises one ``SettingsError`` listing every bad setting, one line each."""
        environ = default_environ() if environ is None else environ
        env = Env(environ, collect=True)
        client_id = env.guid("AZURE_CLIENT_ID")
        app_id_uri = env.app_id_uri("AZURE_APP_ID_URI") or f"api://{client_id}"
        # Read in this order, so errors are listed in it; each part checks its settings together.
        values: dict[str, Any] = {
            "client_id": client_id,
            "app_id_uri": app_id_uri,
            **_credential_values(env),
            **_cache_values(env),
            **_tenant_values(env),
            **_entra_values(env, client_id, app_id_uri),
            **_downstream_values(env),
            **_serving_values(env),
            "warnings": unknown_setting_warnings(environ),
        }
        if env.errors:
            raise SettingsError(*env.errors)
        return cls(**values)

    @classmethod
    def for_token_cache(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Only what the ``flask token-cache`` commands use: ``REDIS_*``, ``TOKEN_CACHE_*``
        and ``TOKEN_ACQUISITION_TIMEOUT_SECONDS`` (how long ``evict`` waits for a user's
        lock). The Entra ID settings may be missing: they are placeholders here, so these
        settings must never serve requests."""
        environ = default_environ() if environ is None else environ
        env = Env(environ, collect=True)
        cache = _cache_values(env)
        if env.errors:
            raise SettingsError(*env.errors)
        return cls(tenant_id=PLACEHOLDER_GUID, client_id=PLACEHOLDER_GUID, **cache)

    @classmethod
    def from_app_config(cls, config: Mapping[str, Any],
                        environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from a Flask app's ``config`` overlaid on ``environ`` (default:
        ``os.environ``), under the same names.

        Each name may carry the prefix ``OBO_`` (``OBO_REDIS_URL``), which wins over the
        bare name: for one setting, the first set of ``app.config["OBO_<NAME>"]``, the
        environment's ``OBO_<NAME>``, ``app.config["<NAME>"]``, the environment's ``<NAME>``.

        ``app.config.from_prefixed_env()`` fills the config from ``FLASK_<NAME>``, parsing
        values as JSON and nesting on ``__``; both are undone here, so
        ``FLASK_DOWNSTREAM_APIS__TASKS__SCOPES`` means ``DOWNSTREAM_APIS__TASKS__SCOPES``.
        """
        merged = dict(os.environ if environ is None else environ)
        for name, value in config.items():
            prefix = OBO_PREFIX if name.startswith(OBO_PREFIX) else ""
            if name[len(prefix):] == DOWNSTREAM_PREFIX.rstrip("_") and isinstance(value, Mapping):
                for api, fields in value.items():
                    for field_name, field_value in (fields.items() if isinstance(fields, Mapping) else ()):
                        merged[f"{prefix}{DOWNSTREAM_PREFIX}{api}__{field_name}"] = _as_text(field_value)
            elif isinstance(value, (str, bool, int, float, list, tuple)):
                merged[name] = _as_text(value)
        return cls.from_env(merged)


def _as_text(value: Any) -> str:
    """A config value as the environment would spell it (lists comma-separated)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(_as_text(item) for item in value)
    return str(value)


def default_environ() -> dict[str, str]:
    """What settings are read from by default: ``.env`` overlaid by ``os.environ``."""
    from dotenv import dotenv_values

    dotenv = {k: v for k, v in dotenv_values(".env").items() if v is not None}
    return {**dotenv, **os.environ}


def _cache_values(env: Env) -> dict[str, Any]:
    """The shared token cache's settings (Redis, its topology, the keys), checked together."""
    redis_url = env.redis_url("REDIS_URL")
    keys = env.fernet_keys("TOKEN_CACHE_KEYS")
    if redis_url and not keys:
        env.error("TOKEN_CACHE_KEYS: required when REDIS_URL is set")
    redis_cluster = env.boolean("REDIS_CLUSTER")
    sentinels = env.addresses("REDIS_SENTINELS")
    if (redis_cluster or sentinels) and not redis_url and not env.failed("REDIS_URL"):
        env.error("REDIS_URL: required with REDIS_CLUSTER or REDIS_SENTINELS")
    if redis_cluster and sentinels:
        env.error("REDIS_SENTINELS: set either it or REDIS_CLUSTER, not both")
    if redis_url and redis_url.startswith("unix:") and (redis_cluster or sentinels):
        env.error("REDIS_URL: must be redis:// or rediss:// with a cluster or sentinels")
    return dict(
        redis_url=redis_url,
        redis_cluster=redis_cluster,
        redis_sentinels=sentinels,
        redis_sentinel_password=env.optional("REDIS_SENTINEL_PASSWORD"),
        token_cache_keys=keys,
        token_cache_prefix=env.matching("TOKEN_CACHE_PREFIX", "flask-obo", _PREFIX),
        token_cache_ttl_seconds=env.positive_int("TOKEN_CACHE_TTL_SECONDS", DEFAULT_TTL_SECONDS),
        redis_timeout=env.seconds("REDIS_TIMEOUT_SECONDS", DEFAULT_REDIS_TIMEOUT),
        token_acquisition_timeout=env.seconds(
            "TOKEN_ACQUISITION_TIMEOUT_SECONDS", DEFAULT_TOKEN_ACQUISITION_TIMEOUT
        ),
    )


def _credential_values(env: Env) -> dict[str, Any]:
    """The API's credential: exactly one of a secret, a certificate, a federated token file
    or a managed identity."""
    secret = env.optional("AZURE_CLIENT_SECRET")
    cert_path = env.optional("AZURE_CLIENT_CERTIFICATE_PATH")
    cert_password = env.optional("AZURE_CLIENT_CERTIFICATE_PASSWORD")
    token_file = env.readable_file("AZURE_FEDERATED_TOKEN_FILE")
    assertion = env.choice("AZURE_CLIENT_ASSERTION", ("", "managed_identity")) or None
    given = [name for name, value in (
        ("AZURE_CLIENT_SECRET", secret), ("AZURE_CLIENT_CERTIFICATE_PATH", cert_path),
        ("AZURE_FEDERATED_TOKEN_FILE", token_file), ("AZURE_CLIENT_ASSERTION", assertion)) if value]
    if len(given) > 1:
        env.error(f"{given[0]}: set only one of {', '.join(given)} (the API's credential)")
    if not given and not env.failed("AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ASSERTION"):
        env.error(
            "AZURE_CLIENT_SECRET: missing (or set AZURE_CLIENT_CERTIFICATE_PATH, "
            "AZURE_FEDERATED_TOKEN_FILE or AZURE_CLIENT_ASSERTION=managed_identity)"
        )
    # With two credentials given, which one is meant is unknown: the certificate waits.
    certificate = (env.checked(lambda: load_certificate(cert_path, cert_password))
                   if cert_path and len(given) == 1 else None)
    identity_client_id = env.optional_guid("AZURE_MANAGED_IDENTITY_CLIENT_ID")
    if identity_client_id and not assertion:
        env.error("AZURE_MANAGED_IDENTITY_CLIENT_ID: needs AZURE_CLIENT_ASSERTION=managed_identity")
    return dict(
        client_secret=secret,
        client_certificate=certificate,
        client_certificate_path=cert_path,
        client_certificate_password=cert_password,
        federated_token_file=token_file,
        client_assertion=assertion,
        managed_identity_client_id=identity_client_id,
    )


def _tenant_values(env: Env) -> dict[str, Any]:
    """The tenant, and for a multi-tenant API the tenants whose users may call."""
    tenant_id = env.tenant("AZURE_TENANT_ID")
    allowed = env.tenants("AZURE_ALLOWED_TENANTS")
    if tenant_id in MULTI_TENANT_IDS and not allowed:
        env.error(f"AZURE_ALLOWED_TENANTS: required with AZURE_TENANT_ID={tenant_id} "
                  "(tenant ids, comma-separated, or * for any tenant)")
    if allowed and tenant_id not in MULTI_TENANT_IDS:
        env.error("AZURE_ALLOWED_TENANTS: only with AZURE_TENANT_ID=organizations")
    return dict(tenant_id=tenant_id, allowed_tenants=allowed)


def _entra_values(env: Env, client_id: str, app_id_uri: str) -> dict[str, Any]:
    """Where Entra ID is, what this API declares to it, and the scope (or, app-only, the app
    role) its callers need."""
    return dict(
        v1_issuer_host=env.https_url("AZURE_V1_ISSUER_HOST", "https://sts.windows.net"),
        client_capabilities=env.capabilities("AZURE_CLIENT_CAPABILITIES", "cp1"),
        authority_host=env.https_url("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com"),
        required_scope=env.scope_name("API_REQUIRED_SCOPE", "user_impersonation",
                                      api=(app_id_uri, f"api://{client_id}", client_id)),
        api_app_role=env.optional_token("API_APP_ROLE"),
    )


def _downstream_values(env: Env) -> dict[str, Any]:
    """Graph and the other downstream APIs."""
    return dict(
        graph_base_url=env.https_url("GRAPH_BASE_URL", "https://graph.microsoft.com/v1.0"),
        graph_scopes=env.scopes("GRAPH_SCOPES", "https://graph.microsoft.com/.default"),
        graph_app_scopes=env.app_scopes("GRAPH_APP_SCOPES"),
        graph_timeout_seconds=env.seconds("GRAPH_TIMEOUT_SECONDS", DEFAULT_DOWNSTREAM_TIMEOUT),
        extra_downstream_apis=env.downstream_apis(),
    )


def _serving_values(env: Env) -> dict[str, Any]:
    """How requests are served: CORS, the bounds on waiting for Entra ID, memory, logs."""
    return dict(
        cors_allowed_origins=env.origins("CORS_ALLOWED_ORIGINS"),
        entra_connect_timeout=env.seconds("ENTRA_CONNECT_TIMEOUT_SECONDS", DEFAULT_ENTRA_CONNECT_TIMEOUT),
        entra_read_timeout=env.seconds("ENTRA_READ_TIMEOUT_SECONDS", DEFAULT_ENTRA_READ_TIMEOUT),
        entra_max_waiting_threads=env.positive_int(
            "ENTRA_MAX_WAITING_THREADS", DEFAULT_ENTRA_MAX_WAITING_THREADS, unit="threads"
        ),
        memory_cache_users=env.positive_int(
            "TOKEN_MEMORY_CACHE_USERS", DEFAULT_MEMORY_CACHE_USERS, unit="users"
        ),
        validation_memory_tokens=env.positive_int(
            "VALIDATION_MEMORY_TOKENS", DEFAULT_VALIDATION_MEMORY_TOKENS, unit="tokens"
        ),
        authority_cache_dir=env.optional("AUTHORITY_CACHE_DIR"),
        log_level=env.log_level("LOG_LEVEL").upper(),
        log_format=env.choice("LOG_FORMAT", LOG_FORMATS),
    )


_Accessor = TypeVar("_Accessor", bound=Callable[..., Any])


def _or(fallback: Callable[..., Any]) -> Callable[[_Accessor], _Accessor]:
    """An accessor that, in a collecting ``Env``, keeps its error and answers
    ``fallback(<its other arguments>)``, so that the other settings are checked too."""

    def decorate(accessor: _Accessor) -> _Accessor:
        @functools.wraps(accessor)
        def checked(self: Env, name: str, *args: Any, **kwargs: Any) -> Any:
            self.read.add(name)
            try:
                return accessor(self, name, *args, **kwargs)
            except SettingsError as error:
                if not self.collect:
                    raise SettingsError(*(self.as_set(line) for line in error.errors)) from None
                for line in error.errors:
                    self.error(line)
                return fallback(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return decorate


class Env:
    """Typed accessors; each error message names the variable and never its value.

    Public so that config/gunicorn.conf.py checks gunicorn's own variables the same way.
    With ``collect``, a bad setting does not raise: its error is kept (``errors``, one per
    variable) and a fallback answered, so that one pass finds every bad setting.
    """

    def __init__(self, environ: Mapping[str, str], collect: bool = False) -> None:
        self._environ = environ
        # <NAME> -> OBO_<NAME> for the settings read under their prefixed name (errors name it).
        self._spelled: dict[str, str] = {}
        self.collect = collect
        self._errors: dict[str, str] = {}
        self.read: set[str] = set()  # the names asked for (a test checks KNOWN_SETTINGS)

    @property
    def errors(self) -> tuple[str, ...]:
        """One line per bad setting, in the order found."""
        return tuple(self._errors.values())

    def error(self, message: str) -> None:
        """``message`` (``"NAME: what is wrong"``): raised, or kept when collecting (the
        first error of each variable: any other follows from it)."""
        if not self.collect:
            raise SettingsError(self.as_set(message))
        self._errors.setdefault(message.partition(":")[0], self.as_set(message))

    def as_set(self, message: str) -> str:
        """``message`` naming its variable as it was set (``OBO_REDIS_URL: ...``)."""
        name, colon, rest = message.partition(":")
        return f"{self._spelled[name]}{colon}{rest}" if colon and name in self._spelled else message

    def failed(self, *names: str) -> bool:
        """Has one of ``names`` already been found bad?"""
        return any(name in self._errors for name in names)

    def checked(self, produce: Callable[[], _T]) -> _T | None:
        """``produce()``, or None once its ``SettingsError`` is kept (when collecting)."""
        try:
            return produce()
        except SettingsError as error:
            if not self.collect:
                raise
            for line in error.errors:
                self.error(line)
            return None

    def optional(self, name: str) -> str | None:
        """``OBO_<name>`` if set (even empty: see ``OBO_PREFIX``), else ``name``; blank is None."""
        self.read.add(name)
        value = self._environ.get(OBO_PREFIX + name)
        if value is None:
            value = self._environ.get(name)
        else:
            self._spelled[name] = OBO_PREFIX + name
        return (value or "").strip() or None

    @_or(lambda: "")
    def required(self, name: str) -> str:
        value = self.optional(name)
        if value is None:
            raise SettingsError(f"{name}: missing")
        return value

    @_or(lambda: PLACEHOLDER_GUID)
    def guid(self, name: str) -> str:
        value = self.required(name)
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise SettingsError(f"{name}: must be a GUID") from None

    @_or(lambda default: default.rstrip("/"))
    def https_url(self, name: str, default: str) -> str:
        value = (self.optional(name) or default).rstrip("/")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            raise SettingsError(f"{name}: is not a valid URL") from None
        if parts.scheme != "https" or not parts.hostname:
            raise SettingsError(f"{name}: must be an https:// URL (msal refuses plain http)")
        if parts.query or parts.fragment or "?" in value or "#" in value:
            raise SettingsError(f"{name}: must not have a query (?...) or a fragment (#...)")
        return value

    @_or(lambda: None)
    def app_id_uri(self, name: str) -> str | None:
        """An App ID URI, the audience of v1 tokens: ``api://...``, ``https://...``, ``urn:...``."""
        value = self.optional(name)
        if value is not None and not _APP_ID_URI.fullmatch(value):
            raise SettingsError(f"{name}: must be a URI such as api://<client id> (the Application ID URI)")
        return value

    @_or(lambda: None)
    def redis_url(self, name: str) -> str | None:
        value = self.optional(name)
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            raise SettingsError(f"{name}: is not a valid URL") from None
        if parts.scheme not in {"redis", "rediss", "unix"}:
            raise SettingsError(f"{name}: must start with redis://, rediss:// or unix://")
        return value

    @_or(lambda: False)
    def boolean(self, name: str) -> bool:
        value = (self.optional(name) or "false").lower()
        if value not in {"true", "false", "1", "0", "yes", "no"}:
            raise SettingsError(f"{name}: must be true or false")
        return value in {"true", "1", "yes"}

    @_or(lambda: ())
    def addresses(self, name: str) -> tuple[tuple[str, int], ...]:
        """``host:port,host:port`` (IPv6 hosts in brackets)."""
        result = []
        for position, item in enumerate((self.optional(name) or "").split(","), start=1):
            item = item.strip()
            if not item:
                continue
            match = re.fullmatch(r"\[?([A-Za-z0-9.:_-]+?)\]?:([0-9]{1,5})", item)
            if not match or not 0 < int(match.group(2)) < 65536:
                raise SettingsError(f"{name}: entry {position} is not host:port")
            result.append((match.group(1), int(match.group(2))))
        return tuple(result)

    @_or(lambda default: default)
    def token(self, name: str, default: str) -> str:
        value = self.optional(name) or default
        if not re.fullmatch(r"[\x21\x23-\x5B\x5D-\x7E]+", value):
            raise SettingsError(f"{name}: must be a single scope value without spaces or quotes")
        return value

    @_or(lambda: None)
    def optional_token(self, name: str) -> str | None:
        """Like ``token``, with no default: unset is None."""
        return self.token(name, "") if self.optional(name) else None

    @_or(lambda: ())
    def app_scopes(self, name: str) -> tuple[str, ...]:
        """Client-credentials scopes: exactly one ``<resource>/.default``; unset: ()."""
        if self.optional(name) is None:
            return ()
        values = self.scopes(name, "")
        if len(values) != 1 or not values[0].endswith("/.default") or values[0] == "/.default":
            raise SettingsError(f"{name}: must be one <resource>/.default scope (app tokens take no other)")
        return values

    @_or(lambda default, api: default)
    def scope_name(self, name: str, default: str, api: tuple[str, ...]) -> str:
        """A scope as tokens carry it in ``scp``: its bare name (``user_impersonation``).

        SPA developers copy the full form MSAL.js asks for, ``api://<client id>/<name>``;
        ``scp`` never holds that, so every token would be refused. It means ``<name>`` when
        its prefix is this API (one of ``api``: App ID URI, ``api://<client id>``, client id);
        another API's scope can never be in this API's tokens, so it is refused.
        """
        value = self.token(name, default)
        prefix, slash, scope = value.rpartition("/")
        if not slash:
            return value
        if scope and prefix.casefold() in {owner.casefold() for owner in api}:
            return scope
        raise SettingsError(
            f"{name}: must be the scope's name alone (e.g. user_impersonation) or this API's "
            "App ID URI followed by /<name>; this is not a scope of this API"
        )

    def downstream_apis(self) -> dict[str, DownstreamApiSettings]:
        """``DOWNSTREAM_APIS__<NAME>__BASE_URL`` and ``DOWNSTREAM_APIS__<NAME>__SCOPES`` (both
        required) for each ``<NAME>``: letters, digits and ``_``, used lower-case (each
        name may carry ``OBO_`` too)."""
        names: set[str] = set()
        for variable in self._environ:
            bare = variable.removeprefix(OBO_PREFIX)
            if not bare.startswith(DOWNSTREAM_PREFIX):
                continue
            self.read.add(bare)
            name, _, field_name = bare[len(DOWNSTREAM_PREFIX):].partition("__")
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,31}", name) or name.endswith("_"):
                self.error(f"{variable}: the API's name must be letters, digits and _")
            elif field_name not in DOWNSTREAM_FIELDS:
                close = difflib.get_close_matches(field_name, list(DOWNSTREAM_FIELDS), n=1)
                hint = f" (did you mean {DOWNSTREAM_PREFIX}{name}__{close[0]}?)" if close else ""
                self.error(f"{variable}: unknown; use {DOWNSTREAM_PREFIX}<NAME>__BASE_URL, "
                           f"__SCOPES, __APP_SCOPES or __TIMEOUT_SECONDS{hint}")
            elif name.lower() == "graph":
                self.error(f"{variable}: graph is set by GRAPH_BASE_URL, GRAPH_SCOPES, "
                           "GRAPH_APP_SCOPES and GRAPH_TIMEOUT_SECONDS")
            else:
                names.add(name)
        apis = {}
        for name in sorted(names):
            prefix = f"{DOWNSTREAM_PREFIX}{name}__"
            if name.lower() in apis:
                self.error(f"{prefix}BASE_URL: {name} is configured twice (names ignore case)")
                continue
            apis[name.lower()] = DownstreamApiSettings(
                base_url=self.https_url(prefix + "BASE_URL", self.required(prefix + "BASE_URL")),
                scopes=self.scopes(prefix + "SCOPES", self.required(prefix + "SCOPES")),
                app_scopes=self.app_scopes(prefix + "APP_SCOPES"),
                timeout_seconds=self.seconds(prefix + "TIMEOUT_SECONDS", DEFAULT_DOWNSTREAM_TIMEOUT),
            )
        return apis

    @_or(lambda: LOG_LEVELS[1])
    def log_level(self, name: str) -> str:
        """One of ``LOG_LEVELS``, lower-case: gunicorn would quietly take another as info and
        ``logging`` would raise in every worker."""
        value = (self.optional(name) or "info").lower()
        if value not in LOG_LEVELS:
            raise SettingsError(f"{name}: must be one of {', '.join(LOG_LEVELS)}")
        return value

    @_or(lambda choices: choices[0])
    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        """One of ``choices`` (any case, returned lower-case); unset: the first."""
        value = (self.optional(name) or choices[0]).lower()
        if value not in choices:
            raise SettingsError(f"{name}: must be one of {', '.join(c for c in choices if c)}")
        return value

    @_or(lambda: PLACEHOLDER_GUID)
    def tenant(self, name: str) -> str:
        """A tenant id (GUID), or ``organizations`` / ``common`` for a multi-tenant API."""
        value = self.required(name)
        if value.lower() in MULTI_TENANT_IDS:
            return value.lower()
        return self.guid(name)

    @_or(lambda: ())
    def tenants(self, name: str) -> tuple[str, ...]:
        """Tenant ids, comma-separated, or ``*`` alone."""
        items = tuple(item.strip().lower() for item in (self.optional(name) or "").split(",") if item.strip())
        if items == ("*",):
            return items
        for position, item in enumerate(items, start=1):
            try:
                uuid.UUID(item)
            except ValueError:
                raise SettingsError(f"{name}: entry {position} is not a tenant id (GUID); "
                                    "or give * alone for any tenant") from None
        return tuple(str(uuid.UUID(item)) for item in items)

    @_or(lambda: None)
    def optional_guid(self, name: str) -> str | None:
        return self.guid(name) if self.optional(name) else None

    @_or(lambda: None)
    def readable_file(self, name: str) -> str | None:
        value = self.optional(name)
        if value is not None and not os.access(value, os.R_OK):
            raise SettingsError(f"{name}: cannot read the file")
        return value

    @_or(lambda default: ())
    def capabilities(self, name: str, default: str) -> tuple[str, ...]:
        """Client capabilities msal declares (``cp1``: CAE); ``none`` declares none."""
        value = self.optional(name) or default
        if value.lower() == "none":
            return ()
        items = tuple(item.strip() for item in value.split(",") if item.strip())
        if not all(re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", item) for item in items):
            raise SettingsError(f"{name}: must be capabilities such as cp1, comma-separated (or none)")
        return items

    @_or(lambda default, pattern: default)
    def matching(self, name: str, default: str, pattern: re.Pattern[str]) -> str:
        value = self.optional(name) or default
        if not pattern.fullmatch(value):
            raise SettingsError(f"{name}: must match {pattern.pattern}")
        return value

    @_or(lambda default: tuple(default.replace(",", " ").split()))
    def scopes(self, name: str, default: str) -> tuple[str, ...]:
        values = tuple((self.optional(name) or default).replace(",", " ").split())
        if not values:
            raise SettingsError(f"{name}: must list at least one scope")
        return values

    @_or(lambda default, unit="seconds": default)
    def positive_int(self, name: str, default: int, unit: str = "seconds") -> int:
        raw = self.optional(name)
        if raw is None:
            return default
        if not re.fullmatch(r"[0-9]{1,10}", raw) or int(raw) <= 0:
            raise SettingsError(f"{name}: must be a positive whole number of {unit}")
        return int(raw)

    @_or(lambda default, unit: default)
    def whole_number(self, name: str, default: int, unit: str) -> int:
        """Like ``positive_int``, for settings where 0 means something (e.g. "never")."""
        raw = self.optional(name)
        if raw is None:
            return default
        if not re.fullmatch(r"[0-9]{1,10}", raw):
            raise SettingsError(f"{name}: must be a whole number of {unit} (0 or more)")
        return int(raw)

    @_or(lambda default: default)
    def seconds(self, name: str, default: float) -> float:
        """A duration in seconds, fractions allowed, from 0.01 to one hour."""
        raw = self.optional(name)
        if raw is None:
            return default
        if not re.fullmatch(r"[0-9]{1,6}(\.[0-9]{1,3})?", raw) or not 0.01 <= float(raw) <= 3600:
            raise SettingsError(f"{name}: must be a number of seconds from 0.01 to 3600")
        return float(raw)

    @_or(lambda: ())
    def fernet_keys(self, name: str) -> tuple[str, ...]:
        """Fernet keys separated by commas and nothing else. Whitespace inside a key is
        refused: ``"new old"`` can pass for one key (base64 decoding skips spaces), and
        then no entry decrypts after the deploy and every user silently re-exchanges."""
        keys = tuple(k.strip() for k in (self.optional(name) or "").split(",") if k.strip())
        for position, key in enumerate(keys, start=1):
            if any(character.isspace() for character in key):
                raise SettingsError(
                    f"{name}: key {position} contains whitespace; separate keys with commas "
                    "only (new,old)")
            try:
                Fernet(key)
            except (ValueError, TypeError):
                raise SettingsError(
                    f"{name}: key {position} is not a Fernet key (32 url-safe base64 bytes)"
                ) from None
        return keys

    @_or(lambda: ())
    def origins(self, name: str) -> tuple[str, ...]:
        origins = tuple(o.strip().rstrip("/") for o in (self.optional(name) or "").split(","))
        origins = tuple(o for o in origins if o)
        for position, origin in enumerate(origins, start=1):
            if not _ORIGIN.match(origin):
                raise SettingsError(f"{name}: entry {position} is not an origin like https://app.example.com")
        return origins


def load_certificate(path: str, password: str | None) -> ClientCertificate:
    """The key and certificate of a PEM file, checked to match and be unexpired."""
    name = "AZURE_CLIENT_CERTIFICATE_PATH"
    try:
        pem = Path(path).read_bytes()
    except OSError:
        raise SettingsError(f"{name}: cannot read the file") from None
    try:
        key = serialization.load_pem_private_key(
            pem, password=password.encode() if password else None
        )
    except TypeError:
        raise SettingsError("AZURE_CLIENT_CERTIFICATE_PASSWORD: missing or not needed") from None
    except ValueError:
        raise SettingsError(
            f"{name}: no readable PEM private key (or AZURE_CLIENT_CERTIFICATE_PASSWORD is wrong)"
        ) from None
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise SettingsError(f"{name}: no PEM certificate in the file") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if certificate.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise SettingsError(f"{name}: the certificate does not match the private key")
    if certificate.not_valid_after_utc < datetime.now(UTC):
        raise SettingsError(f"{name}: the certificate has expired")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
    return ClientCertificate(private_key_pem=key_pem, certificate_pem=cert_pem)
