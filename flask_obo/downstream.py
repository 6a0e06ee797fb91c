"""Downstream APIs: an HTTP client per configured API, calling it as the signed-in user.

``DownstreamApi`` holds the API's base URL and the scopes its tokens need, and sends
over the process's pooled session (``flask_obo.http``: urllib3 retries idempotent
requests on 429/503/504, honouring a capped Retry-After). Each request gets a token on
behalf of the caller from the token provider, so every downstream API of a user is
served from that user's one cache entry. What the API answers becomes something a
caller can act on:

* 2xx and 3xx: the ``requests.Response``, for the route to read;
* a 401 carrying a claims challenge (Continuous Access Evaluation, Conditional Access):
  one retry with a token fetched for those claims; if still challenged, the SPA must act
  (``InsufficientClaims``, 401, with the claims in ``WWW-Authenticate``);
* 404: ``DownstreamNotFound`` (a JSON 404 on every route);
* still throttled (429/503) after the retries: ``DownstreamThrottled`` (503 with
  Retry-After); a timeout: ``DownstreamTimeout`` (504); anything else:
  ``DownstreamError`` (502).
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import logging
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import requests

from .errors import (
    DownstreamError,
    DownstreamNotFound,
    DownstreamThrottled,
    DownstreamTimeout,
    InsufficientClaims,
    UnsafeDownstreamPath,
)
from .http import retry_after_seconds
from .metrics import NO_ANSWER, Metrics
from .request_ids import CLIENT_REQUEST_ID_HEADER, current_request_id
from .settings import DownstreamApiSettings

log = logging.getLogger(__name__)

_AUTH_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*"([^"]*)"')

#: ``(scopes, claims_challenge) -> access token`` for the caller of the current request.
TokenSource = Callable[[Sequence[str], "str | None"], str]


class DownstreamApi:
    """A downstream API called on behalf of the current request's user.

    Each HTTP request it sends (a claims-challenge retry too) counts in
    ``flask_obo_downstream_requests_total{api=<name>, status}`` and
    ``flask_obo_downstream_seconds``; urllib3's own retries of it are part of that one.
    """

    def __init__(self, name: str, settings: DownstreamApiSettings, session: requests.Session,
                 tokens: TokenSource, metrics: Metrics | None = None) -> None:
        self.name = name
        self.base_url = settings.base_url.rstrip("/")
        self.scopes = settings.scopes
        self.timeout = settings.timeout  # (connect, read) of one attempt, unless a call gives its own
        self._session = session
        self._tokens = tokens
        self._metrics = metrics or Metrics()

    def with_tokens(self, tokens: TokenSource) -> DownstreamApi:
        """This API, called with tokens from ``tokens`` instead (a background job's user)."""
        other = copy.copy(self)
        other._tokens = tokens
        return other

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send ``method path`` (relative to the base URL) as the user; ``kwargs`` go to
        ``requests`` (``params``, ``json``, ``headers``, ``timeout``...)."""
        if not path.startswith("/") or "://" in path or _escapes(path):
            log.warning("%s %s refused: the path could leave the API's base URL", self.name, method)
            raise UnsafeDownstreamPath()
        response = self._send(method, path, self._tokens(self.scopes, None), kwargs)
        claims = _claims_challenge(response)
        if claims is not None:
            response = self._send(method, path, self._tokens(self.scopes, claims), kwargs)
            claims = _claims_challenge(response)
            if claims is not None:  # still challenged: only the user, signing in again, can help
                raise InsufficientClaims(claims)
        return self._checked(method, path, response)

    def _send(self, method: str, path: str, token: str, kwargs: dict[str, Any]) -> requests.Response:
        headers = {"Accept": "application/json", **(kwargs.get("headers") or {}),
                   "Authorization": f"Bearer {token}"}
        request_id = current_request_id()
        if request_id:  # the id Graph logs for this call, so one id follows the request
            headers[CLIENT_REQUEST_ID_HEADER] = request_id
        started = time.perf_counter()
        try:
            response = self._session.request(
                method, self.base_url + path,
                **{"timeout": self.timeout, **kwargs, "headers": headers},
            )
        except requests.Timeout:
            self._metrics.downstream(self.name, NO_ANSWER, started)
            log.warning("%s %s %s timed out", self.name, method, _path(path))
            raise DownstreamTimeout() from None
        except requests.RequestException as exc:
            self._metrics.downstream(self.name, NO_ANSWER, started)
            log.warning("%s %s %s unreachable: %s", self.name, method, _path(path), type(exc).__name__)
            raise DownstreamError() from None
        self._metrics.downstream(self.name, response.status_code, started)
        return response

    def _checked(self, method: str, path: str, response: requests.Response) -> requests.Response:
        status = response.status_code
        if status < 400:
            return response
        log.warning("%s %s %s answered HTTP %d (request-id %s)", self.name, method, _path(path),
                    status, response.headers.get("request-id"))
        if status == 404:
            raise DownstreamNotFound()  # the path is logged above, never echoed to the caller
        if status in (429, 503):
            raise DownstreamThrottled(retry_after=retry_after_seconds(response.headers.get("Retry-After")))
        if status == 504:
            raise DownstreamTimeout()
        raise DownstreamError()


def _claims_challenge(response: requests.Response) -> str | None:
    if response.status_code != 401:
        return None
    return claims_from_challenge(response.headers.get("WWW-Authenticate", ""))


def claims_from_challenge(header: str) -> str | None:
    """The decoded ``claims`` of an ``insufficient_claims`` Bearer challenge, if any."""
    params = dict(_AUTH_PARAM.findall(header))
    if params.get("error") != "insufficient_claims" or "claims" not in params:
        return None
    encoded = params["claims"].replace("-", "+").replace("_", "/")  # either alphabet
    try:
        claims = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return claims if InsufficientClaims.is_claims_json(claims) else None


#: How many rounds of percent-decoding a path may need before it is plain; more is refused.
_DECODING_ROUNDS = 3
_IIS_UNICODE_ESCAPE = re.compile(r"%u[0-9a-f]{4}", re.IGNORECASE)


def _escapes(path: str) -> bool:
    """Could a server resolve ``path`` out of the base URL's path? The user's token would go
    along. Refused: a ``.`` or ``..`` segment, however often percent-encoded (``%2e``,
    ``%252e``: a proxy or framework in front of the API may decode twice); a backslash
    (IIS and some proxies read it as ``/``); a ``;`` (path parameters: Tomcat and Spring
    resolve ``..;/`` as ``../``); a control character. A path still encoded after a few
    rounds of decoding is refused too, rather than guessed about.

    The query and fragment are cut off by hand, not with ``urlsplit``: that would read a
    path starting ``//`` as a host (``//%2e%2e/admin`` would hide its ``..`` from these
    checks, and urllib3 sends it as ``…//../admin``, which nginx's slash merging resolves
    out of the base path) and silently drops tabs and newlines."""
    return _path_escapes(path.partition("#")[0].partition("?")[0])


#: Paths whose verdict is kept: the answer depends on the path alone, and an API's routes
#: call a handful of paths (a per-user id in them makes more) again and again.
_PATHS_KEPT = 1024


@functools.lru_cache(maxsize=_PATHS_KEPT)
def _path_escapes(plain: str) -> bool:
    """``_escapes`` for a path without its query and fragment. Kept per path: the decoding
    rounds and the Unicode normalisation (about 10 µs) would otherwise run on every call."""
    for _ in range(_DECODING_ROUNDS):
        try:  # not UTF-8 (an overlong %c0%ae is a "." to some old servers): refused
            decoded = unquote(plain, errors="strict")
        except UnicodeDecodeError:
            return True
        if decoded == plain:
            break
        plain = decoded
    else:
        return True
    if "\\" in plain or ";" in plain or any(ord(c) < 0x20 or ord(c) == 0x7F for c in plain):
        return True
    if _IIS_UNICODE_ESCAPE.search(plain):  # IIS decodes %u002e as "."
        return True
    # NFKC: a server that normalises Unicode reads U+FF0E (fullwidth) as "." and U+2025 as "..".
    return any(unicodedata.normalize("NFKC", segment) in (".", "..") for segment in plain.split("/"))


def _path(path: str) -> str:
    """The path without its query, for logs: a query may carry a user's data."""
    return urlsplit(path).path

