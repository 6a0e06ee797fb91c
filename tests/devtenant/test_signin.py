"""The SPA's sign-in, in-process: /authorize pages, code + PKCE at the token endpoint, logout.

The HTML pages are driven like a browser would: read the form, press a button (POST its
fields). The token endpoint is called like msal-browser does, cross-origin (``Origin``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.datastructures import MultiDict

from devtenant import API_CLIENT_ID, API_SCOPE, SPA_CLIENT_ID, TENANT_ID
from devtenant.runtime import current
from tests.devtenant.conftest import BASE, TOKEN_PATH, TokenEndpoint, claims_of
from tests.devtenant.test_entra import assert_entra_error

AUTHORIZE = f"/{TENANT_ID}/oauth2/v2.0/authorize"
LOGOUT = f"/{TENANT_ID}/oauth2/v2.0/logout"
DISCOVERY = f"/{TENANT_ID}/v2.0/.well-known/openid-configuration"
KEYS = f"/{TENANT_ID}/discovery/v2.0/keys"
SPA = "http://localhost:5173/"
SPA_ORIGIN = "http://localhost:5173"
API_SCOPES = f"api://{API_CLIENT_ID}/{API_SCOPE} openid profile offline_access"
CAPOLIDS = json.dumps({"access_token": {"capolids": {"essential": True, "values": ["x"]}}})
DISPLAY_NAMES = [
    "Adele Vance", "Nestor Wilke", "Patti Fernandez", "Alex Wilber", "Lynne Robbins", "Megan Bowen",
]  # fmt: skip


# --- a minimal "browser": forms and buttons of our HTML pages ---------------------------------
@dataclass
class Button:
    name: str | None
    value: str | None
    text: str = ""  # the accessible name: the button's text content


@dataclass
class Form:
    action: str
    method: str
    hidden: list[tuple[str, str]] = field(default_factory=list)
    buttons: list[Button] = field(default_factory=list)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []
        self._button: Button | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.forms.append(Form(a.get("action") or "", (a.get("method") or "get").lower()))
        elif tag == "input" and a.get("type") == "hidden":
            self.forms[-1].hidden.append((a["name"] or "", a.get("value") or ""))
        elif tag == "button":
            self._button = Button(a.get("name"), a.get("value"))
            self.forms[-1].buttons.append(self._button)

    def handle_endtag(self, tag: str) -> None:
        if tag == "button" and self._button:
            self._button.text = " ".join(self._button.text.split())
            self._button = None

    def handle_data(self, data: str) -> None:
        if self._button is not None:
            self._button.text += data


def page_form(response) -> Form:
    assert response.status_code == 200, response.data
    assert response.mimetype == "text/html"
    parser = _Page()
    parser.feed(response.get_data(as_text=True))
    assert len(parser.forms) == 1
    return parser.forms[0]


def press(client: FlaskClient, form: Form, button_text: str):
    """POST the form as pressing the button whose accessible name contains ``button_text``."""
    button = next(b for b in form.buttons if button_text in b.text)
    data = list(form.hidden)
    if button.name:
        data.append((button.name, button.value or ""))
    assert form.method == "post"
    return client.post(form.action, base_url=BASE, data=MultiDict(data))


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    return verifier, challenge.decode()


def redirect_params(response, mode: str = "fragment") -> dict[str, str]:
    assert response.status_code == 302, response.data
    parts = urlsplit(response.headers["Location"])
    raw = parts.fragment if mode == "fragment" else parts.query
    return {k: v[0] for k, v in parse_qs(raw).items()}


@dataclass
class SignIn:
    """One authorization request of the SPA and what came back."""

    client: FlaskClient
    redirect_uri: str = SPA
    mode: str = "fragment"
    verifier: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def start(self, **extra: str):
        self.verifier, challenge = pkce()
        self.params = {
            "client_id": SPA_CLIENT_ID,
            "response_type": "code",
            "redirect_uri": self.redirect_uri,
            "scope": API_SCOPES,
            "response_mode": self.mode,
            "state": secrets.token_urlsafe(8),
            "nonce": secrets.token_urlsafe(8),
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "client_info": "1",
            **extra,
        }
        params = {k: v for k, v in self.params.items() if v is not None}
        return self.client.get(f"{AUTHORIZE}?{urlencode(params)}", base_url=BASE)

    def code_from(self, response) -> str:
        params = redirect_params(response, self.mode)
        assert response.headers["Location"].startswith(self.redirect_uri)
        assert params["state"] == self.params["state"]
        return params["code"]

    def redeem(self, code: str, origin: str | None = SPA_ORIGIN, **extra: str):
        data = {
            "client_id": SPA_CLIENT_ID,
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": self.verifier,
            "scope": API_SCOPES,
            "client_info": "1",
            **extra,
        }
        headers = {"Origin": origin} if origin else {}
        return self.client.post(TOKEN_PATH, base_url=BASE, data=data, headers=headers)

    def sign_in(self, user: str = "Adele Vance", **extra: str) -> str:
        """Pick ``user`` on the page (and approve if asked); returns the code."""
        response = press(self.client, page_form(self.start(**extra)), user)
        if response.status_code == 200:  # the MFA step-up page
            response = press(self.client, page_form(response), "Approve")
        return self.code_from(response)


def refresh(client: FlaskClient, token: str, origin: str | None = SPA_ORIGIN):
    data = {"client_id": SPA_CLIENT_ID, "grant_type": "refresh_token", "refresh_token": token,
            "scope": API_SCOPES}  # fmt: skip
    headers = {"Origin": origin} if origin else {}
    return client.post(TOKEN_PATH, base_url=BASE, data=data, headers=headers)


@pytest.fixture
def spa(dt_client: FlaskClient) -> SignIn:
    return SignIn(dt_client)


# --- discovery and CORS ----------------------------------------------------------------------
def test_discovery_keys_and_token_answer_cross_origin(dt_client: FlaskClient) -> None:
    origin = {"Origin": "http://127.0.0.1:61234"}
    body = dt_client.get(DISCOVERY, base_url=BASE, headers=origin)
    assert body.get_json()["authorization_endpoint"] == f"{BASE}{AUTHORIZE}"
    assert body.get_json()["end_session_endpoint"] == f"{BASE}{LOGOUT}"
    for response in (body, dt_client.get(KEYS, base_url=BASE, headers=origin),
                     dt_client.post(TOKEN_PATH, base_url=BASE, headers=origin, data={})):  # fmt: skip
        assert response.headers["Access-Control-Allow-Origin"] == origin["Origin"]
        assert "Origin" in response.headers["Vary"]
    preflight = dt_client.options(TOKEN_PATH, base_url=BASE, headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,client-request-id",
    })  # fmt: skip
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == origin["Origin"]
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Headers"] == "content-type,client-request-id"
    # No Origin, no CORS headers; and the Graph stand-in is not a CORS endpoint.
    assert "Access-Control-Allow-Origin" not in dt_client.get(KEYS, base_url=BASE).headers
    assert "Access-Control-Allow-Origin" not in dt_client.get("/healthz", headers=origin).headers


# --- the full code + PKCE flow ---------------------------------------------------------------
def test_sign_in_page_then_code_then_tokens(spa: SignIn, dt_client: FlaskClient) -> None:
    page = spa.start()
    assert page.headers["X-Frame-Options"] == "DENY"
    form = page_form(page)
    names = [b.text for b in form.buttons]
    assert len(names) == len(DISPLAY_NAMES)
    for display_name, name in zip(DISPLAY_NAMES, names, strict=True):
        assert display_name in name
    response = press(dt_client, form, "Adele Vance")
    code = spa.code_from(response)
    assert "devtenant_session" in response.headers["Set-Cookie"]
    assert "SameSite=None" in response.headers["Set-Cookie"] and "Secure" in response.headers["Set-Cookie"]
    client_info = redirect_params(response)["client_info"]

    tokens = spa.redeem(code)
    assert tokens.status_code == 200, tokens.get_json()
    assert tokens.headers["Access-Control-Allow-Origin"] == SPA_ORIGIN
    body = tokens.get_json()
    assert body["token_type"] == "Bearer"
    assert body["scope"].split()[0] == f"api://{API_CLIENT_ID}/{API_SCOPE}"
    assert 86000 < body["refresh_token_expires_in"] <= 24 * 3600
    assert body["client_info"] == client_info
    info = json.loads(base64.urlsafe_b64decode(body["client_info"] + "=="))
    id_token = claims_of(body["id_token"])
    assert info == {"uid": id_token["oid"], "utid": TENANT_ID}
    assert id_token["iss"] == f"{BASE}/{TENANT_ID}/v2.0"
    assert id_token["aud"] == SPA_CLIENT_ID
    assert id_token["nonce"] == spa.params["nonce"]
    assert id_token["name"] == "Adele Vance"
    assert id_token["preferred_username"] == "adele@flaskobodev.onmicrosoft.com"
    assert id_token["tid"] == TENANT_ID and id_token["ver"] == "2.0"
    assert id_token["sub"] and id_token["iat"] < id_token["exp"]
    access = claims_of(body["access_token"])
    assert access["aud"] == API_CLIENT_ID
    assert access["scp"] == API_SCOPE
    assert access["azp"] == SPA_CLIENT_ID and access["azpacr"] == "0"
    assert access["oid"] == id_token["oid"] and access["tid"] == TENANT_ID
    assert access["amr"] == ["pwd"]
    assert body["refresh_token"]
    counters = dt_client.get("/_devtenant/counters").get_json()
    assert counters["token"]["authorization_code"] == 1 and counters["token"]["errors"] == 0


def test_query_mode_and_loopback_redirect_uris_on_any_port(dt_client: FlaskClient) -> None:
    for redirect_uri in ("http://127.0.0.1:54321/", "http://localhost:8000/", "https://localhost:8444/"):
        spa = SignIn(dt_client, redirect_uri=redirect_uri, mode="query")
        code = spa.sign_in("Megan Bowen", prompt="login")  # past the first one's session
        origin = redirect_uri.rstrip("/")
        assert spa.redeem(code, origin=origin).status_code == 200
    # Only http loopback URIs get any port; path and scheme still have to match.
    for unregistered in (
        "https://localhost:9999/",
        "http://127.0.0.1:54321/other",
        "https://127.0.0.1:5173/",
    ):
        page = SignIn(dt_client, redirect_uri=unregistered).start()
        assert page.status_code == 400 and "AADSTS50011" in page.get_data(as_text=True)


def test_login_hint_focuses_that_user(spa: SignIn) -> None:
    html = spa.start(login_hint="nestor@flaskobodev.onmicrosoft.com").get_data(as_text=True)
    focused = html[: html.index("autofocus")]
    assert focused.rsplit('value="', 1)[1].startswith("nestor")


def test_form_post_response_mode(dt_client: FlaskClient) -> None:
    spa = SignIn(dt_client, mode="form_post")
    response = press(dt_client, page_form(spa.start()), "Adele Vance")
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and f'action="{SPA}"' in html and 'name="code"' in html


# --- token endpoint rules for the SPA client-type -----------------------------------------------
def test_refresh_tokens_rotate_keep_24h_expiry_and_need_origin(spa: SignIn, dt_client: FlaskClient) -> None:
    first = spa.redeem(spa.sign_in()).get_json()
    second = refresh(dt_client, first["refresh_token"])
    assert second.status_code == 200, second.get_json()
    rotated = second.get_json()
    assert rotated["refresh_token"] != first["refresh_token"]
    assert rotated["refresh_token_expires_in"] <= first["refresh_token_expires_in"]
    assert claims_of(rotated["access_token"])["azp"] == SPA_CLIENT_ID
    assert "nonce" not in claims_of(rotated["id_token"])
    old = refresh(dt_client, first["refresh_token"])
    assert_entra_error(old, 400, "invalid_grant", 70000)
    same_origin = refresh(dt_client, rotated["refresh_token"], origin=None)
    assert_entra_error(same_origin, 400, "invalid_request", 9002327)
    assert refresh(dt_client, rotated["refresh_token"]).status_code == 200
    assert dt_client.get("/_devtenant/counters").get_json()["token"]["refresh_token"] == 4


def test_code_is_single_use(spa: SignIn) -> None:
    code = spa.sign_in()
    assert spa.redeem(code).status_code == 200
    assert_entra_error(spa.redeem(code), 400, "invalid_grant", 54005)


def test_wrong_or_missing_code_verifier(spa: SignIn) -> None:
    code = spa.sign_in()
    assert_entra_error(spa.redeem(code, code_verifier=pkce()[0]), 400, "invalid_grant", 501481)
    assert_entra_error(spa.redeem(code, code_verifier=""), 400, "invalid_request", 900144)
    assert spa.redeem(code).status_code == 200  # failed attempts did not use it up


def test_codes_are_redeemed_cross_origin_only(spa: SignIn) -> None:
    code = spa.sign_in()
    body = assert_entra_error(spa.redeem(code, origin=None), 400, "invalid_request", 9002327)
    assert (
        "Tokens issued for the 'Single-Page Application' client-type may only be redeemed via "
        "cross-origin requests." in body["error_description"]
    )
    assert_entra_error(spa.redeem(code, origin="https://evil.example"), 400, "invalid_request", 9002327)
    assert spa.redeem(code).status_code == 200


def test_code_is_bound_to_redirect_uri_client_and_lifetime(spa: SignIn, dt_app: Flask) -> None:
    code = spa.sign_in()
    assert_entra_error(spa.redeem(code, redirect_uri="http://127.0.0.1:5173/"), 400, "invalid_grant", 500112)
    other = spa.redeem(code, client_id=API_CLIENT_ID)  # a confidential client without credentials
    assert other.status_code == 401 and other.get_json()["error"] == "invalid_client"
    assert_entra_error(spa.redeem("not-a-code"), 400, "invalid_grant", 9002313)
    with dt_app.app_context():
        current().find_code(code).expires_at = time.time() - 1
    assert_entra_error(spa.redeem(code), 400, "invalid_grant", 70008)


# --- authorization endpoint errors -------------------------------------------------------------
def test_untrusted_redirects_get_an_error_page(spa: SignIn, dt_client: FlaskClient) -> None:
    page = SignIn(dt_client, redirect_uri="https://evil.example/").start()
    assert page.status_code == 400 and "Location" not in page.headers
    assert "AADSTS50011" in page.get_data(as_text=True)
    unknown = spa.start(client_id="11111111-2222-3333-4444-555555555555")
    assert unknown.status_code == 400 and "AADSTS700016" in unknown.get_data(as_text=True)
    missing = dt_client.get(AUTHORIZE, base_url=BASE)
    assert missing.status_code == 400 and "AADSTS900144" in missing.get_data(as_text=True)


@pytest.mark.parametrize(
    ("extra", "error", "code"),
    [
        ({"code_challenge": None, "code_challenge_method": None}, "invalid_request", 9002325),
        ({"code_challenge_method": "plain"}, "invalid_request", 90100),
        ({"response_type": "token"}, "unsupported_response_type", 700054),
        ({"scope": "api://nope/x openid"}, "invalid_resource", 500011),
        ({"scope": f"api://{API_CLIENT_ID}/other"}, "invalid_scope", 650053),
        ({"prompt": "sometimes"}, "invalid_request", 90100),
    ],
)
def test_request_errors_go_back_to_the_redirect_uri(spa: SignIn, extra, error: str, code: int) -> None:
    params = redirect_params(spa.start(**extra))
    assert params["error"] == error
    assert params["error_description"].startswith(f"AADSTS{code}: ")
    assert params["state"] == spa.params["state"]


# --- MFA step-up ------------------------------------------------------------------------------
def test_mfa_user_approves_and_the_apis_obo_succeeds(spa: SignIn, dt_client, dt_token: TokenEndpoint) -> None:
    chosen = press(dt_client, page_form(spa.start()), "Alex Wilber")
    approve = page_form(chosen)
    assert [b.text for b in approve.buttons] == ["Approve"]
    code = spa.code_from(press(dt_client, approve, "Approve"))
    body = spa.redeem(code).get_json()
    access_token = body["access_token"]
    assert claims_of(access_token)["amr"] == ["pwd", "mfa"]
    # The API's OBO (Conditional Access requires MFA for alex) sees the SPA's amr.
    obo = dt_token.obo(access_token)
    assert obo.status_code == 200, obo.get_json()
    assert "mfa" in claims_of(obo.get_json()["access_token"])["amr"]
    refreshed = refresh(dt_client, body["refresh_token"]).get_json()
    assert claims_of(refreshed["access_token"])["amr"] == ["pwd", "mfa"]


def test_mfa_can_move_from_sign_in_to_the_obo(spa: SignIn, dt_client, dt_token: TokenEndpoint) -> None:
    """``/_devtenant/mfa`` ``at_sign_in: false``: alex signs in with a password alone, and
    the OBO (Conditional Access on Graph) answers the claims challenge an SPA must meet."""
    assert dt_client.post("/_devtenant/mfa", json={"at_sign_in": "no"}).status_code == 400
    assert dt_client.post("/_devtenant/mfa", json={"at_sign_in": False}).get_json() == {"at_sign_in": False}
    access_token = spa.redeem(spa.sign_in("Alex Wilber")).get_json()["access_token"]
    assert claims_of(access_token)["amr"] == ["pwd"]
    obo = dt_token.obo(access_token)
    assert obo.status_code == 400 and "capolids" in obo.get_json()["claims"]
    approve = page_form(spa.start(claims=CAPOLIDS))  # the challenge: the session steps up
    assert [b.text for b in approve.buttons] == ["Approve"]
    stepped_up = spa.redeem(spa.code_from(press(dt_client, approve, "Approve"))).get_json()
    assert dt_token.obo(stepped_up["access_token"]).status_code == 200
    assert dt_client.get("/_devtenant/mfa").get_json() == {"at_sign_in": False}


def test_claims_challenge_steps_up_any_user(spa: SignIn, dt_client: FlaskClient) -> None:
    approve = page_form(press(dt_client, page_form(spa.start(claims=CAPOLIDS)), "Adele Vance"))
    assert [b.text for b in approve.buttons] == ["Approve"]
    code = spa.code_from(press(dt_client, approve, "Approve"))
    access = claims_of(spa.redeem(code).get_json()["access_token"])
    assert access["amr"] == ["pwd", "mfa"]
    # Client capabilities alone (msal-browser's clientCapabilities) are no challenge.
    capabilities = json.dumps({"access_token": {"xms_cc": {"values": ["CP1"]}}})
    other = SignIn(dt_client)
    response = press(dt_client, page_form(other.start(claims=capabilities, prompt="login")), "Adele Vance")
    assert claims_of(other.redeem(other.code_from(response)).get_json()["access_token"])["amr"] == ["pwd"]


def test_a_session_without_mfa_steps_up_on_a_claims_challenge(spa: SignIn, dt_client: FlaskClient) -> None:
    spa.redeem(spa.sign_in("Adele Vance"))
    silent = redirect_params(spa.start(prompt="none", claims=CAPOLIDS))
    assert silent["error"] == "interaction_required"
    assert silent["error_description"].startswith("AADSTS50076: ")
    approve = page_form(spa.start(claims=CAPOLIDS))  # no prompt: straight to Approve
    assert [b.text for b in approve.buttons] == ["Approve"]
    code = spa.code_from(press(dt_client, approve, "Approve"))
    assert claims_of(spa.redeem(code).get_json()["access_token"])["amr"] == ["pwd", "mfa"]
    # Now the session did MFA: the same challenge is answered silently.
    assert spa.code_from(spa.start(prompt="none", claims=CAPOLIDS))


# --- session, prompt, logout -------------------------------------------------------------------
def test_prompt_none_without_session_is_login_required(spa: SignIn) -> None:
    params = redirect_params(spa.start(prompt="none"))
    assert params["error"] == "login_required"
    assert params["error_description"].startswith("AADSTS50058: ")
    assert params["state"] == spa.params["state"] and "code" not in params


def test_session_signs_in_silently_unless_prompted(spa: SignIn) -> None:
    spa.redeem(spa.sign_in("Nestor Wilke"))
    silent = spa.start(prompt="none", login_hint="nestor@flaskobodev.onmicrosoft.com")
    tokens = spa.redeem(spa.code_from(silent)).get_json()
    assert claims_of(tokens["id_token"])["name"] == "Nestor Wilke"
    assert claims_of(tokens["id_token"])["nonce"] == spa.params["nonce"]
    assert spa.code_from(spa.start())  # no prompt: single sign-on too
    assert page_form(spa.start(prompt="login")).buttons  # prompt=login: the page again
    assert page_form(spa.start(prompt="select_account")).buttons
    other = redirect_params(spa.start(prompt="none", login_hint="adele"))
    assert other["error"] == "login_required"


def test_logout_ends_the_session_and_redirects_only_to_registered_uris(spa: SignIn, dt_client) -> None:
    spa.redeem(spa.sign_in())
    out = dt_client.get(f"{LOGOUT}?{urlencode({'post_logout_redirect_uri': SPA, 'state': 'bye'})}",
                        base_url=BASE)  # fmt: skip
    assert out.status_code == 302 and out.headers["Location"] == f"{SPA}?state=bye"
    assert "devtenant_session=;" in out.headers["Set-Cookie"]
    assert redirect_params(spa.start(prompt="none"))["error"] == "login_required"

    for query in (
        {"post_logout_redirect_uri": "https://evil.example/"},
        {"post_logout_redirect_uri": SPA, "client_id": API_CLIENT_ID},  # not the API's URI
        {},
    ):
        page = dt_client.get(f"{LOGOUT}?{urlencode(query)}", base_url=BASE)
        assert page.status_code == 200 and "Location" not in page.headers
        assert "signed out" in page.get_data(as_text=True)

    id_token = spa.redeem(spa.sign_in()).get_json()["id_token"]
    query = {"post_logout_redirect_uri": "http://127.0.0.1:3000/", "id_token_hint": id_token}
    hinted = dt_client.get(f"{LOGOUT}?{urlencode(query)}", base_url=BASE)
    assert hinted.status_code == 302 and hinted.headers["Location"] == "http://127.0.0.1:3000/"


def test_session_cookie_is_per_browser(dt_app: Flask) -> None:
    first, second = dt_app.test_client(), dt_app.test_client()
    SignIn(first).sign_in()
    assert redirect_params(SignIn(second).start(prompt="none"))["error"] == "login_required"
    assert "code" in redirect_params(SignIn(first).start(prompt="none"))


def test_counters_count_authorization_code_grants_and_errors(spa: SignIn, dt_client: FlaskClient) -> None:
    code = spa.sign_in()
    spa.redeem(code)
    spa.redeem(code)
    token = dt_client.get("/_devtenant/counters").get_json()["token"]
    assert token["authorization_code"] == 2 and token["errors"] == 1
