"""Client authentication at the token endpoint, as Authlib auth methods.

Entra distinguishes *why* client auth failed (unknown app AADSTS700016, wrong secret
AADSTS7000215, bad certificate assertion AADSTS700027/700024); Authlib's built-in
methods only say "invalid_client", so these replacements raise Entra errors.

msal signs certificate assertions with PS256 and an ``x5t#S256`` header (RS256 + ``x5t``
for ADFS); both are accepted and the thumbprint must match the registered certificate.

Workload identity federation uses the same ``client_assertion`` parameters: the
assertion is not signed by the app (its ``iss`` is not the client id) but by an issuer
the app trusts through a federated identity credential (issuer + subject + audience):
the dev tenant's AKS-style issuer (``/federation/<name>``, its own keys) or the tenant
itself (a managed identity's token for ``api://AzureADTokenExchange``). The client is
the request's ``client_id``. Failures are Entra's: no credential with the assertion's
issuer AADSTS70021, one with its issuer but another subject AADSTS700213 (AADSTS7002138
when only the case differs), a credential whose audiences miss the assertion's
AADSTS700212, expired AADSTS700024, bad signature AADSTS700027 (all
``invalid_client``, 401). A certificate whose registration on the app has expired:
AADSTS7000274.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from authlib.common.encoding import json_loads
from authlib.oauth2.rfc6749.util import extract_basic_authorization
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from flask import g
from flask import request as flask_request
from joserfc import jws, jwt
from joserfc.errors import ExpiredTokenError, JoseError
from joserfc.jwk import KeySet, RSAKey
from joserfc.jws import JWSRegistry
from joserfc.util import to_bytes

from devtenant import errors, pki
from devtenant.directory import App, Directory, FederatedCredential
from devtenant.errors import invalid_client
from devtenant.runtime import base_url, current

ASSERTION_ALGORITHMS = ("PS256", "RS256")
#: msal puts the whole certificate in ``x5c``: far over joserfc's 512-byte header default.
ASSERTION_REGISTRY = JWSRegistry(algorithms=list(ASSERTION_ALGORITHMS))
ASSERTION_REGISTRY.max_header_length = 16384
AuthMethod = Callable[[Callable[[str], App | None], Any], App | None]
#: The directory of the request's tenant (resolved per request: several are hosted).
DirectoryRef = Callable[[], Directory]
#: Entra's clock-skew allowance for client assertions.
ASSERTION_LEEWAY = 300
FEDERATION_PATH = "/federation/"


def _unknown_client(directory: Directory, client_id: str) -> Exception:
    return invalid_client(
        700016,
        f"Application with identifier '{client_id}' was not found in the directory "
        f"'{directory.tenant_name}'. This can happen if the application has not been "
        "installed by the administrator of the tenant or consented to by any user in the "
        "tenant. You may have sent your authentication request to the wrong tenant.",
    )


def _check_secret(directory: Directory, client: App | None, client_id: str, secret: str) -> App:
    if client is None:
        raise _unknown_client(directory, client_id)
    if client.public_client:
        raise invalid_client(
            700025,
            "Client is public so neither 'client_assertion' nor 'client_secret' should be presented.",
        )
    if not client.client_secret or not hmac.compare_digest(client.client_secret.encode(), secret.encode()):
        raise invalid_client(
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is "
            "the client secret value, not the client secret ID, for a secret added to app "
            f"'{client_id}'.",
        )
    return client


def public_client(directory: DirectoryRef) -> AuthMethod:
    """``none``: a public client (the SPA) names itself with ``client_id`` only."""

    def authenticate(query_client: Callable[[str], App | None], request: Any) -> App | None:
        client_id = request.payload.client_id
        if not client_id or request.form.get("client_secret") or request.form.get("client_assertion"):
            return None
        client = query_client(client_id)
        if client is None:
            raise _unknown_client(directory(), client_id)
        return client  # Authlib then refuses it unless it is public

    return authenticate


def secret_basic(directory: DirectoryRef) -> AuthMethod:
    """``client_secret_basic``: credentials in the Authorization header."""

    def authenticate(query_client: Callable[[str], App | None], request: Any) -> App | None:
        client_id, secret = extract_basic_authorization(request.headers)
        if not (client_id and secret):
            return None
        return _check_secret(directory(), query_client(client_id), client_id, secret)

    return authenticate


def secret_post(directory: DirectoryRef) -> AuthMethod:
    """``client_secret_post``: ``client_id`` + ``client_secret`` in the form body."""

    def authenticate(query_client: Callable[[str], App | None], request: Any) -> App | None:
        client_id = request.form.get("client_id")
        secret = request.form.get("client_secret")
        if not (client_id and secret):
            return None
        return _check_secret(directory(), query_client(client_id), client_id, secret)

    return authenticate


class CertificateAssertion(JWTBearerClientAssertion):
    """``private_key_jwt`` with the app's registered certificate (msal's "certificate")."""

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, directory: DirectoryRef, token_path: str) -> None:
        # Entra does not enforce jti uniqueness and msal reuses an assertion for ~9 min.
        super().__init__(validate_jti=False, leeway=300)
        self.directory = directory
        self.token_path = token_path  # "/{tenant}/oauth2/v2.0/token"

    def __call__(self, query_client: Callable[[str], App | None], request: Any) -> App | None:
        assertion = request.form.get("client_assertion")
        if not assertion:
            return None
        try:
            # One instance serves all threads: per-request data goes on flask.g.
            g.devtenant_assertion_headers, claims = self.extract_assertion(assertion)
        except Exception:
            raise self._bad("The client assertion is not a valid JWT.") from None
        if claims.get("iss") != claims.get("sub"):  # not self-signed: a federated credential
            return federated_client(query_client, request, g.devtenant_assertion_headers, claims)
        client_id = claims.get("sub")
        client = query_client(client_id) if isinstance(client_id, str) else None
        if client is None:
            raise _unknown_client(self.directory(), str(client_id))
        return super().__call__(query_client, request)

    def extract_assertion(self, assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Unverified header and claims (to find the client and its certificate)."""
        obj = jws.extract_compact(to_bytes(assertion), None, ASSERTION_REGISTRY)
        claims = json_loads(obj.payload)
        if not isinstance(claims, dict):
            raise ValueError("JWT payload is not an object")
        return obj.headers(), claims

    @staticmethod
    def _bad(message: str, code: int = 700027) -> Exception:
        return invalid_client(code, message)

    def get_audiences(self) -> list[str]:
        """The token endpoint URL, as reached and in its canonical GUID form."""
        seen = flask_request.host_url.rstrip("/")
        canonical = self.token_path.format(tenant=self.directory().tenant_id)
        return [flask_request.base_url, f"{seen}{canonical}", f"{base_url()}{canonical}"]

    def resolve_client_public_key(self, client: App) -> RSAKey:
        """The registered certificate whose thumbprint the assertion header names."""
        headers = g.get("devtenant_assertion_headers", {})
        # msal pads its base64url thumbprints with '='; compare unpadded.
        sent_sha256 = str(headers.get("x5t#S256", "")).rstrip("=")
        sent_sha1 = str(headers.get("x5t", "")).rstrip("=")
        for cert in client.certificates:
            if sent_sha256 == pki.thumbprint(cert, "sha256") or sent_sha1 == pki.thumbprint(cert, "sha1"):
                if cert.not_valid_after_utc.timestamp() < time.time():  # the registration expired
                    raise errors.certificate_expired(client.client_id, sent_sha256 or sent_sha1)
                g.devtenant_certificate = pki.thumbprint(cert, "sha256")  # counted once accepted
                return RSAKey.import_key(pki.cert_pem(cert))
        raise self._bad(
            "The certificate with identifier used to sign the client assertion is not "
            f"registered on application. [Reason - The key was not found., Thumbprint of "
            f"key used by client: '{sent_sha256 or sent_sha1}']"
        )

    def process_assertion_claims(self, assertion: str, resolve_key: Any) -> dict[str, Any]:
        try:
            token = jwt.decode(assertion, resolve_key, registry=ASSERTION_REGISTRY)
        except JoseError as exc:
            raise self._bad(f"Client assertion failed signature validation. ({exc.error})") from exc
        try:
            self.verify_claims(token.claims)
        except Exception as exc:
            cause = exc.__cause__
            if isinstance(cause, ExpiredTokenError):
                message = "Client assertion is not within its valid time range."
                raise self._bad(message, 700024) from exc
            raise self._bad(
                "Client assertion contains invalid claims: "
                f"{getattr(exc, 'description', exc)} (aud must be the token endpoint, "
                "iss and sub the client id)."
            ) from exc
        current().counters.count_certificate(g.devtenant_certificate)
        return dict(token.claims)


# --- workload identity federation -------------------------------------------------------


def _audiences(claims: dict[str, Any]) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    return [a for a in aud if isinstance(a, str)] if isinstance(aud, list) else []


def _issuer_matches(credential: FederatedCredential, iss: str) -> bool:
    """Same path (the dev tenant's host varies); an http(s) URL either way."""
    parts = urlsplit(iss)
    return parts.scheme in {"http", "https"} and parts.path.rstrip("/") == credential.issuer.rstrip("/")


def _issuer_keys(iss: str) -> KeySet | None:
    """The verification keys of a dev-tenant issuer (federation issuer or a tenant)."""
    runtime = current()
    path = urlsplit(iss).path
    if path.startswith(FEDERATION_PATH):
        store = runtime.federation_keys.get(path[len(FEDERATION_PATH):].strip("/"))
        return store.public_key_set() if store else None
    from devtenant.tokens import issuer_tenant

    return runtime.keys.public_key_set() if issuer_tenant(iss) in runtime.tenant_ids else None


def federated_client(
    query_client: Callable[[str], App | None], request: Any, headers: dict[str, Any],
    claims: dict[str, Any],
) -> App:
    """Authenticate ``client_id`` with an assertion a federated credential of it trusts."""
    directory = current().directory
    client_id = request.form.get("client_id") or request.payload.client_id
    if not client_id:
        raise errors.missing_parameter("client_id")
    client = query_client(client_id)
    if client is None:
        raise _unknown_client(directory, client_id)
    iss, sub = str(claims.get("iss", "")), str(claims.get("sub", ""))
    audiences = _audiences(claims)
    shown_audience = ",".join(audiences)
    trusted_issuer = [c for c in client.federated_credentials if _issuer_matches(c, iss)]
    if not trusted_issuer:
        raise errors.no_federated_record(iss, sub, shown_audience)
    records = [c for c in trusted_issuer if c.subject == sub]
    if not records:  # Entra names the subject when the issuer is one the app trusts
        raise errors.federated_subject_mismatch(sub, case_only=any(
            c.subject.casefold() == sub.casefold() for c in trusted_issuer))
    if len(audiences) != 1 or not any(audiences[0] in c.audiences for c in records):
        raise errors.federated_audience_mismatch(shown_audience)
    keys = _issuer_keys(iss)
    if keys is None:
        raise errors.assertion_bad_signature("The issuer's signing keys could not be retrieved.")
    try:
        jwt.decode(request.form["client_assertion"], keys, algorithms=["RS256", "PS256"])
    except JoseError as exc:
        raise errors.assertion_bad_signature(exc.error) from exc
    now = time.time()
    exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
    if not isinstance(exp, int | float) or exp + ASSERTION_LEEWAY < now or (
        isinstance(nbf, int | float) and nbf - ASSERTION_LEEWAY > now
    ):
        raise errors.assertion_out_of_time_range(
            now, nbf if isinstance(nbf, int | float) else None, exp if isinstance(exp, int | float) else None
        )
    return client
