"""Signing keys and metadata keep serving from cache while a slow refresh is under way."""

from __future__ import annotations

import threading

import requests
import responses

from flask_obo.authority import (
    KEYS_MAX_AGE,
    OpenIdConfiguration,
    SigningKeys,
)
from flask_obo.settings import DEFAULT_ENTRA_TIMEOUT
from tests.support.fake_entra import JWKS_URL, METADATA_URL, FakeEntra


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_slow_key_refresh_does_not_hold_up_other_requests():
    entra, clock = FakeEntra(), Clock()
    refresh_started, release = threading.Event(), threading.Event()
    calls = []

    def jwks(request):
        calls.append(1)
        if len(calls) > 1:  # the scheduled refresh: the authority is slow today
            refresh_started.set()
            release.wait(10)
        return entra._jwks(request)

    with responses.RequestsMock() as rsps:
        rsps.add_callback(responses.GET, METADATA_URL, callback=entra._metadata)
        rsps.add_callback(responses.GET, JWKS_URL, callback=jwks)
        session = requests.Session()
        keys = SigningKeys(OpenIdConfiguration(METADATA_URL, session, clock), session, clock)
        assert keys.get(entra.key.kid) is not None  # first load
        clock.now += KEYS_MAX_AGE + 1  # a refresh is due
        refresher = threading.Thread(target=keys.get, args=(entra.key.kid,))
        refresher.start()
        assert refresh_started.wait(10)
        # While the refresh hangs, another request still validates with the cached key.
        assert keys.get(entra.key.kid) is not None
        assert refresher.is_alive()
        release.set()
        refresher.join(10)
    assert len(calls) == 2


class RecordingSession(requests.Session):
    """Remembers the timeout of every request (``responses`` does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[object] = []

    def get(self, url, **kwargs):  # type: ignore[override]
        self.timeouts.append(kwargs.get("timeout"))
        return super().get(url, **kwargs)


def test_fetches_use_the_configured_timeout():
    entra, session = FakeEntra(), RecordingSession()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        entra.register(rsps)
        metadata = OpenIdConfiguration(METADATA_URL, session, timeout=(1.5, 4.0))
        assert SigningKeys(metadata, session, timeout=(2.0, 5.0)).get(entra.key.kid) is not None
        OpenIdConfiguration(METADATA_URL, session).document()
    assert session.timeouts == [(1.5, 4.0), (2.0, 5.0), DEFAULT_ENTRA_TIMEOUT]


def test_status_follows_the_age_of_what_is_in_hand_without_network():
    entra, clock = FakeEntra(), Clock()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        entra.register(rsps)
        session = requests.Session()
        metadata = OpenIdConfiguration(METADATA_URL, session, clock)
        keys = SigningKeys(metadata, session, clock)
        assert (metadata.status(), keys.status()) == ("unavailable", "unavailable")
        assert len(rsps.calls) == 0
        keys.get(entra.key.kid)
        assert (metadata.status(), keys.status()) == ("ok", "ok")
        clock.now += KEYS_MAX_AGE
        assert (metadata.status(), keys.status()) == ("stale", "stale")
        assert len(rsps.calls) == 2


def test_a_failed_unknown_kid_refetch_does_not_bring_the_scheduled_refresh_forward():
    entra, clock = FakeEntra(), Clock()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        entra.register(rsps)
        session = requests.Session()
        keys = SigningKeys(OpenIdConfiguration(METADATA_URL, session, clock), session, clock)
        assert keys.get(entra.key.kid) is not None
        rsps.replace(responses.GET, JWKS_URL, status=503)
        assert keys.get("forged") is None  # one refetch, which fails
        clock.now += 3600
        assert keys.get(entra.key.kid) is not None
        assert len(rsps.calls) == 3  # metadata, JWKS, the failed refetch: no retry every minute
