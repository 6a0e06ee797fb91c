"""What the protector promises a caller (RFC 6750), and how it uses the authority's keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
import responses
from joserfc import jws
from joserfc.jwk import OctKey, RSAKey

from app import create_app
from app.extensions import obo
from flask_obo import current_token
from flask_obo.authority import OpenIdConfiguration, SigningKeys
from flask_obo.settings import Settings, SettingsError
from tests.support.fake_entra import (
    ADELE,
    AUTHORITY_HOST,
    CLIENT_ID,
    ISSUER,
    JWKS_URL,
    METADATA_URL,
    SPA_CLIENT_ID,
    TENANT_ID,
    FakeEntra,
    settings_env,
)

OTHER_TENANT = "0f0f0f0f-1111-4222-8333-444444444444"
INVALID_DESCRIPTION = "The access token is invalid or has expired."
WHOAMI = "/api/whoami"

# Keys that Entra never published: one impersonating the published kid, one with its own kid.
FORGED_KEY = RSAKey.generate_key(2048, parameters={"kid": "key-1"})
UNPUBLISHED_KEY = RSAKey.generate_key(2048, parameters={"kid": "key-unknown"})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def claims(**overrides: Any) -> dict[str, Any]:
    """A valid v2 access-token payload for Adele, with overrides (None drops a claim)."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "aud": CLIENT_ID, "iss": ISSUER, "iat": now, "nbf": now, "exp": now + 3600,
        "azp": SPA_CLIENT_ID, "name": "Adele Vance", "oid": ADELE,
        "preferred_username": "adele@contoso.example", "scp": "user_impersonation",
        "tid": TENANT_ID, "ver": "2.0",
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def sign(entra: FakeEntra, payload: dict[str, Any] | bytes, key: RSAKey | None = None) -> str:
    """RS256 over an arbitrary payload (bytes are signed as they are)."""
    key = key or entra.key
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return jws.serialize_compact({"alg": "RS256", "typ": "JWT", "kid": key.kid}, body, key)


def hs256_with_public_key(entra: FakeEntra) -> str:
    """The classic algorithm-confusion forgery: HMAC keyed with the RSA public key PEM."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": entra.key.kid}))
    payload = b64(json.dumps(claims()))
    secret = entra.key.as_pem(private=False)
    mac = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(mac)}"


def alg_none(entra: FakeEntra) -> str:
    header = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": entra.key.kid}))
    return f"{header}.{b64(json.dumps(claims()))}."


def _now() -> int:
    return int(time.time())


def claim_strings(token: str) -> list[str]:
    """Every string claim value (of at least 4 chars) a token's payload carries, unverified."""
    try:
        segment = token.split(".")[1]
        payload = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (IndexError, ValueError, RecursionError):
        return []
    if not isinstance(payload, dict):
        return []
    return [v for v in payload.values() if isinstance(v, str) and len(v) >= 4]


# --- valid tokens -----------------------------------------------------------------------------


def test_whoami_answers_exactly_the_identity_claims_without_calling_entra(client, entra):
    response = client.get(WHOAMI, headers=bearer(entra.api_token()))

    assert response.status_code == 200
    assert response.get_json() == {
        "oid": ADELE,
        "tid": TENANT_ID,
        "name": "Adele Vance",
        "preferred_username": "adele@contoso.example",
        "scp": "user_impersonation",
        "roles": None,
        "app_id": SPA_CLIENT_ID,  # the SPA the user signed in to
    }
    assert entra.token_requests == []


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(client, entra, scheme):
    response = client.get(WHOAMI, headers={"Authorization": f"{scheme} {entra.api_token()}"})

    assert response.status_code == 200


def test_the_validated_token_keeps_the_raw_string_for_on_behalf_of(app, entra):
    token = entra.api_token()

    with app.test_request_context(WHOAMI, headers=bearer(token)):
        obo.authenticate()
        assert current_token.raw == token
        assert current_token.oid == ADELE
        assert current_token.tid == TENANT_ID
        assert "user_impersonation" in current_token.scopes


def test_current_token_refuses_an_unauthenticated_request(app):
    with app.test_request_context(WHOAMI), pytest.raises(RuntimeError, match="protected route"):
        current_token.oid  # noqa: B018


# --- no token -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Basic abc", "Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "Digest x=1", "Token abc.def.ghi"],
    ids=["absent", "empty", "basic", "basic-b64", "bearer-alone", "bearer-spaces", "digest", "other-scheme"],
)
def test_a_request_without_a_bearer_token_is_challenged(client, entra, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}

    response = client.get(WHOAMI, headers=headers)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="flask-obo"'
    body = response.get_json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == "missing_token"
    assert body["error_description"]
    assert entra.jwks_fetches == 0 and entra.metadata_fetches == 0


# --- invalid tokens -------------------------------------------------------------------------------

INVALID_TOKENS: dict[str, Callable[[FakeEntra], str]] = {
    "bad-signature-same-kid": lambda e: e.api_token(key=FORGED_KEY),
    "unknown-kid": lambda e: e.api_token(key=UNPUBLISHED_KEY),
    "no-kid": lambda e: jws.serialize_compact(
        {"alg": "RS256", "typ": "JWT"}, json.dumps(claims()).encode(), e.key
    ),
    "issuer-of-another-tenant": lambda e: e.api_token(iss=f"{AUTHORITY_HOST}/{OTHER_TENANT}/v2.0"),
    "v1-issuer-of-another-tenant": lambda e: e.api_token(iss=f"https://sts.windows.net/{OTHER_TENANT}/"),
    "v1-issuer-with-the-v2-host": lambda e: e.api_token(iss=f"{AUTHORITY_HOST}/{TENANT_ID}/"),
    "tenant-claim-of-another-tenant": lambda e: e.api_token(tid=OTHER_TENANT,
                                                            iss=f"{AUTHORITY_HOST}/{OTHER_TENANT}/v2.0"),
    "wrong-audience": lambda e: e.api_token(aud="00000003-0000-0000-c000-000000000000"),
    "audience-of-the-spa": lambda e: e.api_token(aud=SPA_CLIENT_ID),
    "expired-2-minutes-ago": lambda e: e.api_token(iat=_now() - 3720, nbf=_now() - 3720, exp=_now() - 120),
    "not-before-in-2-minutes": lambda e: e.api_token(nbf=_now() + 120),
    "missing-exp": lambda e: sign(e, claims(exp=None)),
    "missing-tid": lambda e: e.api_token(tid=None),
    "missing-oid": lambda e: sign(e, claims(oid=None)),
    "missing-scp-and-roles": lambda e: e.api_token(scp=None),
    "tid-of-another-tenant": lambda e: e.api_token(tid=OTHER_TENANT),
    "oid-not-a-guid": lambda e: e.api_token(oid="adele-vance-not-a-guid"),
    "oid-a-number": lambda e: sign(e, claims(oid=12345)),
    "scp-a-list": lambda e: e.api_token(scp=["user_impersonation"]),
    "exp-a-string": lambda e: sign(e, claims(exp="tomorrow")),
    "aud-an-object": lambda e: sign(e, claims(aud={"id": CLIENT_ID})),
    "payload-a-list": lambda e: sign(e, b'["user_impersonation"]'),
    "payload-not-json": lambda e: sign(e, b"user_impersonation, please"),
    "hs256-with-an-oct-key": lambda e: e.api_token(
        key=OctKey.import_key(b"k" * 32, {"kid": "key-1"}), alg="HS256"
    ),
    "hs256-keyed-with-the-public-key": hs256_with_public_key,
    "alg-none": alg_none,
    "garbage": lambda e: "garbage",
    "three-empty-segments": lambda e: "..",
    "three-dots": lambda e: e.api_token() + ".x",
    "four-segments-of-garbage": lambda e: "a.b.c.d",
    "20-kb-validly-signed": lambda e: e.api_token(padding="p" * 20_000),
    "non-ascii": lambda e: "äöü.éèê.ßñ",
    "header-base64-of-non-json": lambda e: f"{b64('not json at all')}.{b64(json.dumps(claims()))}.c2ln",
    "header-a-json-list": lambda e: f"{b64('[1, 2]')}.{b64(json.dumps(claims()))}.c2ln",
    "header-not-base64": lambda e: f"!!!.{b64(json.dumps(claims()))}.c2ln",
    "deeply-nested-payload-validly-signed": lambda e: sign(e, b"[" * 5000 + b"]" * 5000),
    "deeply-nested-header": lambda e: f"{b64('[' * 5000 + ']' * 5000)}.{b64('{}')}.{b64('sig')}",
}


@pytest.mark.parametrize("make_token", INVALID_TOKENS.values(), ids=INVALID_TOKENS.keys())
def test_an_invalid_token_gets_one_fixed_answer(client, entra, make_token):
    token = make_token(entra)

    response = client.get(WHOAMI, headers=bearer(token))

    assert response.status_code == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'realm="flask-obo"' in challenge
    assert 'error="invalid_token"' in challenge
    assert response.get_json() == {"error": "invalid_token", "error_description": INVALID_DESCRIPTION}
    echoed = response.get_data(as_text=True) + challenge
    assert token not in echoed
    for value in claim_strings(token):
        assert value not in echoed


VALID_EDGE_TOKENS: dict[str, Callable[[FakeEntra], str]] = {
    "audience-is-the-app-id-uri": lambda e: e.api_token(aud=f"api://{CLIENT_ID}"),
    "expired-30-seconds-ago": lambda e: e.api_token(iat=_now() - 3630, nbf=_now() - 3630, exp=_now() - 30),
    "not-before-in-30-seconds": lambda e: e.api_token(nbf=_now() + 30),
    "without-nbf": lambda e: e.api_token(nbf=None),
    "with-roles-as-well": lambda e: e.api_token(roles=["Reader"]),
}


@pytest.mark.parametrize("make_token", VALID_EDGE_TOKENS.values(), ids=VALID_EDGE_TOKENS.keys())
def test_tokens_within_the_rules_are_accepted(client, entra, make_token):
    response = client.get(WHOAMI, headers=bearer(make_token(entra)))

    assert response.status_code == 200
    assert response.get_json()["oid"] == ADELE


# --- scope ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scp",
    ["user_impersonation", "User.Read user_impersonation", "user_impersonation User.Read Mail.Read"],
)
def test_a_token_carrying_the_scope_is_accepted(client, entra, scp):
    response = client.get(WHOAMI, headers=bearer(entra.api_token(scp=scp)))

    assert response.status_code == 200
    assert response.get_json()["scp"] == scp


def assert_insufficient_scope(response, scope: str) -> None:
    assert response.status_code == 403
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'realm="flask-obo"' in challenge
    assert 'error="insufficient_scope"' in challenge
    assert f'scope="{scope}"' in challenge
    body = response.get_json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == "insufficient_scope"


@pytest.mark.parametrize(
    "token_claims",
    [
        {"scp": "user_impersonation_admin"},
        {"scp": "user"},
        {"scp": "impersonation"},
        {"scp": "User.Read"},
        {"scp": "USER_IMPERSONATION"},
        {"scp": "user_impersonation,User.Read"},
        {"scp": ""},
        {"scp": None, "roles": ["access_as_application"]},
        {"scp": None, "roles": ["user_impersonation"]},
    ],
    ids=["superstring", "prefix", "suffix", "other-scope", "other-case", "comma-joined", "empty",
         "app-only", "app-only-role-named-like-the-scope"],
)
def test_a_token_without_the_scope_is_forbidden(client, entra, token_claims):
    response = client.get(WHOAMI, headers=bearer(entra.api_token(**token_claims)))

    assert_insufficient_scope(response, "user_impersonation")


def test_the_required_scope_follows_api_required_scope(entra):
    app = create_app(Settings.from_env(settings_env(API_REQUIRED_SCOPE="Files.Read")))
    client = app.test_client()

    forbidden = client.get(WHOAMI, headers=bearer(entra.api_token(scp="user_impersonation")))
    allowed = client.get(WHOAMI, headers=bearer(entra.api_token(scp="User.Read Files.Read")))

    assert_insufficient_scope(forbidden, "Files.Read")
    assert allowed.status_code == 200


# --- signing keys, through the app ------------------------------------------------------------------


def test_building_the_app_makes_no_request(entra):
    create_app(Settings.from_env(settings_env()))

    assert (entra.metadata_fetches, entra.jwks_fetches, len(entra.token_requests)) == (0, 0, 0)


def test_keys_are_fetched_once_then_reused(client, entra):
    first = client.get(WHOAMI, headers=bearer(entra.api_token()))
    assert first.status_code == 200
    assert (entra.metadata_fetches, entra.jwks_fetches) == (1, 1)

    statuses = [client.get(WHOAMI, headers=bearer(entra.api_token())).status_code for _ in range(10)]

    assert statuses == [200] * 10
    assert (entra.metadata_fetches, entra.jwks_fetches) == (1, 1)


def test_an_unknown_kid_triggers_one_refetch_at_most_every_five_minutes(client, entra):
    assert client.get(WHOAMI, headers=bearer(entra.api_token())).status_code == 200

    first = client.get(WHOAMI, headers=bearer(entra.api_token(key=UNPUBLISHED_KEY)))
    assert first.status_code == 401
    assert entra.jwks_fetches == 2

    other = RSAKey.generate_key(2048, parameters={"kid": "key-forged-2"})
    for key in (UNPUBLISHED_KEY, other):
        assert client.get(WHOAMI, headers=bearer(entra.api_token(key=key))).status_code == 401
    assert entra.jwks_fetches == 2
    assert entra.metadata_fetches == 1
    assert client.get(WHOAMI, headers=bearer(entra.api_token())).status_code == 200


def test_a_rotated_key_is_picked_up_by_one_refetch(client, entra):
    assert client.get(WHOAMI, headers=bearer(entra.api_token())).status_code == 200
    new_key = RSAKey.generate_key(2048, parameters={"kid": "key-2"})
    entra.published.append(new_key)

    rotated = client.get(WHOAMI, headers=bearer(entra.api_token(key=new_key)))

    assert rotated.status_code == 200
    assert entra.jwks_fetches == 2
    for key in (new_key, entra.key, new_key):
        assert client.get(WHOAMI, headers=bearer(entra.api_token(key=key))).status_code == 200
    assert entra.jwks_fetches == 2


# --- signing keys, on a fake clock --------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def authority() -> Iterator[tuple[FakeEntra, responses.RequestsMock]]:
    """The Entra double on a registry this module can re-program (e.g. a failing JWKS)."""
    fake = FakeEntra()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        fake.register(rsps)
        yield fake, rsps


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keys(authority, clock) -> SigningKeys:
    session = requests.Session()
    return SigningKeys(OpenIdConfiguration(METADATA_URL, session, clock), session, clock)


def jwks_calls(rsps: responses.RequestsMock) -> int:
    return sum(1 for call in rsps.calls if call.request.url == JWKS_URL)


def test_keys_are_refreshed_after_24_hours_and_not_before(authority, clock, keys):
    fake, _ = authority
    assert keys.get("key-1") is not None
    assert (fake.metadata_fetches, fake.jwks_fetches) == (1, 1)

    clock.now += 24 * 3600 - 1
    assert keys.get("key-1") is not None
    assert (fake.metadata_fetches, fake.jwks_fetches) == (1, 1)

    clock.now += 1
    assert keys.get("key-1") is not None
    assert (fake.metadata_fetches, fake.jwks_fetches) == (2, 2)


def test_a_scheduled_refresh_drops_a_key_no_longer_published(authority, clock, keys):
    fake, _ = authority
    assert keys.get("key-1") is not None
    fake.published = [RSAKey.generate_key(2048, parameters={"kid": "key-2"})]

    clock.now += 24 * 3600
    assert keys.get("key-1") is None
    assert keys.get("key-2") is not None


def test_unknown_kid_refetches_are_limited_to_one_per_five_minutes(authority, clock, keys):
    fake, _ = authority
    keys.get("key-1")
    assert fake.jwks_fetches == 1

    assert keys.get("nope") is None
    assert fake.jwks_fetches == 2

    clock.now += 299
    assert keys.get("nope") is None
    assert keys.get("other") is None
    assert fake.jwks_fetches == 2

    clock.now += 1
    assert keys.get("nope") is None
    assert fake.jwks_fetches == 3


def test_a_failed_refresh_keeps_the_last_good_keys(authority, clock, keys):
    _, rsps = authority
    good = keys.get("key-1")
    assert good is not None
    rsps.replace(responses.GET, JWKS_URL, status=500, body="down")

    clock.now += 24 * 3600
    assert keys.get("key-1") is good
    assert jwks_calls(rsps) == 2

    clock.now += 59  # a failed refresh is retried after a minute, not on every request
    assert keys.get("key-1") is good
    assert jwks_calls(rsps) == 2

    clock.now += 1
    assert keys.get("key-1") is good
    assert jwks_calls(rsps) == 3


def test_a_failed_unknown_kid_refetch_keeps_the_last_good_keys(authority, clock, keys):
    _, rsps = authority
    good = keys.get("key-1")
    rsps.replace(responses.GET, JWKS_URL, status=503, body="down")

    assert keys.get("key-new") is None
    assert keys.get("key-1") is good
    assert jwks_calls(rsps) == 2


def test_a_refresh_failure_does_not_turn_valid_tokens_into_401(authority):
    fake, rsps = authority
    client = create_app(Settings.from_env(settings_env())).test_client()
    assert client.get(WHOAMI, headers=bearer(fake.api_token())).status_code == 200
    rsps.replace(responses.GET, JWKS_URL, status=500, body="down")

    # An unknown kid forces a refetch, which fails; the cached keys stay in use.
    assert client.get(WHOAMI, headers=bearer(fake.api_token(key=UNPUBLISHED_KEY))).status_code == 401
    assert client.get(WHOAMI, headers=bearer(fake.api_token())).status_code == 200
    assert jwks_calls(rsps) == 2


@pytest.mark.parametrize("outage", ["metadata-500", "jwks-500", "unreachable", "metadata-not-json"])
def test_without_any_keys_and_the_authority_down_the_answer_is_503(outage):
    fake = FakeEntra()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        if outage == "metadata-500":
            rsps.add(responses.GET, METADATA_URL, status=500)
        elif outage == "metadata-not-json":
            rsps.add(responses.GET, METADATA_URL, status=200, body="<html>maintenance</html>")
        elif outage == "jwks-500":
            rsps.add_callback(responses.GET, METADATA_URL, callback=fake._metadata)
            rsps.add(responses.GET, JWKS_URL, status=500)
        client = create_app(Settings.from_env(settings_env())).test_client()

        response = client.get(WHOAMI, headers=bearer(fake.api_token()))

    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    body = response.get_json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == "temporarily_unavailable"
    assert "WWW-Authenticate" not in response.headers


def test_validation_recovers_once_the_authority_is_back(authority):
    fake, rsps = authority
    rsps.replace(responses.GET, METADATA_URL, status=500)
    client = create_app(Settings.from_env(settings_env())).test_client()
    assert client.get(WHOAMI, headers=bearer(fake.api_token())).status_code == 503

    rsps.replace(responses.CallbackResponse(responses.GET, METADATA_URL, callback=fake._metadata))

    assert client.get(WHOAMI, headers=bearer(fake.api_token())).status_code == 200


# --- no input yields a 500 --------------------------------------------------------------------------


def _malformed_headers() -> list[str]:
    rng = random.Random(6750)
    printable = [chr(c) for c in range(0x20, 0x7F)] + [chr(c) for c in range(0xA0, 0x100)]
    noise = ["".join(rng.choice(printable) for _ in range(rng.randint(1, 300))) for _ in range(12)]
    return [
        *noise,
        *(f"Bearer {n}" for n in noise[:8]),
        "Bearer " + "a" * 100_000,
        "Bearer " + "a.b." * 5_000,
        "Bearer " + "eyJ" * 6_000,
        "Bearer  " + "x.y.z",
        "Bearer \t x.y.z",
        "   Bearer   x.y.z   ",
        "Bearer x.y.z Bearer x.y.z",
        "Bearer , Bearer",
        "Bearer ....",
        "Bearer .",
        "Bearer eyJ.eyJ.",
        "Bearer e30.e30.e30",
        "Bearer bnVsbA.bnVsbA.bnVsbA",  # "null" in every segment
        "Bearer IjEi.IjEi.IjEi",  # '"1"' in every segment
        "Bearer токен.токен.токен",
        "Bearer 🔑.🔑.🔑",
        "Bearer \u202e.\u200b.\ufeff",
        "Bearer =.=.=",
        "Bearer %00.%00.%00",
        "\u00a0Bearer x.y.z",
        "Bearer=x.y.z",
        "Negotiate YIIx",
        "Bearer " + b64(b"\xff\xfe\x00") + "." + b64(b"\x00") + "." + b64(b"\x00"),
    ]


def test_no_malformed_authorization_header_yields_a_500(client, entra):
    headers = _malformed_headers()
    assert len(headers) >= 40

    statuses = {value[:40]: client.get(WHOAMI, headers={"Authorization": value}).status_code
                for value in headers}

    assert set(statuses.values()) <= {401, 403}, statuses


def test_an_unknown_kid_on_the_very_first_request_fetches_the_keys_once(client, entra):
    stranger = RSAKey.generate_key(2048, parameters={"kid": "not-published"})
    response = client.get("/api/whoami", headers=bearer(entra.api_token(key=stranger)))
    assert response.status_code == 401
    assert entra.jwks_fetches == 1  # the initial load is as fresh as a refetch would be


# --- token versions and tenants --------------------------------------------------------------


def test_a_v1_token_for_the_app_id_uri_is_accepted(client, entra):
    """Entra's default for an app registration (accessTokenAcceptedVersion null) is v1."""
    token = entra.api_token(iss=f"https://sts.windows.net/{TENANT_ID}/", aud=f"api://{CLIENT_ID}",
                            ver="1.0", azp=None, appid=SPA_CLIENT_ID)
    response = client.get(WHOAMI, headers=bearer(token))
    assert response.status_code == 200, response.json
    assert response.json["oid"] == ADELE


def test_a_sovereign_cloud_sets_the_v1_issuer_host(entra, store):
    app = create_app(Settings.from_env(settings_env(AZURE_V1_ISSUER_HOST="https://sts.chinacloudapi.cn")),
                     store=store)
    v1 = entra.api_token(iss=f"https://sts.chinacloudapi.cn/{TENANT_ID}/", aud=f"api://{CLIENT_ID}")
    public_cloud_v1 = entra.api_token(iss=f"https://sts.windows.net/{TENANT_ID}/", aud=f"api://{CLIENT_ID}")
    assert app.test_client().get(WHOAMI, headers=bearer(v1)).status_code == 200
    assert app.test_client().get(WHOAMI, headers=bearer(public_cloud_v1)).status_code == 401


@pytest.mark.parametrize(("env", "message"), [
    ({"AZURE_TENANT_ID": "organizations"},
     "AZURE_ALLOWED_TENANTS: required with AZURE_TENANT_ID=organizations"),
    ({"AZURE_ALLOWED_TENANTS": TENANT_ID}, "AZURE_ALLOWED_TENANTS: only with AZURE_TENANT_ID=organizations"),
    ({"AZURE_TENANT_ID": "organizations", "AZURE_ALLOWED_TENANTS": "contoso"}, "entry 1 is not a tenant id"),
    ({"AZURE_TENANT_ID": "consumers"}, "AZURE_TENANT_ID: must be a GUID"),
])
def test_tenancy_settings_are_checked(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(settings_env(**env))
