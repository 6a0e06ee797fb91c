"""The downstream API: Microsoft Graph over the process's pooled session.

Graph failures become API errors a caller can act on: a missing resource is 404, a
Graph outage 502, a Graph timeout 504, lasting throttling 503 with Retry-After. A 401
carrying a claims challenge (Continuous Access Evaluation) surfaces as
``GraphClaimsChallenge`` so the caller can fetch a fresh token with those claims.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from typing import Any

import requests

from .errors import ApiError, InsufficientClaims, ServiceUnavailable

log = logging.getLogger(__name__)

USER_FIELDS = "id,displayName,mail,userPrincipalName,jobTitle"
GRAPH_TIMEOUT = (3.05, 10)
_AUTH_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*"([^"]*)"')


class GraphNotFound(ApiError):
    """Graph answered 404 for the requested resource.

    An ``ApiError``, so every route answers it as a JSON 404 (never a 500) unless the route
    catches it to say more, as ``/api/me/manager`` does (``manager_not_found``).
    """

    status = 404
    error = "not_found"
    description = "Microsoft Graph has no such resource."


class GraphClaimsChallenge(Exception):
    """Graph wants a token carrying ``claims`` (a JSON object, decoded)."""

    def __init__(self, claims: str) -> None:
        super().__init__("claims challenge")
        self.claims = claims


class GraphError(ApiError):
    status = 502
    error = "graph_error"
    description = "Microsoft Graph failed to answer the request."


class GraphTimeout(ApiError):
    status = 504
    error = "graph_timeout"
    description = "Microsoft Graph did not answer in time."


class GraphClient:
    """GET JSON objects from Graph with a delegated access token."""

    def __init__(self, base_url: str, session: requests.Session) -> None:
        self._base_url = base_url.rstrip("/")
        self._session = session

    def get_user(self, path: str, access_token: str) -> dict[str, Any]:
        """``/me`` or ``/me/manager`` (any user object): exactly the standard fields."""
        body = self.get(path, access_token, params={"$select": USER_FIELDS})
        return {name: body.get(name) for name in USER_FIELDS.split(",")}

    def get(self, path: str, access_token: str, params: dict[str, str] | None = None
            ) -> dict[str, Any]:
        try:
            response = self._session.get(
                self._base_url + path,
                params=params,
                headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
                timeout=GRAPH_TIMEOUT,
            )
        except requests.Timeout:
            log.warning("graph %s timed out", path)
            raise GraphTimeout() from None
        except requests.RequestException as exc:
            log.warning("graph %s unreachable: %s", path, type(exc).__name__)
            raise GraphError() from None
        return self._json_or_raise(path, response)

    def _json_or_raise(self, path: str, response: requests.Response) -> dict[str, Any]:
        status = response.status_code
        if status == 200:
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict):
                return body
            log.warning("graph %s answered 200 without a JSON object", path)
            raise GraphError()
        log.warning("graph %s answered HTTP %d (request-id %s)", path, status,
                    response.headers.get("request-id"))
        if status == 404:
            raise GraphNotFound()  # the path is logged above, never echoed to the caller
        if status == 401:
            claims = claims_from_challenge(response.headers.get("WWW-Authenticate", ""))
            if claims:
                raise GraphClaimsChallenge(claims)
        if status in (429, 503):
            raise ServiceUnavailable("Microsoft Graph is throttling requests; retry later.",
                                     retry_after=_seconds(response.headers.get("Retry-After")))
        if status == 504:
            raise GraphTimeout()
        raise GraphError()


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


def _seconds(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 5
