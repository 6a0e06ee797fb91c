"""Entra-shaped token endpoint errors.

Code under test (msal, the API's error mapping) keys off Entra's exact error shape:
``error``, an ``error_description`` that starts with ``AADSTSnnnnn:`` and ends with
Trace ID / Correlation ID / Timestamp lines, ``error_codes``, ``suberror`` and the
``claims`` challenge. Grants raise :class:`EntraError`; plain Authlib errors are
translated by :func:`as_entra_error` so every failure has the same shape.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from authlib.oauth2 import OAuth2Error


class EntraError(OAuth2Error):
    """An OAuth error with Entra's AADSTS code and extras.

    Authlib forbids newlines and quotes in ``description``; Entra messages need both,
    so the message is kept in ``message`` and rendered by :meth:`body`.
    """

    def __init__(
        self,
        error: str,
        code: int,
        message: str,
        status_code: int = 400,
        suberror: str | None = None,
        claims: str | None = None,
    ) -> None:
        super().__init__(error=error, status_code=status_code)
        self.error = error
        self.code = code
        self.message = message
        self.suberror = suberror
        self.claims = claims

    def body(self, base_url: str, correlation_id: str | None = None) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC)
        timestamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
        trace_id = str(uuid.uuid4())
        correlation_id = correlation_id or str(uuid.uuid4())
        description = (
            f"AADSTS{self.code}: {self.message}\r\nTrace ID: {trace_id}\r\n"
            f"Correlation ID: {correlation_id}\r\nTimestamp: {timestamp}"
        )
        body: dict[str, Any] = {
            "error": self.error,
            "error_description": description,
            "error_codes": [self.code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"{base_url}/error?code={self.code}",
        }
        if self.suberror:
            body["suberror"] = self.suberror
        if self.claims:
            body["claims"] = self.claims
        return body


# Fallbacks for errors Authlib raises by itself: (AADSTS code, status, message).
_GENERIC: dict[str, tuple[int, int, str]] = {
    "invalid_client": (
        7000218,
        401,
        "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
    ),
    "invalid_grant": (70000, 400, "The provided grant is invalid or malformed."),
    "invalid_request": (900144, 400, "The request is missing a required parameter."),
    "invalid_scope": (70011, 400, "The provided value for the input parameter 'scope' is not valid."),
    "unauthorized_client": (700016, 400, "The client is not authorized for this grant type."),
    "unsupported_grant_type": (70003, 400, "The app requested an unsupported grant type."),
}


def as_entra_error(error: OAuth2Error) -> EntraError:
    """Translate an Authlib error into the matching Entra error."""
    if isinstance(error, EntraError):
        return error
    name = error.error or "invalid_request"
    code, status, message = _GENERIC.get(name, (90014, 400, "The request is invalid."))
    if name == "unsupported_grant_type":
        message = f"The app requested an unsupported grant type '{getattr(error, 'grant_type', '')}'."
    elif error.description:
        message = f"{message} ({error.description})"
    return EntraError(name, code, message, status_code=status)


def tenant_not_found(tenant: str) -> EntraError:
    return EntraError(
        "invalid_tenant",
        90002,
        f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
        "and are signing into the correct cloud.",
    )


def missing_parameter(name: str) -> EntraError:
    return EntraError(
        "invalid_request",
        900144,
        f"The request body must contain the following parameter: '{name}'.",
    )


def consent_required(client_id: str, client_name: str) -> EntraError:
    return EntraError(
        "invalid_grant",
        65001,
        f"The user or administrator has not consented to use the application with ID "
        f"'{client_id}' named '{client_name}'. Send an interactive authorization request "
        "for this user and resource.",
        suberror="consent_required",
    )


def mfa_required(resource: str, policy_id: str) -> EntraError:
    claims = '{"access_token":{"capolids":{"essential":true,"values":["' + policy_id + '"]}}}'
    return EntraError(
        "interaction_required",
        50079,
        "Due to a configuration change made by your administrator, or because you moved "
        f"to a new location, you must enroll in multi-factor authentication to access "
        f"'{resource}'.",
        claims=claims,
    )


def invalid_client(code: int, message: str) -> EntraError:
    return EntraError("invalid_client", code, message, status_code=401)


# --- authorization code + PKCE (the SPA's sign-in) ------------------------------------


def redirect_uri_mismatch(redirect_uri: str, client_id: str) -> EntraError:
    return EntraError(
        "invalid_request",
        50011,
        f"The redirect URI '{redirect_uri}' specified in the request does not match the "
        f"redirect URIs configured for the application '{client_id}'. Make sure the redirect "
        "URI sent in the request matches one added to your application in the Azure portal. "
        "Navigate to https://aka.ms/redirectUriMismatchError to learn more about how to fix this.",
    )


def unknown_application(client_id: str, tenant_name: str) -> EntraError:
    return EntraError(
        "unauthorized_client",
        700016,
        f"Application with identifier '{client_id}' was not found in the directory "
        f"'{tenant_name}'. This can happen if the application has not been installed by the "
        "administrator of the tenant or consented to by any user in the tenant. You may have "
        "sent your authentication request to the wrong tenant.",
    )


def pkce_required() -> EntraError:
    return EntraError(
        "invalid_request",
        9002325,
        "Proof Key for Code Exchange is required for cross-origin authorization code redemption.",
    )


def invalid_parameter(name: str, detail: str) -> EntraError:
    return EntraError("invalid_request", 90100, f"The '{name}' parameter is empty or not valid. {detail}")


def cross_origin_required() -> EntraError:
    return EntraError(
        "invalid_request",
        9002327,
        "Tokens issued for the 'Single-Page Application' client-type may only be redeemed "
        "via cross-origin requests.",
    )


def code_redeemed() -> EntraError:
    return EntraError(
        "invalid_grant",
        54005,
        "OAuth2 Authorization code was already redeemed, please retry with a new valid code "
        "or use an existing refresh token.",
    )


def code_expired() -> EntraError:
    return EntraError(
        "invalid_grant",
        70008,
        "The provided authorization code or refresh token has expired due to inactivity. "
        "Send a new interactive authorization request for this user and resource.",
    )


def malformed_grant() -> EntraError:
    return EntraError("invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")


def code_verifier_mismatch() -> EntraError:
    return EntraError(
        "invalid_grant",
        501481,
        "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
    )


def login_required() -> EntraError:
    return EntraError(
        "login_required",
        50058,
        "A silent sign-in request was sent but no user is signed in. The cookies used to "
        "represent the user's session were not sent in the request to Azure AD.",
    )


def mfa_interaction_required(resource: str) -> EntraError:
    return EntraError(
        "interaction_required",
        50076,
        "Due to a configuration change made by your administrator, or because you moved to a "
        f"new location, you must use multi-factor authentication to access '{resource}'.",
    )


# --- tenants, workload identity federation, CAE ---------------------------------------


def no_tenant_information() -> EntraError:
    return EntraError(
        "invalid_request",
        50059,
        "No tenant-identifying information found in either the request or implied by any "
        "provided credentials.",
    )


def user_not_in_tenant(upn: str, idp: str, tenant_name: str, client_id: str, client_name: str) -> EntraError:
    """A user of one tenant presented (as an OBO assertion) to another tenant."""
    return EntraError(
        "invalid_grant",
        50020,
        f"User account '{upn}' from identity provider '{idp}' does not exist in tenant "
        f"'{tenant_name}' and cannot access the application '{client_id}'({client_name}) in "
        "that tenant. The account needs to be added as an external user in the tenant first. "
        "Sign out and sign in again with a different Azure Active Directory user account.",
    )


FEDERATION_DOCS = "https://learn.microsoft.com/entra/workload-id/workload-identity-federation"


def no_federated_record(issuer: str, subject: str, audience: str) -> EntraError:
    """No federated identity credential of the app has the assertion's issuer + subject."""
    return invalid_client(
        70021,
        "No matching federated identity record found for presented assertion. "
        f"Assertion Issuer: '{issuer}'. Assertion Subject: '{subject}'. "
        f"Assertion Audience: '{audience}'. {FEDERATION_DOCS}",
    )


def federated_subject_mismatch(subject: str, case_only: bool = False) -> EntraError:
    """A credential of the app has the assertion's issuer, none its subject."""
    if case_only:
        return invalid_client(
            7002138,
            f"No matching federated identity record found for presented assertion subject "
            f"'{subject}'. The subject matches with case-insensitive comparison, but not with "
            f"case-sensitive comparison. Check your federated identity credential Subject, "
            f"Audience and Issuer against the presented assertion. {FEDERATION_DOCS}",
        )
    return invalid_client(
        700213,
        f"No matching federated identity record found for presented assertion subject "
        f"'{subject}'. Check your federated identity credential Subject, Audience and Issuer "
        f"against the presented assertion. {FEDERATION_DOCS}",
    )


def certificate_expired(client_id: str, thumbprint: str) -> EntraError:
    """The assertion is signed with a registered certificate whose validity has ended."""
    return invalid_client(
        7000274,
        "The certificate used to sign the client assertion has expired on application "
        f"'{client_id}'. [Reason - The key was found, but it has expired., Thumbprint of key "
        f"used by client: '{thumbprint}']. Upload a valid certificate to the application.",
    )


def federated_audience_mismatch(audience: str) -> EntraError:
    """A credential matches issuer + subject, but not the assertion's audience."""
    return invalid_client(
        700212,
        f"No matching federated identity record found for presented assertion audience "
        f"'{audience}'. Please check your federated identity credential Subject, Audience and "
        f"Issuer against the presented assertion. {FEDERATION_DOCS}",
    )


def _entra_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.0000000Z")


def assertion_out_of_time_range(now: float, nbf: float | None, exp: float | None) -> EntraError:
    return invalid_client(
        700024,
        f"Client assertion is not within its valid time range. Current time: {_entra_time(now)}, "
        f"assertion valid from {_entra_time(nbf or 0)}, expiry time of assertion "
        f"{_entra_time(exp or 0)}. Review the documentation at "
        "https://learn.microsoft.com/entra/identity-platform/certificate-credentials .",
    )


def assertion_bad_signature(detail: str) -> EntraError:
    return invalid_client(700027, f"Client assertion failed signature validation. ({detail})")


def grant_revoked(issued_at: float, valid_from: int, error: str = "invalid_grant",
                  claims: str | None = None) -> EntraError:
    """A refresh token / assertion issued before the user's sessions were revoked."""
    fmt = "%Y-%m-%dT%H:%M:%S.0000000Z"
    issued = dt.datetime.fromtimestamp(issued_at, dt.UTC).strftime(fmt)
    since = dt.datetime.fromtimestamp(valid_from, dt.UTC).strftime(fmt)
    return EntraError(
        error,
        50173,
        "The provided grant has expired due to it being revoked, a fresh auth token is "
        "needed. The user might have changed or reset their password. The grant was issued "
        f"on '{issued}' and the TokensValidFrom date (before which tokens are not valid) for "
        f"this user is '{since}'.",
        claims=claims,
    )
