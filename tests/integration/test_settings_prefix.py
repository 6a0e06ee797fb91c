"""Issue 19: an app whose ``REDIS_URL`` is its own Redis (RQ, Celery) points flask-obo's
token cache at another with ``OBO_REDIS_URL``; two real redis-servers show which is used."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from flask import Flask

from flask_obo import FlaskOBO
from flask_obo.extension import services_of
from tests.support.fake_entra import ADELE, FakeEntra, settings_env
from tests.support.servers import RedisProcess, redis_process

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def adopters_app(apps_redis: str, cache_redis: str, key: str) -> Flask:
    app = Flask(__name__)
    app.config.update(settings_env(REDIS_URL=apps_redis, OBO_REDIS_URL=cache_redis, TOKEN_CACHE_KEYS=key))
    obo = FlaskOBO(app)

    @app.get("/profile")
    @obo.require_scope("user_impersonation")
    def profile() -> dict[str, str]:
        return obo.downstream("graph").get("/me").json()

    return app


def test_obo_redis_url_points_the_token_cache_away_from_the_apps_own_redis(
        server: RedisProcess, entra: FakeEntra) -> None:
    key = Fernet.generate_key().decode()
    with redis_process() as apps_redis:
        first = adopters_app(apps_redis.url, server.url, key)
        bearer = {"Authorization": f"Bearer {entra.api_token(ADELE)}"}
        assert first.test_client().get("/profile", headers=bearer).status_code == 200
        assert entra.obo_calls() == 1

        cache, own = server.client(), apps_redis.client()
        assert [k for k in cache.scan_iter("flask-obo*")], "the token cache is in OBO_REDIS_URL's Redis"
        assert own.dbsize() == 0, "the app's own Redis holds none of flask-obo's keys"

        # Another worker of the same app finds the user's tokens there: no new exchange.
        second = adopters_app(apps_redis.url, server.url, key)
        assert second.test_client().get("/profile", headers=bearer).status_code == 200
        assert entra.obo_calls() == 1
        assert own.dbsize() == 0
        cache.close()
        own.close()
        for app in (first, second):  # tests must not leave invalidation listeners pinging
            listener = services_of(app).store._invalidation
            if listener is not None:
                listener.stop()
