"""Issue 19: ``Retry-After`` is read by one function, for Entra ID's answers and the
downstream APIs' alike: delta-seconds or an HTTP-date, bounded, with a default."""

from __future__ import annotations

import time
from email.utils import formatdate

import pytest
import requests
import responses

from flask_obo.downstream import DownstreamApi
from flask_obo.errors import DownstreamThrottled
from flask_obo.http import DEFAULT_RETRY_AFTER, MAX_RETRY_AFTER, retry_after_seconds
from flask_obo.settings import DownstreamApiSettings
from tests.support.fake_entra import ADELE, Behaviour, FakeEntra

TASKS = "https://tasks.example.com/v1"


def http_date(seconds_from_now: float) -> str:
    return formatdate(time.time() + seconds_from_now, usegmt=True)


@pytest.mark.parametrize(("value", "seconds"), [
    ("30", 30), (" 7 ", 7), ("0", 1), ("1", 1), ("300", 300), ("86400", MAX_RETRY_AFTER),
    ("99999999999999999999", MAX_RETRY_AFTER),
    (None, DEFAULT_RETRY_AFTER), ("", DEFAULT_RETRY_AFTER), ("soon", DEFAULT_RETRY_AFTER),
    ("-5", DEFAULT_RETRY_AFTER), ("1.5", DEFAULT_RETRY_AFTER),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 1),  # a date past: retry now (at least a second)
])
def test_delta_seconds_bounded_and_a_default(value: str | None, seconds: int) -> None:
    assert retry_after_seconds(value) == seconds


def test_an_http_date_is_the_seconds_until_then() -> None:
    assert 88 <= retry_after_seconds(http_date(90)) <= 91
    assert retry_after_seconds(http_date(10 * 24 * 3600)) == MAX_RETRY_AFTER


def test_a_downstream_apis_http_date_is_honoured() -> None:
    """The downstream client used to take an HTTP-date for 5 s whatever it said."""
    api = DownstreamApi("tasks", DownstreamApiSettings(TASKS, ("api://tasks/.default",)),
                        requests.Session(), lambda scopes, claims: "token")
    with responses.RequestsMock() as rsps:
        rsps.get(f"{TASKS}/items", status=429, headers={"Retry-After": http_date(120)})
        with pytest.raises(DownstreamThrottled) as raised:
            api.get("/items")
    assert 118 <= int(raised.value.headers["Retry-After"]) <= 121


def test_entra_ids_http_date_is_honoured(client, entra: FakeEntra) -> None:
    entra.behaviours[ADELE] = Behaviour("throttled", retry_after=http_date(60))
    response = client.get("/api/me", headers={"Authorization": f"Bearer {entra.api_token(ADELE)}"})
    assert response.status_code == 503
    assert 58 <= int(response.headers["Retry-After"]) <= 61
