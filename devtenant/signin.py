"""Browser sign-in as Entra ID does it for SPAs: ``/authorize`` (code + PKCE) and ``/logout``.

Paths are Entra's: ``/<tenant>/oauth2/v2.0/authorize`` and ``/<tenant>/oauth2/v2.0/logout``
(both advertised by discovery). Authlib's authorization server validates the request
(client, redirect URI, ``response_type=code``, scope, PKCE) and
:class:`devtenant.grants.SpaAuthorizationCodeGrant` issues the code; this module adds
the parts a browser sees:

* A sign-in page with one button per directory user (its accessible name holds the
  display name, e.g. "Adele Vance"): plain HTML form posts, no JavaScript, no password.
* MFA step-up: if the user has the ``mfa_required`` flag (unless the test switch
  ``/_devtenant/mfa`` turned ``at_sign_in`` off: then only the OBO asks for it), or the
  request carries a claims challenge (``claims`` asking for more than ``xms_cc`` client
  capabilities, e.g. the ``capolids`` challenge the API relays from a failed OBO), a
  second page asks to "Approve". Tokens then carry ``amr: ["pwd", "mfa"]`` (else
  ``["pwd"]``): the SPA's access token for the API carries it, and the OBO grant's MFA
  policy reads it there.
* A session cookie (``devtenant_session``; ``SameSite=None; Secure`` so msal-browser's
  hidden iframe sends it): with one, ``prompt=none`` or no prompt signs in silently
  (unless ``login_hint`` names someone else, or a step-up is needed that the session did
  not do). ``prompt=none`` without one redirects with ``error=login_required``
  (``interaction_required`` when only the step-up is missing); ``prompt=login``,
  ``select_account``, ``consent`` and ``create`` always show the page.
* ``response_mode`` ``query`` (the default), ``fragment`` or ``form_post``; ``state``,
  ``nonce`` (into the ID token), ``login_hint`` (focuses that user's button) and
  ``client_info=1`` (adds ``client_info`` to the response) are honoured.
* Errors before the redirect URI is trusted (unknown client AADSTS700016, redirect URI
  not registered AADSTS50011) are an error page, never a redirect; later errors go back
  to the redirect URI as ``error``/``error_description``/``state``.

Registered redirect URIs (directory.json, the SPA app's ``spa.redirectUris``, Entra's
'Single-Page Application' platform):

* ``http://localhost:5173/`` and ``http://127.0.0.1:5173/``: the SPA under ``make run``.
* ``https://localhost:8444/``: the SPA behind the compose stack's nginx (its published
  HTTPS port).
* As Entra does for loopback redirect URIs (RFC 8252 section 7.3), an ``http://localhost``
  or ``http://127.0.0.1`` URI matches on any port, so ``http://127.0.0.1:<port>/`` works
  for tests and other dev servers. Token requests must come from the origin of one
  of these (their ``Origin`` header), as SPA code redemption is cross-origin only.

``/logout`` ends the session and redirects to ``post_logout_redirect_uri`` (plus
``state``) only if it is registered for the client (named by ``client_id`` or by
``id_token_hint``'s audience; any client when neither is given); otherwise it shows a
"signed out" page.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from authlib.common.urls import add_params_to_uri
from authlib.oauth2 import OAuth2Error
from authlib.oidc.core.grants.util import create_response_mode_response
from flask import Blueprint, Response, current_app, redirect, render_template_string, request
from joserfc import jwt
from joserfc.errors import JoseError

from devtenant import errors
from devtenant.authserver import EntraAuthorizationServer
from devtenant.directory import App, User
from devtenant.entra import _check_tenant
from devtenant.grants import RESPONSE_MODES, is_claims_challenge
from devtenant.runtime import Principal, SignInSession, base_url, current

bp = Blueprint("signin", __name__)
bp.url_value_preprocessor(_check_tenant)

SESSION_COOKIE = "devtenant_session"
PROMPTS = frozenset({"none", "login", "select_account", "consent", "create"})
#: Form fields of the sign-in pages themselves (everything else is the OAuth request).
PAGE_FIELDS = frozenset({"user", "step"})
PASSWORD = ("pwd",)
PASSWORD_AND_MFA = ("pwd", "mfa")
PAGE_HEADERS = {
    "Cache-Control": "no-store, no-cache",
    "X-Frame-Options": "DENY",  # like Entra: an interactive page never renders in an iframe
    "Content-Security-Policy": "frame-ancestors 'none'",
}

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} | {{ tenant }}</title>
<style>
 body { font-family: system-ui, sans-serif; background: #f2f2f2; margin: 0; }
 main { max-width: 26rem; margin: 3rem auto; background: #fff; padding: 2rem; box-shadow: 0 2px 6px #0003; }
 .brand { color: #555; font-size: .85rem; margin: 0 0 1rem; }
 ul { list-style: none; padding: 0; }
 li { margin: .4rem 0; }
 button { width: 100%; text-align: left; padding: .7rem 1rem; font-size: 1rem; cursor: pointer;
          background: #fff; border: 1px solid #8a8886; }
 button:hover, button:focus { background: #f3f2f1; }
 button.primary { background: #0067b8; color: #fff; text-align: center; border: 0; }
 .upn, .note { display: block; color: #605e5c; font-size: .85rem; }
 .error { color: #a4262c; white-space: pre-wrap; }
</style>
</head>
<body>
<main>
<p class="brand">{{ tenant }}: devtenant, a local stand-in for Microsoft Entra ID</p>
{% if kind == "pick" %}
<h1>Pick an account</h1>
<p>to continue to <strong>{{ client.display_name }}</strong>. No passwords here: choose who signs in.</p>
<form method="post" action="{{ action }}">
{% for name, value in hidden %}<input type="hidden" name="{{ name }}" value="{{ value }}">
{% endfor %}<ul>
{% for user in users %}<li><button type="submit" name="user" value="{{ user.short }}"
  {%- if user == hinted %} autofocus{% endif %}>{{ user.display_name }}<span class="upn">{{ user.upn }}
  {%- if user.mfa_required %} (multi-factor authentication){% endif %}</span></button></li>
{% endfor %}</ul>
</form>
{% elif kind == "approve" %}
<h1>Approve sign in request</h1>
<p>{{ user.display_name }} <span class="upn">{{ user.upn }}</span></p>
<p>{{ reason }} Approving stands in for the Authenticator app's notification.</p>
<form method="post" action="{{ action }}">
{% for name, value in hidden %}<input type="hidden" name="{{ name }}" value="{{ value }}">
{% endfor %}<input type="hidden" name="user" value="{{ user.short }}">
<button class="primary" type="submit" name="step" value="approve" autofocus>Approve</button>
</form>
{% elif kind == "signed_out" %}
<h1>You signed out of your account</h1>
<p>It's a good idea to close all browser windows.</p>
{% else %}
<h1>Sorry, but we're having trouble signing you in.</h1>
<p class="error">{{ message }}</p>
{% endif %}
</main>
</body>
</html>
"""


def _page(kind: str, title: str, status: int = 200, **context: Any) -> Response:
    html = render_template_string(
        PAGE, kind=kind, title=title, tenant=current().directory.tenant_name, **context
    )
    return Response(html, status=status, headers=PAGE_HEADERS, mimetype="text/html")


def _error_page(error: errors.EntraError) -> Response:
    """Shown instead of redirecting when the redirect URI cannot be trusted."""
    body = error.body(base_url(), request.headers.get("client-request-id"))
    return _page("error", "Sign in", status=400, message=body["error_description"])


def _respond(status: int, body: Any, headers: Iterable[tuple[str, str]]) -> Response:
    response = Response(body, status=status, headers=list(headers))
    response.headers["Cache-Control"] = "no-store, no-cache"
    return response


def _redirect_error(redirect_uri: str, mode: str, error: OAuth2Error, state: str | None) -> Response:
    entra = errors.as_entra_error(error)
    body = entra.body(base_url(), request.headers.get("client-request-id"))
    params = [("error", entra.error), ("error_description", body["error_description"])]
    if state:
        params.append(("state", state))
    return _respond(*create_response_mode_response(redirect_uri, params, mode))


def _client_and_redirect_uri() -> tuple[App, str]:
    """Validated before anything is redirected: an error here is a page."""
    values = request.values
    client_id = values.get("client_id")
    if not client_id:
        raise errors.missing_parameter("client_id")
    directory = current().directory
    client = directory.client(client_id)
    if client is None:
        raise errors.unknown_application(client_id, directory.tenant_name)
    redirect_uri = values.get("redirect_uri") or client.get_default_redirect_uri() or ""
    if not client.check_redirect_uri(redirect_uri):
        raise errors.redirect_uri_mismatch(redirect_uri, client.client_id)
    mode = values.get("response_mode") or "query"
    if mode not in RESPONSE_MODES:
        raise errors.invalid_parameter("response_mode", f"Supported: {', '.join(RESPONSE_MODES)}.")
    return client, redirect_uri


def _check_request_shape() -> None:
    response_type = request.values.get("response_type")
    if not response_type:
        raise errors.missing_parameter("response_type")
    if response_type != "code":
        raise errors.EntraError(
            "unsupported_response_type",
            700054,
            f"response_type '{response_type}' is not enabled for the application.",
        )
    prompt = request.values.get("prompt")
    if prompt and prompt not in PROMPTS:
        raise errors.invalid_parameter("prompt", f"Supported: {', '.join(sorted(PROMPTS))}.")


def _needs_step_up(user: User, challenge: bool) -> bool:
    return challenge or (user.mfa_required and current().mfa_at_sign_in)


def _hinted_user() -> User | None:
    hint = request.values.get("login_hint")
    return current().directory.user(hint) if hint else None


def _hidden_fields() -> list[tuple[str, str]]:
    return [(k, v) for k, v in request.values.items(multi=True) if k not in PAGE_FIELDS]


def _approve_page(user: User, challenge: bool) -> Response:
    reason = (
        "The application asked for a stronger sign-in (claims challenge)."
        if challenge
        else "Your organisation requires multi-factor authentication."
    )
    return _page(
        "approve", "Approve sign in request", user=user, reason=reason,
        action=request.path, hidden=_hidden_fields(),
    )  # fmt: skip


def _issue(grant: Any, principal: Principal) -> Response:
    """Hand the code to the grant, which answers in the request's response_mode."""
    return _respond(*grant.create_authorization_response(grant.redirect_uri, principal))


@bp.route("/<tenant>/oauth2/v2.0/authorize", methods=["GET", "POST"])
def authorize(tenant: str) -> Response:
    try:
        client, redirect_uri = _client_and_redirect_uri()
    except errors.EntraError as error:
        return _error_page(error)
    mode = request.values.get("response_mode") or "query"
    state = request.values.get("state")
    try:
        _check_request_shape()
        server: EntraAuthorizationServer = current_app.extensions["devtenant.authserver"]
        grant = server.get_consent_grant(end_user=None)  # client, redirect, scope, PKCE
        return _sign_in(grant, client)
    except OAuth2Error as error:
        return _redirect_error(redirect_uri, mode, error, state)


def _sign_in(grant: Any, client: App) -> Response:
    runtime = current()
    values = request.values
    prompt = values.get("prompt")
    challenge = is_claims_challenge(values.get("claims"))
    if request.method == "POST" and "user" in request.form:  # a button on our pages
        user = runtime.directory.user(request.form["user"])
        if user is None:
            raise errors.invalid_parameter("user", "No such user in this directory.")
        if request.form.get("step") == "approve":
            principal = Principal(user, PASSWORD_AND_MFA)
        elif _needs_step_up(user, challenge):
            return _approve_page(user, challenge)
        else:
            principal = Principal(user, PASSWORD)
        runtime.end_session(request.cookies.get(SESSION_COOKIE))
        response = _issue(grant, principal)
        response.set_cookie(
            SESSION_COOKIE, runtime.start_session(principal),
            secure=True, httponly=True, samesite="None", path="/",
        )  # fmt: skip
        return response

    session = runtime.find_session(request.cookies.get(SESSION_COOKIE))
    hinted = _hinted_user()
    if prompt in (None, "none") and session and _session_fits(session, hinted):
        user = session.principal.user
        if not _needs_step_up(user, challenge) or "mfa" in session.principal.amr:
            return _issue(grant, session.principal)  # single sign-on
        if prompt == "none":
            raise errors.mfa_interaction_required(grant.request.devtenant_scope.resource.identifier)
        return _approve_page(user, challenge)
    if prompt == "none":
        raise errors.login_required()
    return _page(
        "pick", "Sign in", client=client, users=runtime.directory.users, hinted=hinted,
        action=request.path, hidden=_hidden_fields(),
    )  # fmt: skip


def _session_fits(session: SignInSession, hinted: User | None) -> bool:
    """A login_hint naming someone else is not answered from this session, nor is a
    session of another tenant's user or one older than the user's revocation."""
    hint = request.values.get("login_hint")
    user = session.principal.user
    runtime = current()
    if runtime.directory.user(user.oid) is not user:
        return False
    revocation = runtime.revocations.get(user.oid)
    if revocation and revocation.revokes(session.auth_time):
        return False
    return not hint or hinted == user


def _logout_clients() -> list[App]:
    """The app(s) whose redirect URIs a post-logout redirect may go to."""
    directory = current().directory
    client_id = request.values.get("client_id")
    if client_id:
        client = directory.client(client_id)
        return [client] if client else []
    hint = request.values.get("id_token_hint")
    if hint:
        try:  # signature only: an expired ID token is a fine hint
            token = jwt.decode(hint, current().keys.public_key_set(), algorithms=["RS256"])
        except (JoseError, ValueError, TypeError):
            return []
        client = directory.client(str(token.claims.get("aud", "")))
        return [client] if client else []
    return list(directory.apps)


@bp.route("/<tenant>/oauth2/v2.0/logout", methods=["GET", "POST"])
def logout(tenant: str) -> Response:
    runtime = current()
    runtime.end_session(request.cookies.get(SESSION_COOKIE))
    target = request.values.get("post_logout_redirect_uri")
    response: Response
    if target and any(app.check_redirect_uri(target) for app in _logout_clients()):
        state = request.values.get("state")
        response = redirect(add_params_to_uri(target, [("state", state)]) if state else target)
        response.headers["Cache-Control"] = "no-store, no-cache"
    else:
        response = _page("signed_out", "Signed out")
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="None")
    return response
