"""The dev tenant with thousands of synthetic users, served with keep-alive, for the
serving benchmark:

    BENCH_DEVTENANT_USERS=4000 BENCH_DEVTENANT_STATE=DIR BENCH_DEVTENANT_URL=https://localhost:PORT \
        gunicorn -k gthread --certfile DIR/server.pem --keyfile DIR/server-key.pem \
        -b 127.0.0.1:PORT 'bench.devtenant_users:wsgi_app()'

The directory gets ``BENCH_DEVTENANT_USERS`` more users: ``bench0000``, ``bench0001``, …
(object ids are uuid5 of the name, so the minting process and the server agree without
talking). ``devtenant/`` itself is unchanged: ``install`` extends the directory's JSON in the
process that calls it, and indexes ``Directory.user`` (the shipped one scans the user list,
building a set per user: harmless for six users, but with 4,000 every Graph call and OBO
grant would cost a scan, and the benchmark would measure that instead of the API).

Why gunicorn rather than ``python -m devtenant serve``: werkzeug's server answers every
request with ``Connection: close``, so each Graph call would open a new TLS connection,
and with ``REQUESTS_CA_BUNDLE`` set urllib3 builds a new SSL context loading the bundle for
each one (tens of ms of CPU in the API, OpenSSL 3). Graph keeps connections alive; the
stand-in has to as well, or the benchmark measures TLS set-up instead of the API.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from flask import Flask

from devtenant import TENANT_DOMAIN
from devtenant import directory as directory_module
from devtenant.directory import Directory, User

_NAMESPACE = uuid.UUID("0b6f1e6c-3f1d-4b7e-9a55-6d1b2c3e4f50")


def short_name(index: int) -> str:
    return f"bench{index:04d}"


def synthetic_user(index: int) -> dict[str, Any]:
    """A directory entry shaped like the shipped ones (same Graph properties)."""
    short = short_name(index)
    upn = f"{short}@{TENANT_DOMAIN}"
    return {
        "short": short,
        "id": str(uuid.uuid5(_NAMESPACE, short)),
        "displayName": f"Bench User {index:04d}",
        "givenName": "Bench",
        "surname": f"User {index:04d}",
        "userPrincipalName": upn,
        "mail": upn,
        "jobTitle": "Load Tester",
        "officeLocation": f"{index % 40}/{1000 + index}",
        "businessPhones": [f"+1 425 555 {index % 10000:04d}"],
        "mobilePhone": None,
        "preferredLanguage": "en-US",
        "manager": "nestor",
        "flags": [],
    }


def install(users: int) -> None:
    """Make the home tenant's directory in this process hold ``users`` more synthetic users
    (its JSON as read by ``Directory.load`` and ``Directory.load_all``), and index lookups."""
    shipped = directory_module._read_json

    def read_json() -> dict[str, Any]:
        data = shipped()
        data["users"] = data["users"] + [synthetic_user(i) for i in range(users)]
        return data

    def user(self: Directory, ref: str) -> User | None:
        index = self.__dict__.get("_bench_index")
        if index is None:
            index = {}
            for candidate in self.users:  # the shipped lookup's keys, first match wins
                for key in (candidate.short, candidate.upn.lower(), candidate.oid):
                    index.setdefault(key, candidate)
            self.__dict__["_bench_index"] = index
        return index.get(ref.strip().lower())

    directory_module._read_json = read_json
    Directory.user = user  # type: ignore[method-assign]


def wsgi_app() -> Flask:
    """The dev tenant's Flask app (gunicorn's factory), settings from the environment."""
    install(int(os.environ["BENCH_DEVTENANT_USERS"]))
    from devtenant.server import create_app

    return create_app(os.environ["BENCH_DEVTENANT_STATE"], public_url=os.environ["BENCH_DEVTENANT_URL"])
