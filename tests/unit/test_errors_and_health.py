"""Probes, the JSON error shape for every HTTP error, CORS, and log redaction."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterator

import fakeredis
import pytest
import responses
from cryptography.fernet import Fernet
from joserfc import jwt
from joserfc.jwk import OctKey

from app import create_app
from app.extensions import obo
from app.logging_setup import RedactSecrets
from flask_obo.cache_store import MemoryTokenCacheStore, RedisTokenCacheStore
from flask_obo.settings import Settings
from tests.support.fake_entra import (
    ADELE,
    BOB,
    CLIENT_SECRET,
    METADATA_URL,
    Behaviour,
    settings_env,
)

SPA = "https://spa.example"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_json_error(response, status: int, error: str) -> dict:
    assert response.status_code == status
    assert response.mimetype == "application/json"
    assert not response.get_data(as_text=True).lstrip().startswith("<")
    body = response.get_json()
    assert body["error"] == error
    assert isinstance(body["error_description"], str) and body["error_description"]
    return body


# --- probes --------------------------------------------------------------------------------------


def test_healthz_answers_without_any_io(client, entra):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    assert (entra.metadata_fetches, entra.jwks_fetches) == (0, 0)
    assert entra.token_requests == [] and entra.graph_requests == []


def test_readyz_reports_its_dependencies_without_calling_entra(client, entra):
    before = client.get("/readyz")
    whoami = client.get("/api/whoami", headers={"Authorization": f"Bearer {entra.api_token()}"})
    assert whoami.status_code == 200
    after = client.get("/readyz")

    assert before.status_code == after.status_code == 200
    assert before.get_json() == {"status": "ready", "checks": {"redis": "ok", "authority": "unavailable"}}
    assert after.get_json() == {"status": "ready", "checks": {"redis": "ok", "authority": "ok"}}
    assert entra.metadata_fetches == 1  # the one of the validated request, none of the probes
    assert entra.token_requests == []


@pytest.fixture
def redis_down(settings: Settings) -> RedisTokenCacheStore:
    server = fakeredis.FakeServer()
    server.connected = False
    return RedisTokenCacheStore(fakeredis.FakeRedis(server=server), settings.token_cache_prefix,
                                settings.token_cache_ttl_seconds)


@pytest.fixture
def authority_down() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, METADATA_URL, status=500, body="upstream exploded")
        yield rsps


def test_readyz_stays_ready_while_the_authority_is_down(authority_down, settings, store):
    client = create_app(settings, store=store).test_client()

    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.get_json()["checks"] == {"redis": "ok", "authority": "unavailable"}
    assert len(authority_down.calls) == 0


def test_readyz_says_redis_is_degraded_when_its_ping_fails(entra, settings, redis_down):
    client = create_app(settings, store=redis_down).test_client()

    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.get_json()["checks"]["redis"] == "degraded"


def test_readyz_without_redis_reports_it_not_configured(entra, settings):
    client = create_app(settings, store=MemoryTokenCacheStore(60)).test_client()

    assert client.get("/readyz").get_json()["checks"]["redis"] == "not_configured"


def test_healthz_stays_ok_while_dependencies_are_down(authority_down, settings, redis_down):
    client = create_app(settings, store=redis_down).test_client()

    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    assert len(authority_down.calls) == 0


# --- HTTP errors are JSON ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/api/nope", "/api/me/nope", "/"])
def test_an_unknown_url_is_a_json_404(client, path):
    response = client.get(path)

    assert_json_error(response, 404, "not_found")


@pytest.mark.parametrize(("method", "path"), [("post", "/api/me"), ("delete", "/api/whoami"),
                                              ("put", "/api/me/manager"), ("post", "/healthz")])
def test_a_wrong_method_is_a_json_405_with_allow(client, method, path):
    response = getattr(client, method)(path)

    assert_json_error(response, 405, "method_not_allowed")
    allowed = {m.strip() for m in response.headers["Allow"].split(",")}
    assert "GET" in allowed
    assert method.upper() not in allowed


@pytest.mark.parametrize(("method", "path"), [("post", "/api/me"), ("get", "/api/whoami")])
def test_a_body_over_the_limit_is_a_json_413(client, entra, method, path):
    response = getattr(client, method)(path, data=b"x" * 100_000, headers=bearer(entra.api_token()))

    assert_json_error(response, 413, "request_too_large")


def test_an_unexpected_error_is_a_json_500_that_echoes_nothing(app, client, entra, caplog):
    @app.get("/explode")
    @obo.require_scope()
    def explode():  # fails in a way nobody planned for, quoting the Graph token it got
        raise RuntimeError(obo.acquire_token(["https://graph.microsoft.com/.default"]))

    caplog.set_level(logging.DEBUG)

    response = client.get("/explode", headers=bearer(entra.api_token()))

    assert_json_error(response, 500, "server_error")
    graph_token = next(iter(entra.graph_tokens))
    assert graph_token not in response.get_data(as_text=True)
    assert any("RuntimeError" in r.getMessage() for r in caplog.records)
    assert graph_token not in caplog.text


# --- CORS --------------------------------------------------------------------------------------------


@pytest.fixture
def cors_client(entra, store):
    return create_app(Settings.from_env(settings_env(CORS_ALLOWED_ORIGINS=SPA)), store=store).test_client()


def preflight(client, origin: str):
    return client.options("/api/me", headers={
        "Origin": origin,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    })


def test_a_preflight_from_the_allowed_origin_succeeds_without_a_token(cors_client, entra):
    response = preflight(cors_client, SPA)

    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == SPA
    allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert "authorization" in allowed
    assert "GET" in response.headers["Access-Control-Allow-Methods"]
    assert "WWW-Authenticate" not in response.headers
    assert entra.jwks_fetches == 0


def test_the_sign_out_delete_is_allowed_cross_origin(cors_client):
    """The SPA's sign-out calls DELETE /api/me/token-cache from its own origin."""
    response = cors_client.options("/api/me/token-cache", headers={
        "Origin": SPA,
        "Access-Control-Request-Method": "DELETE",
        "Access-Control-Request-Headers": "authorization",
    })

    assert response.headers["Access-Control-Allow-Origin"] == SPA
    assert "DELETE" in response.headers["Access-Control-Allow-Methods"]


def test_a_preflight_from_another_origin_gets_no_cors_grant(cors_client):
    response = preflight(cors_client, "https://evil.example")

    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Headers" not in response.headers


@pytest.mark.parametrize("authenticated", [True, False], ids=["valid-token", "no-token"])
def test_an_api_response_to_the_allowed_origin_is_readable_by_the_spa(cors_client, entra, authenticated):
    headers = {"Origin": SPA, **(bearer(entra.api_token()) if authenticated else {})}

    response = cors_client.get("/api/whoami", headers=headers)

    assert response.status_code == (200 if authenticated else 401)
    assert response.headers["Access-Control-Allow-Origin"] == SPA
    exposed = {h.strip().lower() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert "www-authenticate" in exposed


def test_an_api_response_to_another_origin_carries_no_cors_grant(cors_client, entra):
    response = cors_client.get("/api/whoami", headers={"Origin": "https://evil.example",
                                                       **bearer(entra.api_token())})

    assert "Access-Control-Allow-Origin" not in response.headers


def test_without_cors_settings_no_response_carries_cors_headers(client, entra):
    responses_ = [
        preflight(client, SPA),
        client.get("/api/whoami", headers={"Origin": SPA, **bearer(entra.api_token())}),
        client.get("/api/whoami", headers={"Origin": SPA}),
    ]

    for response in responses_:
        names = [name.lower() for name, _ in response.headers.items()]
        assert not [name for name in names if name.startswith("access-control-")]


# --- logging redaction -----------------------------------------------------------------------------


@pytest.fixture
def redacted_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger("tests.unit.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, stream
    logger.removeHandler(handler)
    logger.propagate = True


SECRETS = {
    "jwt": jwt.encode({"alg": "HS256", "typ": "JWT"}, {"oid": ADELE, "scp": "user_impersonation"},
                      OctKey.import_key(b"k" * 32)),
    "bearer": "Bearer graph-at-" + ADELE + "-1-" + "0123456789abcdef" * 2,
    "bearer-lowercase": "bearer abcdefghijklmnopqrstuvwxyz0123456789",
    "fernet": Fernet(Fernet.generate_key()).encrypt(b"serialized msal cache").decode(),
}


@pytest.mark.parametrize("secret", SECRETS.values(), ids=SECRETS.keys())
@pytest.mark.parametrize("as_argument", [True, False], ids=["argument", "in-message"])
def test_redaction_removes_credentials_from_the_final_message(redacted_log, secret, as_argument):
    logger, stream = redacted_log
    credential = secret.split()[-1]

    if as_argument:
        logger.warning("header was %s for %s", secret, "adele")
    else:
        logger.warning(f"header was {secret} for adele")

    output = stream.getvalue()
    assert credential not in output
    assert "[redacted]" in output
    assert output.startswith("header was ") and output.rstrip().endswith(" for adele")


def test_redaction_leaves_ordinary_messages_alone(redacted_log):
    logger, stream = redacted_log

    logger.info("loaded %d signing keys for partition %s", 2, "9f86d081884c7d65")

    assert stream.getvalue() == "loaded 2 signing keys for partition 9f86d081884c7d65\n"


def test_the_app_puts_one_redaction_filter_on_every_root_handler(app):
    create_app(Settings.from_env(settings_env()))  # a second app must not stack filters

    for handler in logging.getLogger().handlers:
        assert sum(isinstance(f, RedactSecrets) for f in handler.filters) == 1


def test_a_full_graph_flow_logs_no_credential(client, entra, redis_client, caplog):
    caplog.set_level(logging.DEBUG)
    entra.behaviours[BOB] = Behaviour("invalid_grant")
    adele, bob = entra.api_token(ADELE), entra.api_token(BOB)

    assert client.get("/api/me", headers=bearer(adele)).status_code == 200
    assert client.get("/api/me/manager", headers=bearer(adele)).status_code == 200
    assert client.get("/api/me", headers=bearer(adele)).status_code == 200
    assert client.get("/api/me", headers=bearer(bob)).status_code == 401

    stored = [redis_client.get(key) for key in redis_client.keys("*")]
    stored = [value for value in stored if value]
    assert stored, "the flow should have written a sealed cache"
    secrets = [adele, bob, CLIENT_SECRET, f"rt-{ADELE}-", *entra.graph_tokens]
    for value in stored:
        secrets += [repr(value)[2:-1][:60], value.hex()[:60],
                    base64.urlsafe_b64encode(value).decode()[:60]]
    messages = [record.getMessage() for record in caplog.records] + [caplog.text]
    assert any("on-behalf-of" in m for m in messages), "the flow should have been logged"
    for secret in secrets:
        assert not [m for m in messages if secret in m], secret[:20]


def test_readiness_probes_never_call_the_authority(client, entra):
    for _ in range(5):
        assert client.get("/readyz").status_code == 200
    assert (entra.metadata_fetches, entra.jwks_fetches) == (0, 0)


@pytest.mark.parametrize("existing, expected", [(None, "Origin"), ("Accept", "Accept, Origin"),
                                                ("Accept, origin", "Accept, origin"),
                                                ("X-Origin-Hint", "X-Origin-Hint, Origin")])
def test_a_protected_answer_varies_on_origin_once(existing, expected):
    from flask import Response

    from flask_obo.extension import _private

    response = Response()
    if existing:
        response.headers["Vary"] = existing
    assert _private(response).headers["Vary"] == expected
    assert response.headers["Cache-Control"] == "no-store"


def test_a_protected_answer_keeps_every_vary_header_it_had():
    """A view may add Vary more than once (``headers.add``): none of them is lost when
    Origin joins, and an Origin in the second one is seen."""
    from flask import Response

    from flask_obo.extension import _private

    response = Response()
    response.headers.add("Vary", "Accept")
    response.headers.add("Vary", "Cookie")
    assert _private(response).headers.getlist("Vary") == ["Accept, Cookie, Origin"]

    response = Response()
    response.headers.add("Vary", "Accept")
    response.headers.add("Vary", "Origin")
    assert _private(response).headers.getlist("Vary") == ["Accept", "Origin"]
