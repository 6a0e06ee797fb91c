"""One request id follows a request: kept from the caller when well formed (else made),
returned in ``X-Request-ID``, on every log line of the request, and sent to Entra ID and
Graph as ``client-request-id``."""

from __future__ import annotations

import json
import logging
import re

import pytest

from app.logging_setup import logging_config
from flask_obo import RequestIdFilter
from tests.support.fake_entra import ADELE, FakeEntra

MADE = re.compile(r"[0-9a-f]{32}")


def bearer(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


def test_a_well_formed_id_follows_the_request_to_entra_and_graph(client, entra: FakeEntra, caplog):
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(RequestIdFilter())
    response = client.get("/api/me", headers=bearer(entra.api_token(ADELE), **{"X-Request-ID": "spa.42-a_b"}))

    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "spa.42-a_b"
    assert entra.client_request_ids == [("token", "spa.42-a_b"), ("graph", "spa.42-a_b")]
    exchange = [r for r in caplog.records if "on-behalf-of exchange" in r.getMessage()]
    assert exchange and all(r.request_id == "spa.42-a_b" and r.route == "/api/me" for r in exchange)


@pytest.mark.parametrize("incoming", [None, "", "a" * 65, "has space", "quote\"d", "x=1;y", "é"])
def test_a_missing_or_malformed_id_is_replaced(client, entra: FakeEntra, incoming):
    headers = {} if incoming is None else {"X-Request-ID": incoming}
    response = client.get("/api/me", headers=bearer(entra.api_token(ADELE), **headers))

    made = response.headers["X-Request-ID"]
    assert MADE.fullmatch(made)
    assert entra.client_request_ids[-1] == ("graph", made)


def test_every_answer_carries_an_id_even_errors_and_unknown_paths(client):
    for path in ("/api/me", "/nowhere", "/healthz"):
        assert MADE.fullmatch(client.get(path).headers["X-Request-ID"])
    first, second = (client.get("/healthz").headers["X-Request-ID"] for _ in range(2))
    assert first != second


def test_json_log_lines_carry_the_fields_and_no_secret(app, client, entra: FakeEntra, capsys):
    """LOG_FORMAT=json: one object per line, with time, level, logger, message, request_id
    and route; the redaction applies before formatting."""
    logging.config.dictConfig(logging_config("INFO", "json"))
    try:
        token = entra.api_token(ADELE)
        assert client.get("/api/me", headers=bearer(token, **{"X-Request-ID": "json-1"})).status_code == 200
        logging.getLogger("flask_obo.test").warning("leak? Bearer %s", token)
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    exchange = next(line for line in lines if "on-behalf-of exchange" in line["message"])
    assert {"time", "level", "logger", "message", "request_id", "route"} <= exchange.keys()
    assert (exchange["request_id"], exchange["route"], exchange["level"]) == ("json-1", "/api/me", "INFO")
    leak = lines[-1]
    assert leak["request_id"] == "-" and token not in json.dumps(lines) and "[redacted]" in leak["message"]


def test_the_id_and_the_count_ride_on_one_hook_each_way(settings, store):
    """flask-obo's per-request work (request id, timer, count) costs Flask one
    ``before_request`` and one ``after_request`` dispatch, not one per concern; the id a
    caller sends still comes back, and the request is still counted."""
    from flask import Flask

    from flask_obo import FlaskOBO
    from flask_obo.extension import services_of

    app = Flask(__name__)
    FlaskOBO(app, settings=settings, store=store)
    assert len(app.before_request_funcs[None]) == 1
    assert len(app.after_request_funcs[None]) == 1

    @app.get("/ping")
    def ping() -> str:
        return "pong"

    response = app.test_client().get("/ping", headers={"X-Request-ID": "caller-7"})
    assert response.headers["X-Request-ID"] == "caller-7"
    counted = services_of(app).metrics.registry.get_sample_value(
        "flask_obo_requests_total", {"route": "/ping", "status": "200"})
    assert counted == 1
