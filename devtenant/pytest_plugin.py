"""pytest plugin of ``flask-obo-devtenant``: an offline Entra ID + Microsoft Graph for your API's tests.

Installed with the distribution (its ``pytest11`` entry point), nothing to import. Fixtures:

``devtenant_server`` (session)
    The dev tenant, served once per test session over HTTPS on a free loopback port
    (:class:`devtenant.testing.DevTenantServer`).
``devtenant``
    The same server with its counters reset for this test, so ``devtenant.token_calls()``
    counts this test's calls to the token endpoint alone.
``devtenant_settings``
    The settings that point an API at it, a mapping for ``FlaskOBO.init_app(app,
    settings=...)`` (or ``app.config.update``), with this test's own authority cache
    directory. Sets ``REQUESTS_CA_BUNDLE`` in the environment for the test: flask-obo reads
    it there when ``init_app`` builds its HTTP session.
``devtenant_env``
    The same settings put in the environment for the test (an app that reads its settings
    from the environment, ``FlaskOBO(app)``).
``devtenant_redis`` (session)
    The URL of a throw-away ``redis-server`` (skipped when it is not installed, a failure
    under ``CI=true``); ``devtenant.settings(redis_url=devtenant_redis)`` adds a sealed token
    cache in it.
``user_token``, ``app_token``, ``spa_sign_in``
    Mint an access token for the API as the SPA gets it (``user_token("adele")``, options
    ``scopes``, ``mfa``, ``expired``, ``v1``, ``tenant``), an app-only token (``app_token()``,
    ``roles``), or sign a user in as the SPA does, code + PKCE (``spa_sign_in("adele")``: the
    token endpoint's answer).

The directory's users (adele, nestor, patti, alex, lynne; megan in a second tenant) and
apps are in ``devtenant/directory.json``; ``python -m devtenant --help`` lists the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from devtenant.testing import DevTenantServer, redis_server, redis_server_binary


@pytest.fixture(scope="session")
def devtenant_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTenantServer]:
    with DevTenantServer.start(tmp_path_factory.mktemp("devtenant")) as server:
        yield server


@pytest.fixture
def devtenant(devtenant_server: DevTenantServer) -> DevTenantServer:
    devtenant_server.reset_counters()
    return devtenant_server


@pytest.fixture
def devtenant_settings(devtenant_server: DevTenantServer, tmp_path_factory: pytest.TempPathFactory,
                       monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    # This test's own disk copies of the authority's documents: another session's dev tenant
    # on the same port had other keys.
    settings = devtenant_server.settings(authority_cache_dir=tmp_path_factory.mktemp("authority"))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", settings["REQUESTS_CA_BUNDLE"])
    return settings


@pytest.fixture
def devtenant_env(devtenant_settings: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in devtenant_settings.items():
        monkeypatch.setenv(name, value)
    return devtenant_settings


@pytest.fixture(scope="session")
def devtenant_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = redis_server_binary()
    if binary is None:
        reason = "redis-server is not installed (e.g. apt-get install redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires it")
        pytest.skip(reason)
    with redis_server(tmp_path_factory.mktemp("redis"), binary) as url:
        yield url


@pytest.fixture
def user_token(devtenant_server: DevTenantServer) -> Callable[..., str]:
    return devtenant_server.user_token


@pytest.fixture
def app_token(devtenant_server: DevTenantServer) -> Callable[..., str]:
    return devtenant_server.app_token


@pytest.fixture
def spa_sign_in(devtenant_server: DevTenantServer) -> Callable[..., dict[str, Any]]:
    return devtenant_server.spa_sign_in
