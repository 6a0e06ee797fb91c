"""Fixtures for tests that own their redis-server (to kill, pause or restart it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support.servers import RedisProcess, redis_process


@pytest.fixture
def server() -> Iterator[RedisProcess]:
    """A redis-server of this test's own, on a free loopback port."""
    with redis_process() as process:
        yield process


@pytest.fixture
def control(server: RedisProcess) -> Iterator[redis.Redis]:
    """The test's own connection (an operator's, another service's)."""
    client = server.client()
    yield client
    client.close()
