"""Defects a hostile review found, each kept fixed: one user's downstream cookie never
reaches another; a certificate rotated mid-build is not lost; a downstream path cannot
climb out of its base URL; credential files that cannot be read are a 503, logged once;
the managed identity endpoint has a timeout; evict takes GUIDs only."""

from __future__ import annotations

import logging
import time

import pytest
import requests
import responses

from app import create_app
from flask_obo import Settings
from flask_obo.credentials import CertificateFile, FederatedTokenFile, _BoundedSession
from flask_obo.downstream import DownstreamApi
from flask_obo.errors import IdentityProviderUnavailable, UnsafeDownstreamPath
from flask_obo.extension import services_of
from flask_obo.http import build_session
from flask_obo.protector import EntraAccessToken
from flask_obo.settings import DownstreamApiSettings, load_certificate
from tests.support.fake_entra import ADELE, CLIENT_ID, TENANT_ID, settings_env
from tests.unit.test_credentials import jwt_with_exp, pem_file

API = "https://gw.contoso.com/tasks-api"


def test_a_cookie_set_for_one_user_never_goes_out_with_another_users_request():
    session = build_session([API])
    with responses.RequestsMock() as rsps:
        rsps.get(f"{API}/me", headers={"Set-Cookie": "session=alice-session; Path=/"})
        tokens = iter(["ALICE", "BOB"])
        api = DownstreamApi("tasks", DownstreamApiSettings(API, ("api://tasks/.default",)), session,
                            lambda scopes, claims: next(tokens))
        api.get("/me")
        api.get("/me")
        bob = rsps.calls[1].request
    assert bob.headers["Authorization"] == "Bearer BOB"
    assert "Cookie" not in bob.headers


@pytest.mark.parametrize("path", [
    "/../admin-api/secrets", "/%2e%2e/admin-api", "/a/./b", "/a/%2E/b", "/me/..",
    "https://evil.example/me", "me",
    "/..\\admin-api", "/a\\..\\..\\admin-api", "/..%5cadmin-api", "/..%5Cadmin-api",  # IIS, proxies
    "/..;/admin-api", "/me;jsessionid=1", "/users/me;/..;/..;/admin",  # Tomcat and Spring path parameters
    "/%252e%252e/admin-api", "/%25252e%25252e/admin-api", "/a/%252E/b",  # decoded twice downstream
    "/%2525252e%2525252e/admin",  # still encoded after every round: refused, not guessed
    "/me%0d%0aX-Injected:%201", "/me%00",
    # a leading // is not a host here: urllib3 sends //%2e%2e/ as //../, which slash merging resolves
    "//%2e%2e/admin-api", "//../admin-api", "//..;/admin-api", "//..\\admin-api", "//%252e%252e/admin",
    "/me\r\nX-Injected: 1", "/a\t/b",  # raw control characters, which urlsplit would drop unseen
    "/%c0%ae%c0%ae/admin-api", "/%C0%AE/b",  # overlong UTF-8 (not UTF-8 at all): old servers' "."
    "/%u002e%u002e/admin-api", "/%U002E/b",  # IIS's %u escapes
    "/\uff0e\uff0e/admin-api", "/%EF%BC%8E%EF%BC%8E/admin-api", "/\u2025/admin-api",  # NFKC ".."
])
def test_a_path_cannot_leave_the_base_url(path):
    acquired: list[object] = []
    session = requests.Session()
    session.request = lambda *a, **k: pytest.fail("no request may be sent")  # type: ignore[method-assign]
    api = DownstreamApi("tasks", DownstreamApiSettings(API, ("api://tasks/.default",)), session,
                        lambda scopes, claims: acquired.append(scopes) or "TOKEN")
    with pytest.raises(UnsafeDownstreamPath) as raised:
        api.get(path)
    assert acquired == []  # refused before any token was acquired
    assert isinstance(raised.value, ValueError) and raised.value.status == 400


def test_a_paths_verdict_is_the_same_every_time_whatever_its_query():
    """The path guard's verdict is kept per path (without its query): a refused path stays
    refused, and a query never makes one pass or fail."""
    sent: list[str] = []
    session = requests.Session()
    session.request = lambda method, url, **k: sent.append(url) or _ok()  # type: ignore[method-assign]
    api = DownstreamApi("tasks", DownstreamApiSettings(API, ("api://tasks/.default",)), session,
                        lambda scopes, claims: "TOKEN")
    for _ in range(2):
        for path in ("/%2e%2e/admin-api", "/%2e%2e/admin-api?x=1"):
            with pytest.raises(UnsafeDownstreamPath):
                api.get(path)
        api.get("/me?$filter=a/../b")  # a query is data, not a path
        api.get("/me")
    assert sent == [f"{API}/me?$filter=a/../b", f"{API}/me"] * 2


def _ok() -> requests.Response:
    response = requests.Response()
    response.status_code = 200
    return response


@pytest.mark.parametrize("path", ["/me", "/users/adele%40contoso.com", "/me/photo/$value",
                                  "/groups?$filter=startswith(displayName,'a.b')", "/a.b/..c/d..",
                                  "/sites/root:/drive:", "/users/jos%C3%A9@contoso.com", "/drive/root:/…"])
def test_ordinary_paths_still_go_out(path):
    with responses.RequestsMock() as rsps:
        rsps.get(f"{API}{path.split('?')[0]}", json={})
        api = DownstreamApi("tasks", DownstreamApiSettings(API, ("api://tasks/.default",)),
                            build_session([API]), lambda scopes, claims: "TOKEN")
        assert api.get(path).status_code == 200


def test_an_unsafe_path_built_from_a_callers_input_is_a_json_400_not_a_500(app):
    @app.get("/echo/<path:rest>")
    def echo(rest: str):  # a route that (unwisely) puts its caller's input in a downstream path
        return {"status": services_of(app).downstream_apis["graph"].get("/users/" + rest).status_code}

    response = app.test_client().get("/echo/..%3B/..%3B/admin")
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_request"


def test_a_certificate_rotated_while_an_app_is_built_is_picked_up_by_the_next_build(tmp_path, store, entra):
    path = pem_file(tmp_path / "api.pem")
    env = settings_env(AZURE_CLIENT_CERTIFICATE_PATH=str(path))
    del env["AZURE_CLIENT_SECRET"]
    app = create_app(Settings.from_env(env), store=store)
    tokens = services_of(app).tokens
    credential = tokens._credential
    assert isinstance(credential, CertificateFile)
    built: list[int] = []
    original = credential.for_msal

    def rotating_for_msal(*args):  # another thread reloads the rotated file right after the version was read
        value = original(*args)
        if not built:
            pem_file(tmp_path / "next.pem").replace(path)
            credential.reload()
        built.append(credential.version)
        return value

    credential.for_msal = rotating_for_msal  # type: ignore[method-assign]
    session = tokens.memory.session("0" * 64)
    user = EntraAccessToken({"oid": ADELE, "tid": TENANT_ID}, "raw")
    first = tokens._app(session, user)
    assert session.bench.credential_version == 0 and credential.version == 1  # stamped with what it read
    assert tokens._app(session, user) is not first  # so the next build uses the new certificate


def test_an_unreadable_federated_token_is_a_503(tmp_path):
    path = tmp_path / "token"
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(IdentityProviderUnavailable):
        FederatedTokenFile(str(path)).assertion()


def test_a_bad_certificate_file_is_reported_once_per_change(tmp_path, caplog):
    path = pem_file(tmp_path / "api.pem")
    credential = CertificateFile(str(path), None, load_certificate(str(path), None), CLIENT_ID)
    path.write_text("half-written")
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        credential.for_msal()
    assert sum("not reloaded" in r.getMessage() for r in caplog.records) == 1


def test_the_managed_identity_endpoint_gets_a_timeout():
    with responses.RequestsMock() as rsps:
        rsps.get("http://169.254.169.254/metadata/identity/oauth2/token", json={})
        _BoundedSession((3.0, 10.0)).get("http://169.254.169.254/metadata/identity/oauth2/token")
        assert rsps.calls[0].request.req_kwargs["timeout"] == (3.0, 10.0)


@pytest.mark.parametrize("oid, tid", [("adele", TENANT_ID), (ADELE, "x"), (ADELE, "eyJ0eXAiOiJKV1Qi.x.y")])
def test_evict_refuses_what_is_not_a_guid_in_one_line(app, oid, tid):
    result = app.test_cli_runner().invoke(args=["token-cache", "evict", "--oid", oid, "--tid", tid])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "must be a GUID" in lines[0]
    assert "eyJ" not in result.output  # what was typed is not echoed: it may be a token


def test_a_federated_token_is_never_used_past_its_exp(tmp_path):
    path = tmp_path / "token"
    path.write_text(jwt_with_exp(time.time() + 30))  # inside the one-minute margin
    credential = FederatedTokenFile(str(path))
    first = credential.assertion()
    path.write_text(jwt_with_exp(time.time() + 3600, "fresh"))
    assert credential.assertion() != first
