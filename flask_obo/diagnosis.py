"""Naming a misconfiguration, so that it is never mistaken for an outage.

A wrong tenant, an unknown application, a rejected credential, an authority whose CA this
machine does not trust, a wrong Redis password: each fails every request the same way an
outage would, and looks like one unless it is named. Here each is turned into a ``Cause``
(a component, a reason code such as ``AADSTS90002`` or ``untrusted_ca``, what it means
and what to change), from the answers Entra ID and Redis give:

* ``cause_of_answer``: an Entra ID error body (its ``error_codes``);
* ``cause_of_exception``: a TLS failure (``requests.exceptions.SSLError``) or a Redis
  authentication / ACL error.

``flask obo check`` prints causes; at run time a ``Diagnosis`` (one per application,
owned by its ``OboServices``) keeps the current cause of each component for ``/readyz``
(``authority: misconfigured``, ``credential: rejected``, ``redis: misconfigured``) and
logs each at ERROR with the URL and the reason, once per cause per minute however many
requests meet it. A success of the component clears it: a fixed setting, a restored
secret, is never a sticky failure.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import requests
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

log = logging.getLogger(__name__)

LOG_INTERVAL_SECONDS = 60.0  # the same cause is logged at most this often (per process)
AUTHORITY, CREDENTIAL, REDIS = "authority", "credential", "redis"
#: What ``/readyz`` says of a component with a cause.
STATUS = {AUTHORITY: "misconfigured", CREDENTIAL: "rejected", REDIS: "misconfigured"}


@dataclass(frozen=True)
class Cause:
    """Why a component cannot work whatever the retries, and what to change."""

    component: str  # AUTHORITY, CREDENTIAL or REDIS
    reason: str  # a reason code: "AADSTS90002", "untrusted_ca", "redis_auth"...
    meaning: str  # what the reason means, in a few words
    fix: str  # what to change (setting names, never values)

    @property
    def status(self) -> str:
        return STATUS[self.component]

    def describe(self, where: str) -> str:
        return f"{where}: {self.reason} ({self.meaning}); {self.fix}"


_TENANT = "AZURE_TENANT_ID names no tenant of this cloud: check it and AZURE_AUTHORITY_HOST"
_CLIENT = ("check AZURE_CLIENT_ID (the app registration's Application (client) ID) and that "
           "the app is registered in AZURE_TENANT_ID's tenant")
_SECRET = ("check AZURE_CLIENT_SECRET: the secret's Value (not its Secret ID), not expired, "
           "not removed from the app registration")
_CERTIFICATE = ("check AZURE_CLIENT_CERTIFICATE_PATH: its certificate must be uploaded to the "
                "app registration (Certificates & secrets) and still valid there")
_FEDERATED = ("the app registration needs a federated credential whose issuer, subject and "
              "audience match the token in AZURE_FEDERATED_TOKEN_FILE (subjects are case-sensitive)")

#: Entra ID's answers that no retry can fix: (component, meaning, what to change).
AADSTS: Mapping[int, tuple[str, str, str]] = {
    90002: (AUTHORITY, "tenant not found", _TENANT),
    900023: (AUTHORITY, "the tenant is not a valid tenant identifier", _TENANT),
    700016: (CREDENTIAL, "application not found in the tenant", _CLIENT),
    7000215: (CREDENTIAL, "invalid client secret", _SECRET),
    7000222: (CREDENTIAL, "the client secret has expired", _SECRET),
    7000218: (CREDENTIAL, "no client credential in the request", _SECRET),
    700025: (CREDENTIAL, "the application is a public client: it takes no credential",
             "AZURE_CLIENT_ID must name the API's app registration, not the SPA's"),
    700027: (CREDENTIAL, "the certificate that signed the assertion is not registered on the app, "
             "or its signature is invalid", _CERTIFICATE),
    7000274: (CREDENTIAL, "the certificate registered on the app has expired", _CERTIFICATE),
    7000277: (CREDENTIAL, "the certificate registered on the app is not valid yet", _CERTIFICATE),
    700024: (CREDENTIAL, "the client assertion is outside its validity period",
             "check the clock of this machine, and that AZURE_FEDERATED_TOKEN_FILE is refreshed"),
    70021: (CREDENTIAL, "no federated credential of the app matches the assertion's issuer",
            _FEDERATED),
    700211: (CREDENTIAL, "no federated credential of the app has the assertion's issuer", _FEDERATED),
    700212: (CREDENTIAL, "no federated credential of the app has the assertion's audience", _FEDERATED),
    700213: (CREDENTIAL, "no federated credential of the app has the assertion's subject", _FEDERATED),
    7002138: (CREDENTIAL, "the assertion's subject matches a federated credential only ignoring case",
              _FEDERATED),
}


def cause_of_code(code: int) -> Cause | None:
    entry = AADSTS.get(code)
    if entry is None:
        return None
    component, meaning, fix = entry
    return Cause(component, f"AADSTS{code}", meaning, fix)


def cause_of_answer(body: Any) -> Cause | None:
    """The cause an Entra ID error body names (``error_codes``), if it is one of ``AADSTS``."""
    codes = body.get("error_codes") if isinstance(body, dict) else None
    for code in codes if isinstance(codes, list) else ():
        cause = cause_of_code(code) if isinstance(code, int) else None
        if cause is not None:
            return cause
    return None


def cause_of_response(response: requests.Response) -> Cause | None:
    """The cause of an Entra ID answer ``response`` (4xx with a JSON error body)."""
    if not 400 <= response.status_code < 500:
        return None
    try:
        return cause_of_answer(response.json())
    except ValueError:
        return None


_VERIFY_FAILED = re.compile(r"certificate verify failed: ([^(\n]+?)\s*(?:\(|$)")


def tls_problem(exc: BaseException) -> str | None:
    """What certificate verification said (``unable to get local issuer certificate``...),
    or None when ``exc`` is not a failed verification. requests and urllib3 nest the
    ``ssl`` error in their own, so it is read from the message, which carries no secret."""
    if not isinstance(exc, requests.exceptions.SSLError):
        return None
    match = _VERIFY_FAILED.search(str(exc))
    return match.group(1).strip() if match else "TLS handshake failed"


def ca_bundle_in_use(url: str) -> str:
    """The CA bundle requests verifies ``url``'s certificate with, and where it comes from."""
    session = requests.Session()
    verify = session.merge_environment_settings(url, {}, None, None, None)["verify"]
    if isinstance(verify, str):
        import os

        source = next((name for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
                       if os.environ.get(name) == verify), "the session")
        return f"{verify} (from {source})"
    return f"{requests.certs.where()} (certifi's, as REQUESTS_CA_BUNDLE is not set)"


def untrusted_cause(component: str, url: str, problem: str) -> Cause:
    return Cause(
        component, "untrusted_ca" if "issuer" in problem or "self" in problem else "tls_error",
        f"TLS: {problem}; CA bundle in use: {ca_bundle_in_use(url)}",
        "set REQUESTS_CA_BUNDLE to a bundle that holds the CA of this host's certificate "
        "(or fix the host name)",
    )


def cause_of_exception(component: str, url: str, exc: BaseException) -> Cause | None:
    """The cause of a failed request to ``url`` (TLS) or Redis call (authentication, ACL)."""
    problem = tls_problem(exc)
    if problem is not None:
        return untrusted_cause(component, url, problem)
    return redis_cause(exc)


def redis_cause(exc: BaseException) -> Cause | None:
    """Redis refused this client (password, ACL user or permissions): a setting, not an outage."""
    if isinstance(exc, NoPermissionError):
        return Cause(REDIS, "redis_acl", "the Redis user may not run the commands flask-obo needs",
                     "grant the user of REDIS_URL the commands and keys under TOKEN_CACHE_PREFIX")
    message = str(exc) if isinstance(exc, ResponseError) else ""
    if isinstance(exc, AuthenticationError) or message.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
        return Cause(REDIS, "redis_auth", "Redis refused the password or user",
                     "check the user and password in REDIS_URL (REDIS_SENTINEL_PASSWORD for "
                     "the sentinels)")
    return None


@dataclass(frozen=True)
class Finding:
    """A cause as met: where (a URL or host) and when (monotonic seconds)."""

    cause: Cause
    where: str
    since: float


class Diagnosis:
    """The current cause of each component's failure, for ``/readyz`` and the log."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 log_interval: float = LOG_INTERVAL_SECONDS) -> None:
        self._clock = clock
        self._interval = log_interval
        self._findings: dict[str, Finding] = {}
        self._logged: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()

    def report(self, cause: Cause, where: str) -> None:
        """``cause`` was met at ``where``: remember it, and log it unless done this minute."""
        now = self._clock()
        key = (cause.component, cause.reason, where)
        with self._lock:
            previous = self._findings.get(cause.component)
            same = previous is not None and (previous.cause, previous.where) == (cause, where)
            self._findings[cause.component] = previous if same and previous else Finding(cause, where, now)
            due = now - self._logged.get(key, float("-inf")) >= self._interval
            if due:
                self._logged[key] = now
        if due:
            log.error("misconfiguration: %s %s; /readyz says %s: %s (logged at most once a minute)",
                      cause.component, cause.describe(where), cause.component, cause.status)

    def failed(self, component: str, where: str, exc: BaseException) -> None:
        """A request to ``where`` raised ``exc``: report its cause, if it names one."""
        cause = cause_of_exception(component, where, exc)
        if cause is not None:
            self.report(cause, where)

    def answered(self, where: str, response: requests.Response) -> None:
        """Entra ID answered ``response`` at ``where``: report the cause it names, if any."""
        cause = cause_of_response(response)
        if cause is not None:
            self.report(cause, where)

    def clear(self, *components: str) -> None:
        """These components just worked: whatever was wrong has been fixed."""
        if not self._findings:  # the common case, without the lock
            return
        with self._lock:
            for component in components:
                if self._findings.pop(component, None) is not None:
                    log.warning("%s works again", component)

    def finding(self, component: str) -> Finding | None:
        return self._findings.get(component)

    def findings(self) -> dict[str, Finding]:
        with self._lock:
            return dict(self._findings)

