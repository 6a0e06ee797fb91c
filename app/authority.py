"""What the API learns from its Entra ID authority: OpenID configuration and signing keys.

Both are fetched lazily (never at import or start-up), cached in the process, and
refreshed on a schedule. A failed refresh keeps the last good copy, because an
authority hiccup must not turn every valid token into a 401.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import requests
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

log = logging.getLogger(__name__)

METADATA_MAX_AGE = 24 * 3600
KEYS_MAX_AGE = 24 * 3600
UNKNOWN_KID_REFETCH_INTERVAL = 300
RETRY_FAILED_REFRESH_AFTER = 60
READINESS_TTL = 30
READINESS_FAILURE_TTL = 5
AUTHORITY_TIMEOUT = (3.05, 10)


class AuthorityUnavailable(Exception):
    """The authority could not be reached and nothing usable is cached."""


class OpenIdConfiguration:
    """The tenant's ``/.well-known/openid-configuration`` document, cached for 24 h.

    msal's construction also needs this document; serving it from here means building
    an msal application per request costs no network call.
    """

    def __init__(
        self,
        url: str,
        session: requests.Session,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._session = session
        self._clock = clock
        self._lock = threading.Lock()
        self._document: dict[str, Any] | None = None
        self._text = ""
        self._next_refresh = 0.0
        self._reachable_until = self._unreachable_until = float("-inf")

    def document(self) -> dict[str, Any]:
        self._refresh_if_due()
        assert self._document is not None
        return self._document

    def text(self) -> str:
        """The document exactly as served, for msal's tenant discovery."""
        self._refresh_if_due()
        return self._text

    def check(self) -> None:
        """Readiness: is the authority reachable? Raise ``AuthorityUnavailable`` if not.

        A success is trusted for 30 s and a failure for 5 s, so frequent probes (from
        anywhere: nginx passes /readyz through) neither hammer Entra ID nor pile up."""
        now = self._clock()
        if now < self._reachable_until:
            return
        if now < self._unreachable_until:
            raise AuthorityUnavailable("still unreachable")
        try:
            _fetch_json(self._session, self.url)
        except AuthorityUnavailable:
            self._unreachable_until = self._clock() + READINESS_FAILURE_TTL
            raise
        self._reachable_until = self._clock() + READINESS_TTL

    def _refresh_if_due(self) -> None:
        if self._document is not None and self._clock() < self._next_refresh:
            return
        with _refresh_lock(self._lock, have_cached=self._document is not None) as refreshing:
            if not refreshing or (self._document is not None and self._clock() < self._next_refresh):
                return
            try:
                document, text = _fetch_json(self._session, self.url)
                if not isinstance(document.get("jwks_uri"), str):
                    raise AuthorityUnavailable("openid-configuration has no jwks_uri")
            except AuthorityUnavailable:
                if self._document is None:
                    raise
                log.warning("openid-configuration refresh failed; keeping the cached copy")
                self._next_refresh = self._clock() + RETRY_FAILED_REFRESH_AFTER
                return
            self._document, self._text = document, text
            self._next_refresh = self._clock() + METADATA_MAX_AGE


class SigningKeys:
    """The authority's JWKS, keyed by ``kid``.

    An unknown ``kid`` (Entra rolled its keys) triggers one refetch, at most once per
    five minutes, so a flood of forged ``kid`` values cannot hammer the authority.
    """

    def __init__(
        self,
        metadata: OpenIdConfiguration,
        session: requests.Session,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metadata = metadata
        self._session = session
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, RSAKey] | None = None
        self._next_refresh = 0.0
        self._last_unknown_kid_fetch = float("-inf")

    def get(self, kid: str) -> RSAKey | None:
        """The RSA key for ``kid``, or None when the authority does not publish it."""
        keys = self._keys
        just_fetched = keys is None or self._clock() >= self._next_refresh
        if just_fetched:
            keys = self._refresh(scheduled=True)
        key = keys.get(kid)
        if (key is None and not just_fetched
                and self._clock() - self._last_unknown_kid_fetch >= UNKNOWN_KID_REFETCH_INTERVAL):
            keys = self._refresh(scheduled=False)
            key = keys.get(kid)
        return key

    def _refresh(self, scheduled: bool) -> dict[str, RSAKey]:
        with _refresh_lock(self._lock, have_cached=self._keys is not None) as refreshing:
            if not refreshing:
                assert self._keys is not None
                return self._keys
            now = self._clock()
            if self._keys is not None:
                already_done = (
                    now < self._next_refresh
                    if scheduled
                    else now - self._last_unknown_kid_fetch < UNKNOWN_KID_REFETCH_INTERVAL
                )
                if already_done:  # another thread refreshed while we waited
                    return self._keys
            if not scheduled:
                self._last_unknown_kid_fetch = now
            try:
                jwks, _ = _fetch_json(self._session, self._metadata.document()["jwks_uri"])
                keys = _rsa_signing_keys(jwks)
            except AuthorityUnavailable:
                if self._keys is None:
                    raise
                log.warning("signing-key refresh failed; keeping %d cached keys", len(self._keys))
                self._next_refresh = now + RETRY_FAILED_REFRESH_AFTER
                return self._keys
            self._keys = keys
            self._next_refresh = now + KEYS_MAX_AGE
            log.info("loaded %d signing keys from the authority", len(keys))
            return keys


@contextmanager
def _refresh_lock(lock: threading.Lock, have_cached: bool) -> Iterator[bool]:
    """Yield whether this thread should refresh. With a cached copy in hand, threads do
    not queue behind a refresh in progress (it may take a slow authority's timeouts):
    they go on with the cached copy."""
    if not lock.acquire(blocking=not have_cached):
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _rsa_signing_keys(jwks: dict[str, Any]) -> dict[str, RSAKey]:
    entries = jwks.get("keys")
    if not isinstance(entries, list):
        raise AuthorityUnavailable("JWKS has no keys array")
    keys: dict[str, RSAKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") != "RSA" or entry.get("use", "sig") != "sig":
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str):
            continue
        try:
            keys[kid] = RSAKey.import_key({k: v for k, v in entry.items() if k in {"kty", "n", "e", "kid"}})
        except (JoseError, ValueError, TypeError):
            log.warning("skipping an unreadable key in the JWKS")
    if not keys:
        raise AuthorityUnavailable("JWKS holds no RSA signing keys")
    return keys


def _fetch_json(session: requests.Session, url: str) -> tuple[dict[str, Any], str]:
    try:
        response = session.get(url, timeout=AUTHORITY_TIMEOUT)
    except requests.RequestException as exc:
        raise AuthorityUnavailable(f"{url}: {type(exc).__name__}") from None
    if response.status_code != 200:
        raise AuthorityUnavailable(f"{url}: HTTP {response.status_code}")
    try:
        document = response.json()
    except ValueError:
        raise AuthorityUnavailable(f"{url}: not JSON") from None
    if not isinstance(document, dict):
        raise AuthorityUnavailable(f"{url}: not a JSON object")
    return document, response.text

