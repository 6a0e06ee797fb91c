"""The process's one ``requests.Session``: pooled connections for Entra ID and the
downstream APIs.

Downstream calls get urllib3's Retry (429/503/504, honouring a capped Retry-After); token
requests get none, because msal and ``token_acquisition`` decide what a failed token
request means. The session never sets ``verify``: requests lets ``REQUESTS_CA_BUNDLE``
override it anyway, so that variable is the one place to trust a private CA.
"""

from __future__ import annotations

from collections.abc import Iterable
from http.cookiejar import DefaultCookiePolicy

import requests
from requests.adapters import HTTPAdapter
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


def build_session(downstream_base_urls: Iterable[str]) -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = "flask-obo"
    # One session serves every user: a cookie one user's downstream answer set (a session
    # cookie, a load balancer's) must never ride along on another user's requests.
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    plain = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE, max_retries=0)
    session.mount("https://", plain)
    session.mount("http://", plain)
    for base_url in downstream_base_urls:
        downstream = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE,
                                 max_retries=DOWNSTREAM_RETRIES)
        session.mount(base_url.rstrip("/") + "/", downstream)
    return session
