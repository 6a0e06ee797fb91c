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

**Nor is the file system looked at per request.** requests' ``HTTPAdapter`` checks on every
request that the CA bundle exists and whether it is a file or a directory (three
``stat`` calls); ``ResolvedAdapter`` knows that from start-up. And the session takes no
cookies (one session serves every user), so it does not parse answers for them either.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Mapping
from http.cookiejar import DefaultCookiePolicy
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.cookies import RequestsCookieJar
from requests.sessions import merge_setting
from requests.utils import DEFAULT_CA_BUNDLE_PATH, get_environ_proxies, get_netrc_auth
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


#: How requests hands a CA path to urllib3, by what the path is: a bundle file or a
#: directory of hashed certificates (``c_rehash``).
CA_FILE, CA_DIRECTORY = "ca_certs", "ca_cert_dir"


def ca_path_kinds(*paths: str | bool) -> dict[str, str]:
    """``CA_FILE`` or ``CA_DIRECTORY`` for each of ``paths`` that exists now, as requests
    would tell on each request (a directory if ``os.path.isdir``, else a file); ``True``
    stands for requests' default bundle (certifi's). A path missing now is left out: for
    it requests' own checks run, and raise its usual ``OSError``."""
    kinds: dict[str, str] = {}
    for path in paths:
        path = DEFAULT_CA_BUNDLE_PATH if path is True else path
        if isinstance(path, str) and path and os.path.exists(path):
            kinds[path] = CA_DIRECTORY if os.path.isdir(path) else CA_FILE
    return kinds


class ResolvedAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` that knows what its CA paths are (``ca_path_kinds``, at start-up)
    instead of asking the file system on every request, as requests does in
    ``cert_verify`` and ``build_connection_pool_key_attributes``: about 15 µs a request.

    Both are requests' documented hooks for subclasses. Each calls requests' own code for
    everything but the CA path: with ``verify=False`` to build the pool key (the one
    value that makes requests add neither a CA path nor, in some 2.32 releases, its
    preloaded SSL context), then sets what requests would have set for a string
    ``verify``. A path not known here (a call's own ``verify``, a client certificate, a
    path missing at start-up) takes requests' way unchanged. A bundle replaced in place
    is read as before (urllib3 loads it for each new connection); one deleted while
    running fails new connections with urllib3's error instead of requests'."""

    __attrs__ = [*HTTPAdapter.__attrs__, "ca_kinds"]  # kept when pickled, as requests' own

    def __init__(self, ca_kinds: Mapping[str, str], **kwargs: Any) -> None:
        self.ca_kinds = dict(ca_kinds)
        super().__init__(**kwargs)

    def _known(self, verify: Any) -> tuple[str, str] | None:
        path = DEFAULT_CA_BUNDLE_PATH if verify is True else verify
        kind = self.ca_kinds.get(path) if isinstance(path, str) else None
        return None if kind is None else (path, kind)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        known = self._known(verify)
        if known is None or cert or url[:5].lower() != "https":
            super().cert_verify(conn, url, verify, cert)
            return
        path, kind = known
        conn.cert_reqs = "CERT_REQUIRED"
        setattr(conn, kind, path)

    def build_connection_pool_key_attributes(self, request: Any, verify: Any,
                                             cert: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        known = self._known(verify) if isinstance(verify, str) else None
        if known is None:  # True needs no look at the disk (requests' default context)
            return super().build_connection_pool_key_attributes(request, verify, cert)
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, False, cert)
        path, kind = known
        pool_kwargs["cert_reqs"] = "CERT_REQUIRED"
        pool_kwargs[kind] = path
        return host_params, pool_kwargs


class RefusingCookieJar(RequestsCookieJar):
    """The session's jar: it takes no cookie from any answer. One session serves every
    user, so a cookie one user's downstream answer set (a session cookie, a load
    balancer's) must never ride along on another user's requests.

    ``DefaultCookiePolicy(allowed_domains=[])`` alone refuses them too, but only after
    ``http.cookiejar`` has parsed every answer's headers for cookies (about 4 µs a
    request). ``extract_cookies`` is the jar's documented entry point for that (requests
    calls it through ``extract_cookies_to_jar``), so it is the one overridden; the policy
    stays, for cookies offered any other way (``set_cookie_if_ok``). requests' own
    per-call cookie merging (an empty jar into a fresh one) cannot be skipped without
    re-writing ``Session.prepare_request``, and each ``Response.cookies`` is still filled,
    as callers may read it: both are left as they are."""

    def __init__(self) -> None:
        super().__init__(DefaultCookiePolicy(allowed_domains=[]))

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


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
        self.ca_kinds = ca_path_kinds(self.verify, True)
        self.cookies = RefusingCookieJar()
        self.mount_adapter("https://", max_retries=0)
        self.mount_adapter("http://", max_retries=0)
        self._origins: dict[str, OriginSettings] = {}
        self._lock = threading.Lock()

    def mount_adapter(self, prefix: str, **kwargs: Any) -> ResolvedAdapter:
        """A ``ResolvedAdapter`` knowing this session's CA paths, mounted for ``prefix``;
        ``kwargs`` go to ``HTTPAdapter`` (``pool_maxsize``, ``max_retries``...)."""
        adapter = ResolvedAdapter(self.ca_kinds, **kwargs)
        self.mount(prefix, adapter)
        return adapter

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
    session = ResolvedSession()  # it takes no cookies: see RefusingCookieJar
    session.headers["User-Agent"] = "flask-obo"
    plain = session.mount_adapter("https://", pool_connections=4, pool_maxsize=POOL_SIZE,
                                  max_retries=0)
    session.mount("http://", plain)
    downstream_base_urls = list(downstream_base_urls)
    for base_url in downstream_base_urls:
        session.mount_adapter(base_url.rstrip("/") + "/", pool_connections=4,
                              pool_maxsize=POOL_SIZE, max_retries=DOWNSTREAM_RETRIES)
    for url in (*downstream_base_urls, *other_urls):
        session.resolve(url)
    return session


