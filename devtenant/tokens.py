"""Minting and verifying Entra v2 JWTs with joserfc.

The claim set mirrors real v2 access tokens (aio, azp, azpacr, rh, uti, ...) because
API code and tests inspect these claims; ``sub`` is pairwise per app as in Entra.
Verification is shared by the OBO grant (user assertions) and the Graph blueprint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Sequence
from typing import Any

from joserfc import jwt
from joserfc.errors import ExpiredTokenError, JoseError

from devtenant.directory import App, Directory, User
from devtenant.keys import KeyStore

#: Entra gives access tokens a randomised 60-90 minute lifetime; keep it in that band.
MIN_LIFETIME, MAX_LIFETIME = 3600, 4999


class TokenError(Exception):
    """A presented token is unusable; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str, claims: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.reason = reason  # "malformed" | "signature" | "expired" | "issuer" | "audience"
        self.detail = detail
        self.claims = claims or {}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _opaque(prefix: str = "", nbytes: int = 24) -> str:
    return prefix + secrets.token_urlsafe(nbytes)


def random_lifetime() -> int:
    return MIN_LIFETIME + secrets.randbelow(MAX_LIFETIME - MIN_LIFETIME + 1)


def pairwise_sub(oid: str, client_id: str) -> str:
    """Entra's ``sub`` is stable per (user, app) and differs between apps."""
    return b64url(hashlib.sha256(f"{oid}|{client_id}".encode()).digest())


def client_info(user: User, tenant_id: str) -> str:
    """base64url JSON that msal uses to build home_account_id ``oid.tid``."""
    payload = json.dumps({"uid": user.oid, "utid": tenant_id}, separators=(",", ":"))
    return b64url(payload.encode())


def issuer_for(base_url: str, tenant_id: str) -> str:
    return f"{base_url.rstrip('/')}/{tenant_id}/v2.0"


class TokenMinter:
    """Signs tokens with the active key and verifies tokens against all published keys."""

    def __init__(self, keys: KeyStore, directory: Directory) -> None:
        self.keys = keys
        self.directory = directory

    def _sign(self, claims: dict[str, Any]) -> str:
        key = self.keys.active
        return jwt.encode({"alg": "RS256", "typ": "JWT", "kid": key.kid}, claims, key)

    def _sign_claims(self, issuer: str, audience: str, lifetime: int, expired: bool,
                     claims: dict[str, Any], amr: Sequence[str] = ()) -> str:
        """Sign ``claims`` inside the envelope every Entra v2 token shares."""
        now = int(time.time())
        if expired:  # issued long enough ago that no clock-skew leeway rescues it
            now -= lifetime + 600
        envelope: dict[str, Any] = {
            "aud": audience, "iss": issuer, "iat": now, "nbf": now, "exp": now + lifetime,
            "aio": _opaque(), **claims, "rh": _opaque("1.A"), "tid": self.directory.tenant_id,
            "uti": _opaque(nbytes=16), "ver": "2.0",
        }
        if amr:
            envelope["amr"] = list(amr)
        return self._sign(envelope)

    def user_token(
        self,
        *,
        issuer: str,
        audience: str,
        user: User,
        azp: str,
        azpacr: str,
        scp: Sequence[str],
        amr: Sequence[str] = (),
        lifetime: int | None = None,
        expired: bool = False,
    ) -> str:
        """Delegated access token (``scp``) for ``user`` as seen by resource ``audience``."""
        return self._sign_claims(issuer, audience, lifetime or random_lifetime(), expired, {
            "azp": azp,
            "azpacr": azpacr,
            "name": user.display_name,
            "oid": user.oid,
            "preferred_username": user.upn,
            "scp": " ".join(scp),
            "sid": _opaque(nbytes=16),
            "sub": pairwise_sub(user.oid, azp),
        }, amr)

    def app_token(
        self,
        *,
        issuer: str,
        audience: str,
        client: App,
        azpacr: str,
        roles: Sequence[str],
        lifetime: int | None = None,
    ) -> str:
        """App-only access token: no ``scp``, ``roles`` and ``idtyp: app``."""
        claims: dict[str, Any] = {
            "azp": client.client_id,
            "azpacr": azpacr,
            "idtyp": "app",
            "oid": client.service_principal_id,
            "sub": client.service_principal_id,
        }
        if roles:
            claims["roles"] = list(roles)
        return self._sign_claims(issuer, audience, lifetime or random_lifetime(), False, claims)

    def id_token(
        self, *, issuer: str, client_id: str, user: User, amr: Sequence[str], nonce: str | None = None
    ) -> str:
        """ID token for the client itself (msal reads it to build the account; msal-browser
        also checks that ``nonce`` is the one its authorization request sent)."""
        claims = {
            "name": user.display_name,
            "oid": user.oid,
            "preferred_username": user.upn,
            "sub": pairwise_sub(user.oid, client_id),
        }
        if nonce:
            claims["nonce"] = nonce
        return self._sign_claims(issuer, client_id, 3600, False, claims, amr)

    def verify(self, token: str, audiences: Sequence[str], leeway: int = 0) -> dict[str, Any]:
        """Check signature (any published key), issuer tenant, expiry and audience.

        The issuer's host is not compared: the signature already proves the token is
        ours, and the same token legitimately travels between https://localhost:8443
        and https://devtenant:8443 in docker-compose.
        """
        try:
            decoded = jwt.decode(token, self.keys.public_key_set(), algorithms=["RS256"])
        except JoseError as exc:
            signature_errors = {"bad_signature", "invalid_key_id", "unsupported_algorithm"}
            reason = "signature" if exc.error in signature_errors else "malformed"
            raise TokenError(reason, exc.description or str(exc)) from exc
        except (ValueError, TypeError) as exc:
            raise TokenError("malformed", "The token is not a JWS compact serialization.") from exc
        claims = dict(decoded.claims)
        iss = str(claims.get("iss", ""))
        if not iss.rstrip("/").endswith(f"/{self.directory.tenant_id}/v2.0"):
            raise TokenError("issuer", f"Issuer '{iss}' is not this tenant.", claims)
        registry = jwt.JWTClaimsRegistry(leeway=leeway, exp={"essential": True}, nbf={"essential": False})
        try:
            registry.validate(claims)
        except ExpiredTokenError as exc:
            raise TokenError("expired", "The token is expired.", claims) from exc
        except JoseError as exc:
            raise TokenError("malformed", exc.description or str(exc), claims) from exc
        if claims.get("aud") not in audiences:
            raise TokenError("audience", f"Invalid audience '{claims.get('aud')}'.", claims)
        return claims
