"""``flask obo check``: everything that must be right before the first request, checked
against the real services, one line each.

``flask --app wsgi obo check`` (``--json`` for scripts) runs every check and prints, for
each, ``ok`` or ``FAIL``, what was checked (a URL, a host, a setting name: never a secret),
what was found or the cause (an AADSTS code and its meaning, a TLS or Redis error) and what
to change. It exits 0 when every check passed, 1 otherwise:

* **settings**: every bad setting at once, one line each; a name under flask-obo's
  prefixes that it does not read is a ``warn`` line with the closest known name;
* **authority**: the OpenID configuration over trusted TLS (an untrusted CA names the CA
  bundle in use and ``REQUESTS_CA_BUNDLE``), the tenant exists (AADSTS90002), the issuer
  is the one tokens will carry, the signing keys load;
* **credential**: a client-credentials request for the first downstream API's resource
  (``https://graph.microsoft.com/.default``) with the API's own credential: a wrong
  secret, an unknown client id, an unregistered certificate, a federated credential that
  does not match are each named (``flask_obo.diagnosis.AADSTS``);
* **redis** (with ``REDIS_URL``): reachable, password accepted, version and topology
  (Cluster state, Sentinel's master), the invalidation channel delivers a change, and a
  sample of entries decrypts with ``TOKEN_CACHE_KEYS``;
* **downstream**: each API's base URL resolves and answers over trusted TLS.
"""

from __future__ import annotations

import json
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import click
import msal
import requests
from cryptography.fernet import InvalidToken
from flask import current_app
from flask.cli import with_appcontext
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from .cache_store import TOMBSTONE, RedisTokenCacheStore
from .credentials import client_credential
from .diagnosis import (
    AUTHORITY,
    Cause,
    cause_of_answer,
    cause_of_response,
    redis_cause,
    tls_problem,
    untrusted_cause,
)
from .redis_topology import redis_client
from .settings import MULTI_TENANT_IDS, Settings, SettingsError, default_environ, unknown_setting_warnings
from .store_errors import StoreUnavailable
from .token_cache import TokenCacheCodec

OK, FAIL, WARN, SKIP = "ok", "FAIL", "warn", "skip"
DECRYPT_SAMPLE = 200  # entries read to check TOKEN_CACHE_KEYS
CHANNEL_WAIT_SECONDS = 5.0  # how long the invalidation channel may take to connect and deliver
_WIDTH = 10


@dataclass(frozen=True)
class Line:
    """One check's outcome: ``status`` (ok, FAIL, warn, skip), which check, what was
    checked (never a secret), what was found or why it failed, and what to change."""

    status: str
    check: str
    subject: str
    detail: str
    fix: str = ""

    def text(self) -> str:
        fix = f" -> {self.fix}" if self.fix else ""
        return f"{self.status:<4}  {self.check:<{_WIDTH}}  {self.subject}: {self.detail}{fix}"


def failed(check: str, subject: str, cause: Cause) -> Line:
    return Line(FAIL, check, subject, f"{cause.reason} ({cause.meaning})", cause.fix)


@click.group("obo")
def obo_cli() -> None:
    """flask-obo's operator commands."""


@obo_cli.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: ok and the lines.")
@with_appcontext
def check(as_json: bool) -> None:
    """Check the settings, Entra ID (authority, credential), Redis and every downstream API,
    one line each; exit 1 if any check fails."""
    lines: list[Line] = []
    for line in run_checks(_app_settings()):
        lines.append(line)
        if not as_json:
            click.echo(line.text())
    passed = not any(line.status == FAIL for line in lines)
    if as_json:
        click.echo(json.dumps({"ok": passed, "checks": [asdict(line) for line in lines]}))
    elif passed:
        click.echo("all checks passed")
    if not passed:
        raise SystemExit(1)


def _app_settings() -> Settings | SettingsError:
    """The application's settings, or the error that kept it from being built."""
    from .cli import SETTINGS_ERROR_KEY
    from .extension import EXTENSION_KEY, OboServices

    services = current_app.extensions.get(EXTENSION_KEY)
    if isinstance(services, OboServices):
        return services.settings
    error = current_app.extensions.get(SETTINGS_ERROR_KEY)
    return error if isinstance(error, SettingsError) else SettingsError("flask-obo: not set up on this app")


def run_checks(settings: Settings | SettingsError) -> Iterator[Line]:
    """Every check's lines, as they complete."""
    if isinstance(settings, SettingsError):
        for error in settings.errors:
            name, _, problem = error.partition(": ")
            yield Line(FAIL, "settings", name, problem, "fix this setting (its value is not shown)")
        for warning in unknown_setting_warnings(default_environ()):
            name, _, problem = warning.partition(": ")
            yield Line(WARN, "settings", name, problem)
        try:  # Redis needs only its own settings: check it all the same
            cache_settings: Settings | None = Settings.for_token_cache()
        except SettingsError:
            cache_settings = None
        yield Line(SKIP, "authority", "AZURE_*", "not checked until the settings above are fixed")
        if cache_settings is None:
            yield Line(SKIP, "redis", "REDIS_URL", "not checked until the settings above are fixed")
        elif cache_settings.redis_url:
            yield from check_redis(cache_settings)
        return
    yield Line(OK, "settings", "environment", "every setting is valid")
    for warning in settings.warnings:
        name, _, problem = warning.partition(": ")
        yield Line(WARN, "settings", name, problem)
    authority_ok = True
    for line in check_authority(settings):
        authority_ok = authority_ok and line.status != FAIL
        yield line
    if authority_ok:
        yield check_credential(settings)
    else:
        yield Line(SKIP, "credential", settings.client_id, "not checked: the authority failed")
    if settings.redis_url:
        yield from check_redis(settings)
    for name, api in settings.downstream_apis.items():
        timeout = settings.entra_timeout
        yield check_downstream(name, api.base_url, timeout)


# --- authority ---------------------------------------------------------------------------------
def _get(check: str, url: str, timeout: tuple[float, float]) -> requests.Response | Line:
    """GET ``url`` (any status), or the line saying why it could not be fetched."""
    host = urlsplit(url).hostname or ""
    try:
        socket.getaddrinfo(host, urlsplit(url).port or 443)
    except (OSError, UnicodeError):
        return Line(FAIL, check, url, f"the host {host} does not resolve (DNS)",
                    "check the host name in the setting; and this machine's DNS")
    try:
        return requests.get(url, timeout=timeout, allow_redirects=False)
    except requests.exceptions.SSLError as exc:
        return failed(check, url, untrusted_cause(AUTHORITY, url, tls_problem(exc) or "TLS failed"))
    except requests.RequestException as exc:
        return Line(FAIL, check, url, f"unreachable ({type(exc).__name__})",
                    "check that this machine reaches the host (firewall, proxy: HTTPS_PROXY)")


def check_authority(settings: Settings) -> Iterator[Line]:
    url = settings.openid_configuration_url
    timeout = settings.entra_timeout
    response = _get("authority", url, timeout)
    if isinstance(response, Line):
        yield response
        return
    cause = cause_of_response(response)
    if cause is not None:
        yield failed("authority", url, cause)
        return
    try:
        document = response.json() if response.status_code == 200 else None
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("jwks_uri"), str):
        yield Line(FAIL, "authority", url, f"HTTP {response.status_code} without an OpenID configuration",
                   "AZURE_AUTHORITY_HOST must be the Entra ID host (https://login.microsoftonline.com)")
        return
    yield Line(OK, "authority", url, "OpenID configuration over trusted TLS; the tenant exists")
    expected = (f"{settings.authority_host}/{{tenantid}}/v2.0" if settings.multi_tenant
                else settings.issuer)
    issuer = document.get("issuer")
    if issuer != expected:
        yield Line(FAIL, "authority", "issuer", f"the authority's issuer is {issuer!r}, tokens are "
                   f"expected from {expected!r}", "AZURE_AUTHORITY_HOST and AZURE_TENANT_ID must name "
                   "the issuer of the SPA's tokens")
    else:
        yield Line(OK, "authority", "issuer", f"{issuer} (as tokens will be validated)")
    keys = _get("authority", document["jwks_uri"], timeout)
    if isinstance(keys, Line):
        yield keys
        return
    try:
        count = len(keys.json().get("keys", ())) if keys.status_code == 200 else 0
    except (ValueError, AttributeError):
        count = 0
    if count:
        yield Line(OK, "authority", document["jwks_uri"], f"{count} signing keys")
    else:
        yield Line(FAIL, "authority", document["jwks_uri"], f"HTTP {keys.status_code}, no signing keys",
                   "the authority's jwks_uri must serve its keys")


# --- the API's credential ----------------------------------------------------------------------
def credential_scope(settings: Settings) -> str:
    """``<resource>/.default`` of the first downstream API (Graph unless changed)."""
    scope = next(iter(settings.downstream_apis.values())).scopes[0]
    if scope.endswith("/.default"):
        return scope
    resource, slash, _ = scope.rpartition("/")
    return f"{resource}/.default" if slash else "https://graph.microsoft.com/.default"


def check_credential(settings: Settings) -> Line:
    tenant = settings.tenant_id
    if tenant in MULTI_TENANT_IDS:  # client credentials need a tenant: the first allowed one
        tenant = next((t for t in settings.allowed_tenants if t != "*"), "")
        if not tenant:
            return Line(SKIP, "credential", settings.client_id,
                        "multi-tenant with AZURE_ALLOWED_TENANTS=*: no tenant to ask")
    authority = f"{settings.authority_host}/{tenant}"
    token_url = f"{authority}/oauth2/v2.0/token"
    scope = credential_scope(settings)
    subject = f"{token_url} (client {settings.client_id}, {_credential_name(settings)})"
    timeout = settings.entra_timeout
    try:
        credential = client_credential(settings).for_msal()
        app = msal.ConfidentialClientApplication(
            settings.client_id, client_credential=credential, authority=authority,
            instance_discovery=False, timeout=timeout)
        result = app.acquire_token_for_client([scope])
    except requests.exceptions.SSLError as exc:
        return failed("credential", token_url, untrusted_cause(AUTHORITY, token_url, tls_problem(exc) or ""))
    except Exception as exc:  # msal raises for network failures and for a bad discovery answer
        return Line(FAIL, "credential", subject, f"the token request failed ({type(exc).__name__})",
                    "check that this machine reaches the authority")
    if isinstance(result.get("access_token"), str):
        return Line(OK, "credential", subject, f"client credentials granted for {scope}")
    cause = cause_of_answer(result)
    if cause is not None:
        return failed("credential", subject, cause)
    codes = [code for code in result.get("error_codes") or [] if isinstance(code, int)]
    where = f"{settings.authority_host}/error?code={codes[0]}" if codes else "the error above"
    return Line(FAIL, "credential", subject,
                f"{result.get('error')} {' '.join(f'AADSTS{c}' for c in codes)} for {scope}".strip(),
                f"see {where}")


def _credential_name(settings: Settings) -> str:
    if settings.federated_token_file:
        return "AZURE_FEDERATED_TOKEN_FILE"
    if settings.client_assertion:
        return "AZURE_CLIENT_ASSERTION=managed_identity"
    if settings.client_certificate_path:
        return "AZURE_CLIENT_CERTIFICATE_PATH"
    return "AZURE_CLIENT_SECRET"


# --- Redis -------------------------------------------------------------------------------------
def redis_where(settings: Settings) -> str:
    """REDIS_URL without its password (host:port, or the Sentinel service)."""
    assert settings.redis_url is not None
    parts = urlsplit(settings.redis_url)
    if settings.redis_sentinels:
        sentinels = ",".join(f"{host}:{port}" for host, port in settings.redis_sentinels)
        return f"sentinel service {parts.hostname} via {sentinels}"
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"


def _redis_failure(where: str, exc: BaseException) -> Line:
    cause = redis_cause(exc)
    if cause is not None:
        return failed("redis", where, cause)
    return Line(FAIL, "redis", where, f"unreachable ({type(exc).__name__})",
                "check REDIS_URL's host and port (REDIS_SENTINELS, REDIS_CLUSTER) and that Redis runs")


def check_redis(settings: Settings) -> Iterator[Line]:
    where = redis_where(settings)
    try:
        client = redis_client(settings)
        client.ping()
        info = client.info("server")
        version = info.get("redis_version") or next(  # a cluster answers per node
            (node.get("redis_version") for node in info.values() if isinstance(node, dict)), "?")
        topology = _topology(settings, client)
    except (RedisError, RedisClusterException, OSError) as exc:
        yield _redis_failure(where, exc)
        return
    yield Line(OK, "redis", where, f"reachable, password accepted, Redis {version}, {topology}")
    store = RedisTokenCacheStore.from_settings(settings)
    yield _check_channel(store, client)
    yield _check_keys(store, settings)


def _topology(settings: Settings, client: object) -> str:
    if isinstance(client, RedisCluster):
        state = client.cluster_info().get("cluster_state", "?")
        return f"Redis Cluster ({len(client.get_primaries())} primaries, state {state})"
    if settings.redis_sentinels:
        host, port = client.connection_pool.get_master_address()  # type: ignore[attr-defined]
        return f"Sentinel master found at {host}:{port}"
    return "a single Redis"


class _Recorder:
    """A store watcher that notes the partitions reported changed."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.changed = threading.Condition()

    def invalidate(self, partitions: list[str] | None) -> None:
        with self.changed:
            self.seen.update(partitions or ())
            self.changed.notify_all()

    def resync(self) -> None:
        return None


def _wait(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _check_channel(store: RedisTokenCacheStore, client: object) -> Line:
    """A probe entry written by another connection must be reported by the listener."""
    recorder = _Recorder()
    store.watch(recorder)
    coherence = store.coherence()
    subject = f"invalidation channel ({store.key('…')})"
    if not _wait(lambda: coherence.connected, CHANNEL_WAIT_SECONDS):
        return Line(FAIL, "redis", subject, f"did not connect within {CHANNEL_WAIT_SECONDS:g} s",
                    "the Redis user needs CLIENT TRACKING and SUBSCRIBE (a proxy may not pass them); "
                    "without the channel, memory copies are re-read from Redis before each use")
    probe = "obo-check-" + secrets.token_hex(8)
    key = store.key(probe)
    try:
        client.set(key, TOMBSTONE, ex=60)  # type: ignore[attr-defined]
        delivered = _wait(lambda: probe in recorder.seen, CHANNEL_WAIT_SECONDS)
        client.delete(key)  # type: ignore[attr-defined]
    except (RedisError, RedisClusterException) as exc:
        return _redis_failure(subject, exc)
    if not delivered:
        return Line(FAIL, "redis", subject, "connected, but a change was not reported",
                    "Redis must support CLIENT TRACKING with BCAST (Redis 6 or later)")
    return Line(OK, "redis", subject, "a change was reported to listeners")


def _check_keys(store: RedisTokenCacheStore, settings: Settings) -> Line:
    """Do the entries decrypt with TOKEN_CACHE_KEYS? (A sample: entries of other deployments
    under the same prefix, or a key dropped too early, show up as failures.)"""
    codec = TokenCacheCodec(settings.token_cache_keys)
    try:
        partitions = store.partitions()
        sample = random.sample(partitions, min(len(partitions), DECRYPT_SAMPLE))
        blobs = [blob for blob in store.load_many(sample) if blob and blob != TOMBSTONE]
    except Exception as exc:  # StoreUnavailable: the breaker's own view of a failure above
        # (named CacheUnavailable, as this line always has: scripts may match it)
        reason = "CacheUnavailable" if isinstance(exc, StoreUnavailable) else type(exc).__name__
        return Line(FAIL, "redis", "TOKEN_CACHE_KEYS", f"could not read entries ({reason})")
    if not blobs:
        return Line(OK, "redis", "TOKEN_CACHE_KEYS",
                    f"no entries yet under {settings.token_cache_prefix}:cache:")
    undecryptable = 0
    for blob in blobs:
        try:
            codec.rekeyed(blob)  # decrypts with any key (and seals again, in memory only)
        except InvalidToken:
            undecryptable += 1
    if undecryptable:
        return Line(FAIL, "redis", "TOKEN_CACHE_KEYS",
                    f"{undecryptable} of {len(blobs)} sampled entries do not decrypt with any key",
                    "TOKEN_CACHE_KEYS must hold the key that sealed them (another deployment's, or "
                    "an old key dropped before `flask token-cache rekey`); else those users each "
                    "make one new exchange")
    return Line(OK, "redis", "TOKEN_CACHE_KEYS", f"{len(blobs)} sampled entries decrypt")


# --- downstream APIs ---------------------------------------------------------------------------
def check_downstream(name: str, base_url: str, timeout: tuple[float, float]) -> Line:
    response = _get("downstream", base_url, timeout)
    if isinstance(response, Line):
        return Line(response.status, "downstream", f"{name} {base_url}", response.detail, response.fix)
    return Line(OK, "downstream", f"{name} {base_url}",
                f"resolves and answers over trusted TLS (HTTP {response.status_code} without a token)")
