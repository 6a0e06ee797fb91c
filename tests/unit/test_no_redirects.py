"""No fetch of the authority follows a redirect, to any host: the OpenID configuration and
the keys must come from the authority itself, and a token request's form carries the API's
credential and the user's assertion. A 3xx fails that call and says so in the log."""

from __future__ import annotations

import logging

import pytest
import requests
import responses

from flask_obo.authority import AuthorityUnavailable, OpenIdConfiguration, SigningKeys
from flask_obo.bulkhead import Deadline
from flask_obo.msal_http import EntraUnavailable, MsalHttpClient, within
from tests.support.fake_entra import JWKS_URL, METADATA_URL, FakeEntra

ELSEWHERE = "https://elsewhere.example/stolen"


class _NoMetadata:
    @staticmethod
    def for_url(url: str) -> None:
        return None


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(ELSEWHERE, json={"issuer": "x", "jwks_uri": ELSEWHERE, "keys": []})
        mock.post(ELSEWHERE, json={"access_token": "from elsewhere", "expires_in": 3600})
        yield mock


def _called_elsewhere(mock: responses.RequestsMock) -> bool:
    return any(call.request.url.startswith("https://elsewhere.example") for call in mock.calls)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_the_openid_configuration_is_not_fetched_through_a_redirect(rsps, status):
    rsps.get(METADATA_URL, status=status, headers={"Location": ELSEWHERE + "?x=1"})
    with pytest.raises(AuthorityUnavailable, match="redirects are not followed") as raised:
        OpenIdConfiguration(METADATA_URL, requests.Session()).document()
    assert "elsewhere.example/stolen" in str(raised.value) and "x=1" not in str(raised.value)
    assert not _called_elsewhere(rsps)


def test_the_signing_keys_are_not_fetched_through_a_redirect(rsps):
    entra = FakeEntra()
    rsps.add_callback(responses.GET, METADATA_URL, callback=entra._metadata)
    rsps.get(JWKS_URL, status=302, headers={"Location": ELSEWHERE})
    session = requests.Session()
    with pytest.raises(AuthorityUnavailable, match="redirects are not followed"):
        SigningKeys(OpenIdConfiguration(METADATA_URL, session), session).get(entra.key.kid)
    assert not _called_elsewhere(rsps)


@pytest.mark.parametrize("status", [302, 307, 308])
def test_a_token_request_is_not_sent_on_through_a_redirect(rsps, caplog, status):
    token_url = "https://login.example/tenant/oauth2/v2.0/token"
    rsps.post(token_url, status=status, headers={"Location": ELSEWHERE + "?code=abc"})
    client = MsalHttpClient(requests.Session(), _NoMetadata(), timeout=(1.0, 2.0))
    caplog.set_level(logging.ERROR, logger="flask_obo")
    with pytest.raises(EntraUnavailable), within(Deadline(5)):
        client.post(token_url, data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                     "client_secret": "SECRET", "assertion": "USER-TOKEN"})
    assert not _called_elsewhere(rsps)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "redirects are not followed" in logged and "elsewhere.example/stolen" in logged
    assert "code=abc" not in logged and "SECRET" not in logged and "USER-TOKEN" not in logged
