"""The process's one HTTP session: pooled connections for Entra ID and the downstream APIs,
with the outbound environment read once.

Downstream calls get urllib3's Retry (429/503/504, honouring a capped Retry-After); token
requests get none, because msal and ``token_acquisition`` decide what a failed token
request means.

**The environment is read once.** A plain ``requests.Session`` reads the proxy variables,
``NO_PROXY``, ``~/.netrc`` and ``REQUESTS_CA_BUNDLE`` again on every request
(``merge_environment_settings``, ``get_netrc_auth``): about a quarter of a warm request's
time in a profile. ``ResolvedSession`` takes the CA bundle (``REQUESTS_CA_BUNDLE``, else
``CURL_CA_BUNDLE``) when it is built, and each origin's proxy (``HTTPS_PROXY``,
``HTTP_PROXY``, ``ALL_PROXY``, less ``NO_PROXY``) and ``.netrc`` credentials the first time
it talks to that origin, with requests' own functions, so they mean what they mean to
requests. ``build_session`` resolves the authority's and the downstream APIs' origins at
once, so for them everything is read at start-up: change these variables, then restart.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable
from http.cookiejar import DefaultCookiePolicy
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.sessions import merge_setting
from requests.utils import get_environ_proxies, get_netrc_auth
from urllib3.exceptions import InvalidHeader
from urllib3.util import Retry

POOL_SIZE = 32
DOWNSTREAM_RETRIES = Retry(
    total=3,
    connect=2,
    read=False,  # a read timeout surfaces as such (→ 504), not as a retry storm
    status=3,
    status_forcelist=(429, 503, 504),
    allowed_methods=frozenset({"GET"}),
    backoff_factor=0.2,
    backoff_max=2.0,
    respect_retry_after_header=True,
    retry_after_max=5,
    raise_on_status=False,
)
#: What a 503 asks clients to wait when the dependency said nothing usable, and at most.
DEFAULT_RETRY_AFTER = 5
MAX_RETRY_AFTER = 300
_RETRY_AFTER = Retry(retry_after_max=MAX_RETRY_AFTER)  # parses the header, caps it


def retry_after_seconds(value: str | None) -> int:
    """The whole seconds a ``Retry-After`` header asks to wait (RFC 9110: delta-seconds or
    an HTTP-date), from 1 to ``MAX_RETRY_AFTER``; ``DEFAULT_RETRY_AFTER`` when it is absent
    or unreadable. The one reading of the header for Entra ID's and downstream APIs'
    answers; urllib3 parses both forms (as its own retries do), this bounds the result."""
    if value is None or not value.strip():
        return DEFAULT_RETRY_AFTER
    try:
        seconds = _RETRY_AFTER.parse_retry_after(value.strip())
    except (InvalidHeader, OverflowError, ValueError):
        return DEFAULT_RETRY_AFTER
    return min(max(math.ceil(seconds), 1), MAX_RETRY_AFTER)


#: Origins whose settings are kept; past that (origins a downstream API's redirects or an
#: application's own calls named), each is read per request, as requests does, rather than
#: kept forever.
MAX_ORIGINS_KEPT = 256


class OriginSettings(NamedTuple):
    """What the environment says about one origin: its proxies and ``.netrc`` login."""

    proxies: dict[str, str]
    auth: tuple[str, str] | None


class ResolvedSession(requests.Session):
    """A ``requests.Session`` that reads the outbound environment once (see the module's
    docstring) instead of on every request, with the same meaning as requests gives it.

    requests' own per-request reading is switched off (``trust_env``); in its place the CA
    bundle is read here and each origin's settings on first use, then kept. A caller's
    explicit ``proxies``, ``auth`` or ``verify`` still wins, as with requests (one
    difference: an explicit ``verify=True`` means the default CA store here, where requests
    would swap in ``REQUESTS_CA_BUNDLE``). A redirect to another origin takes that origin's
    settings, as requests does."""

    def __init__(self) -> None:
        super().__init__()
        self.trust_env = False
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        self.verify = bundle or True
        self._origins: dict[str, OriginSettings] = {}
        self._lock = threading.Lock()

    def resolve(self, url: str) -> OriginSettings:
        """``url``'s origin settings, read from the environment the first time only."""
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}".lower()
        found = self._origins.get(origin)
        if found is None:
            with self._lock:  # one reading per origin, whichever thread gets there first
                found = self._origins.get(origin)
                if found is None:
                    found = OriginSettings(dict(get_environ_proxies(url)), get_netrc_auth(url))
                    if len(self._origins) < MAX_ORIGINS_KEPT:
                        self._origins[origin] = found
        return found

    def request(self, method: str, url: str | bytes,
                *args: Any, **kwargs: Any) -> requests.Response:
        """``Session.request`` with the origin's proxies and ``.netrc`` login from
        ``resolve`` (the signature is requests', spelled loosely: kwargs pass through)."""
        origin = self.resolve(url.decode() if isinstance(url, bytes) else url)
        if kwargs.get("proxies") is None and origin.proxies:
            kwargs["proxies"] = origin.proxies
        if kwargs.get("auth") is None and self.auth is None and origin.auth is not None:
            kwargs["auth"] = origin.auth
        return super().request(method, url, *args, **kwargs)

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> dict[str, Any]:
        """requests' merge of a call's settings with the session's (the environment is not
        read here: ``trust_env`` is off), taking a short cut where no proxy is involved on
        either side: requests merges two empty mappings on every call otherwise, checking
        each against a runtime ``Protocol`` (several microseconds apiece in requests 2.34)."""
        if self.trust_env or proxies or self.proxies:
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        return {"proxies": {}, "stream": merge_setting(stream, self.stream),
                "verify": merge_setting(verify, self.verify), "cert": merge_setting(cert, self.cert)}

    # A redirect to another origin takes that origin's settings, as with requests: with
    # ``trust_env`` off, requests would keep the first origin's proxies (so a redirect from
    # a NO_PROXY API to, say, a file's download host would try to go direct) and skip
    # ``.netrc``.
    def rebuild_proxies(self, prepared_request: Any, proxies: Any) -> dict[str, str]:
        merged = dict(proxies or {})
        for scheme, proxy in self.resolve(prepared_request.url).proxies.items():
            merged.setdefault(scheme, proxy)
        return super().rebuild_proxies(prepared_request, merged)

    def rebuild_auth(self, prepared_request: Any, response: Any) -> None:
        super().rebuild_auth(prepared_request, response)
        login = self.resolve(prepared_request.url).auth
        if login is not None:
            prepared_request.prepare_auth(login)


def build_session(downstream_base_urls: Iterable[str], other_urls: Iterable[str] = ()) -> ResolvedSession:
    """The session for Entra ID (``other_urls``: the authority) and the downstream APIs,
    whose origins' settings are read now, at start-up."""
    session = ResolvedSession()
    session.headers["User-Agent"] = "flask-obo"
    # One session serves every user: a cookie one user's downstream answer set (a session
    # cookie, a load balancer's) must never ride along on another user's requests.
    cookies: Any = session.cookies
    cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    plain = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE, max_retries=0)
    session.mount("https://", plain)
    session.mount("http://", plain)
    downstream_base_urls = list(downstream_base_urls)
    for base_url in downstream_base_urls:
        downstream = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE,
                                 max_retries=DOWNSTREAM_RETRIES)
        session.mount(base_url.rstrip("/") + "/", downstream)
    for url in (*downstream_base_urls, *other_urls):
        session.resolve(url)
    return session


