"""msal's HTTP client: the process's pooled session, our timeouts, the cached OpenID
configuration (so building an msal application costs no request), a per-user
Retry-After gate, and an offline mode for the lock-free first look at the cache."""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

import requests

from .authority import AUTHORITY_TIMEOUT, OpenIdConfiguration

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER = 5
MAX_RETRY_AFTER = 300
OUTAGE_GATE_SECONDS = 2  # after a 5xx, timeout or garbage answer: brief, not per Retry-After


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


class _CachedResponse:
    def __init__(self, text: str) -> None:
        self.status_code, self.text, self.headers = 200, text, {}

    def raise_for_status(self) -> None:
        return None


class MsalHttpClient:
    """One user's view of the network for msal.

    A 429, 5xx, timeout or non-JSON answer from the token endpoint raises
    ``EntraUnavailable`` with a Retry-After instead of reaching msal, whose throttling
    store is shared by all users of an application, and closes this user's gate: until
    Retry-After passes after a 429, for two seconds after the others.
    """

    def __init__(self, session: requests.Session, metadata: OpenIdConfiguration) -> None:
        self._session, self._metadata = session, metadata
        self.offline = False
        self.blocked_until = 0.0

    def get(self, url: str, params: Any = None, headers: Any = None, **_: Any) -> Any:
        if not params and url.lower() == self._metadata.url.lower():
            return _CachedResponse(self._metadata.text())
        if self.offline:
            raise NetworkNeeded()
        return self._send("GET", url, params=params, headers=headers)

    def post(self, url: str, params: Any = None, data: Any = None, headers: Any = None,
             **_: Any) -> Any:
        if self.offline:
            raise NetworkNeeded()
        wait = self.blocked_until - time.monotonic()
        if wait > 0:
            raise EntraUnavailable(retry_after=int(wait) + 1)
        return self._send("POST", url, params=params, data=data, headers=headers)

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            response = self._session.request(method, url, timeout=AUTHORITY_TIMEOUT, **kwargs)
        except requests.RequestException as exc:
            log.error("token endpoint unreachable: %s", type(exc).__name__)
            self._unavailable(DEFAULT_RETRY_AFTER, OUTAGE_GATE_SECONDS)
        if response.status_code == 429:
            log.warning("token endpoint throttled this user (HTTP 429)")
            retry_after = _retry_after(response.headers.get("Retry-After"))
            self._unavailable(retry_after, retry_after)
        if response.status_code >= 500:
            log.warning("token endpoint answered HTTP %d", response.status_code)
            self._unavailable(_retry_after(response.headers.get("Retry-After")), OUTAGE_GATE_SECONDS)
        if not _is_json_object(response):  # a proxy's HTML page, an empty body: msal would
            log.warning("token endpoint answered HTTP %d without JSON", response.status_code)
            self._unavailable(DEFAULT_RETRY_AFTER, OUTAGE_GATE_SECONDS)  # crash and log it
        return response

    def _unavailable(self, retry_after: int, gate_seconds: float) -> NoReturn:
        """Fail this call; the user's next calls fail fast for ``gate_seconds``, so a
        queue of their requests cannot pile onto a struggling Entra ID."""
        self.blocked_until = max(self.blocked_until, time.monotonic() + gate_seconds)
        raise EntraUnavailable(retry_after=retry_after)

    def close(self) -> None:  # the session outlives this client
        return None


def _is_json_object(response: requests.Response) -> bool:
    try:
        return isinstance(response.json(), dict)
    except ValueError:
        return False


def _retry_after(value: str | None) -> int:
    try:
        seconds = int(value) if value is not None else DEFAULT_RETRY_AFTER
    except ValueError:
        seconds = DEFAULT_RETRY_AFTER
    return min(max(seconds, 1), MAX_RETRY_AFTER)
