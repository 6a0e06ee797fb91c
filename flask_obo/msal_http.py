"""msal's HTTP client: the process's pooled session, our timeouts, the cached OpenID
configuration (so building an msal application costs no request), a per-user
Retry-After gate, and an offline mode for the first look at the cache.

The offline mode and the request's deadline are context variables, set around one
msal call by ``offline()`` and ``within()``: msal is handed one client per user at
construction, so per-call state can't be an argument, and a flag on that shared client
would leak into another thread's call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NoReturn
from urllib.parse import urlencode, urlsplit

import requests
import urllib3

from .authority import TenantConfigurations
from .bulkhead import Deadline
from .diagnosis import AUTHORITY, CREDENTIAL, Diagnosis
from .http import DEFAULT_RETRY_AFTER, retry_after_seconds
from .metrics import NO_ANSWER, Metrics
from .request_ids import CLIENT_REQUEST_ID_HEADER, current_request_id

log = logging.getLogger(__name__)

OUTAGE_GATE_SECONDS = 2  # after a 5xx, timeout or garbage answer: brief, not per Retry-After
READ_CHUNK = 64 * 1024
MAX_RESPONSE_BYTES = 1024 * 1024  # a token response is a few KiB


class EntraUnavailable(requests.RequestException):
    """Entra ID is down, slow or throttling; retry after ``retry_after`` seconds.

    A ``RequestException`` because that is what msal treats as a network failure: when a
    cached token is merely due for renewal (``refresh_in``), msal then serves it instead
    of failing the request.
    """

    def __init__(self, retry_after: int = DEFAULT_RETRY_AFTER) -> None:
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


class NetworkNeeded(Exception):
    """Raised in offline mode: the cache alone cannot answer."""


_offline: ContextVar[bool] = ContextVar("msal_offline", default=False)
_deadline: ContextVar[Deadline | None] = ContextVar("msal_deadline", default=None)


@contextmanager
def offline() -> Iterator[None]:
    """msal calls in this block may use the cache only: any request raises NetworkNeeded."""
    reset = _offline.set(True)
    try:
        yield
    finally:
        _offline.reset(reset)


@contextmanager
def within(deadline: Deadline) -> Iterator[None]:
    """Calls to Entra ID in this block end by ``deadline``, whatever their own timeouts."""
    reset = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(reset)


def bounded_timeout(timeout: tuple[float, float]) -> tuple[float, float]:
    """``(connect, read)`` capped by the current request's deadline (``within``); raises
    ``EntraUnavailable`` when none of it is left."""
    connect, read = timeout
    deadline = _deadline.get()
    if deadline is None:
        return connect, read
    left = deadline.remaining()
    if left < 0.05:
        log.warning("no time left for a call to the identity provider")
        raise EntraUnavailable(retry_after=1)
    return min(connect, left), min(read, left)


class _CachedResponse:
    def __init__(self, text: str) -> None:
        self.status_code, self.text = 200, text
        self.headers: dict[str, str] = {}

    def raise_for_status(self) -> None:
        return None


class MsalHttpClient:
    """One user's view of the network for msal.

    A 429, 5xx, timeout or non-JSON answer from the token endpoint raises
    ``EntraUnavailable`` with a Retry-After instead of reaching msal, whose throttling
    store is shared by all users of an application, and closes this user's gate: until
    Retry-After passes after a 429, for two seconds after the others.

    Each POST that reaches the network counts in ``flask_obo_token_endpoint_requests_total``
    (by grant and status) and ``flask_obo_token_endpoint_seconds``.
    """

    def __init__(self, session: requests.Session, metadata: TenantConfigurations,
                 timeout: tuple[float, float], metrics: Metrics | None = None) -> None:
        self._session, self._metadata = session, metadata
        self._timeout = timeout
        self._metrics = metrics or Metrics()
        self.blocked_until = 0.0
        # Where misconfigurations are named: the application's, shared through its metadata.
        self._diagnosis: Diagnosis | None = getattr(metadata, "diagnosis", None)

    def get(self, url: str, params: Any = None, headers: Any = None, **_: Any) -> Any:
        config = None if params else self._metadata.for_url(url)
        if config is not None:
            return _CachedResponse(config.text())
        if _offline.get():
            raise NetworkNeeded()
        return self._send("GET", url, params=params, headers=headers)

    def post(self, url: str, params: Any = None, data: Any = None, headers: Any = None,
             **_: Any) -> Any:
        if _offline.get():
            raise NetworkNeeded()
        wait = self.blocked_until - time.monotonic()
        if wait > 0:
            raise EntraUnavailable(retry_after=int(wait) + 1)
        grant = _grant_type(data)
        if isinstance(data, dict):
            data, headers = form_body(data, headers)
        return self._send("POST", url, grant, params=params, data=data, headers=headers)

    def _send(self, method: str, url: str, grant: str | None = None, headers: Any = None,
              **kwargs: Any) -> requests.Response:
        timeout = bounded_timeout(self._timeout)
        request_id = current_request_id()
        if request_id:  # msal's correlation id is this request's id
            headers = {**(headers or {}), CLIENT_REQUEST_ID_HEADER: request_id}
        kwargs["headers"] = headers
        started = time.perf_counter()
        try:
            response = self._session.request(method, url, timeout=timeout, stream=True,
                                             allow_redirects=False, **kwargs)
            _read_body_by(response, _deadline.get())
        except (requests.RequestException, _TooSlow, urllib3.exceptions.HTTPError) as exc:
            log.error("token endpoint unreachable: %s", type(exc).__name__)
            if self._diagnosis is not None:  # an untrusted CA is named, once a minute
                self._diagnosis.failed(AUTHORITY, url, exc)
            if method == "POST":
                self._metrics.token_endpoint(grant, NO_ANSWER, started)
            self._unavailable(DEFAULT_RETRY_AFTER, OUTAGE_GATE_SECONDS)
        if method == "POST":
            self._metrics.token_endpoint(grant, response.status_code, started)
        if response.is_redirect:  # never followed: the form carries the API's credential
            log.error("token endpoint %s answered HTTP %d redirecting to %s; redirects are not "
                      "followed (check AZURE_AUTHORITY_HOST and any proxy in between)",
                      _origin(url), response.status_code, _origin(response.headers.get("Location", "")))
            self._unavailable(DEFAULT_RETRY_AFTER, OUTAGE_GATE_SECONDS)
        if response.status_code == 429:
            log.warning("token endpoint throttled this user (HTTP 429)")
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            self._unavailable(retry_after, retry_after)
        if response.status_code >= 500:
            log.warning("token endpoint answered HTTP %d", response.status_code)
            self._unavailable(retry_after_seconds(response.headers.get("Retry-After")), OUTAGE_GATE_SECONDS)
        if not _is_json_object(response):  # a proxy's HTML page, an empty body: msal would
            log.warning("token endpoint answered HTTP %d without JSON", response.status_code)
            self._unavailable(DEFAULT_RETRY_AFTER, OUTAGE_GATE_SECONDS)  # crash and log it
        diagnosis = self._diagnosis
        if diagnosis is not None:  # a wrong tenant, an unknown app, a rejected credential
            if response.status_code == 200 and method == "POST":
                diagnosis.clear(AUTHORITY, CREDENTIAL)
            else:
                diagnosis.answered(url, response)
        return response

    def _unavailable(self, retry_after: int, gate_seconds: float) -> NoReturn:
        """Fail this call; the user's next calls fail fast for ``gate_seconds``, so a
        queue of their requests cannot pile onto a struggling Entra ID."""
        self.blocked_until = max(self.blocked_until, time.monotonic() + gate_seconds)
        raise EntraUnavailable(retry_after=retry_after)

    def close(self) -> None:  # the session outlives this client
        return None


class _TooSlow(Exception):
    """The token endpoint's answer did not arrive whole by the request's deadline."""


def _read_body_by(response: requests.Response, deadline: Deadline | None) -> None:
    """Read the body, giving up at ``deadline``: a read timeout bounds each socket read,
    not the whole answer, so a server that trickles bytes would otherwise hold the
    request (and its seat in the waiting room) for as long as it likes."""
    chunks, size = [], 0
    try:
        while chunk := response.raw.read1(READ_CHUNK, decode_content=True):
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES or (deadline is not None and deadline.expired):
                raise _TooSlow()
            chunks.append(chunk)
    except BaseException:
        response.close()
        raise
    response._content = b"".join(chunks)  # as requests itself fills it when not streaming
    response._content_consumed = True
    response.raw.release_conn()


def _origin(url: str) -> str:
    """``scheme://host[:port]/path`` of ``url``, without its query: enough to name it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.netloc else "(no location)"


FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


def form_body(form: dict[str, Any], headers: Any) -> tuple[str, dict[str, Any]]:
    """msal's token request form, encoded as requests would encode it (``None`` values
    left out, a sequence sent as repeated fields), and its Content-Type.

    Encoded here because requests 2.34 checks a dict body against runtime ``Protocol``s
    (three checks of several microseconds apiece per token request); a string goes
    straight through."""
    body = urlencode([(name, value) for name, value in form.items() if value is not None], doseq=True)
    headers = dict(headers or {})
    if not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = FORM_CONTENT_TYPE
    return body, headers


def _grant_type(data: Any) -> str | None:
    """The ``grant_type`` of a token request's form (msal passes a dict)."""
    if isinstance(data, dict):
        value = data.get("grant_type")
        return value if isinstance(value, str) else None
    return None


def _is_json_object(response: requests.Response) -> bool:
    try:
        return isinstance(response.json(), dict)
    except ValueError:
        return False

