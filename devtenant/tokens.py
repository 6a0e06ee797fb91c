"""Minting and verifying Entra JWTs (v2, and v1 on request) with joserfc.

The claim set mirrors real v2 access tokens (aio, azp, azpacr, rh, uti, ...) because
API code and tests inspect these claims; ``sub`` is pairwise per app as in Entra.
v1 access tokens (``ver: "1.0"``) carry what Entra's v1 tokens carry instead: issuer
``<host>/sts/<tid>/`` (the dev tenant's stand-in for ``https://sts.windows.net/<tid>/``;
the API configures ``<host>/sts`` as AZURE_V1_ISSUER_HOST), the App ID URI as
audience, ``appid``/``appidacr`` instead of ``azp``/``azpacr``, ``upn`` and
``unique_name``. Both are signed by the same keys.
Verification is shared by the OBO grant (user assertions) and the Graph blueprint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from collections.abc import Collection, Sequence
from typing import Any

from joserfc import jwt
from joserfc.errors import ExpiredTokenError, JoseError

from devtenant.directory import App, Directory, ManagedIdentity, User
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


#: Path prefix of the dev tenant's v1 issuer: ``<host>/sts`` is AZURE_V1_ISSUER_HOST.
V1_ISSUER_PATH = "/sts"


def v1_issuer_host(base_url: str) -> str:
    """Where v1 issuers live (Entra: ``https://sts.windows.net``)."""
    return f"{base_url.rstrip('/')}{V1_ISSUER_PATH}"


def v1_issuer_for(base_url: str, tenant_id: str) -> str:
    """``<host>/sts/<tid>/``, the trailing slash included as in Entra's v1 issuers."""
    return f"{v1_issuer_host(base_url)}/{tenant_id}/"


_GUID = r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
_V2_ISSUER = re.compile(rf"/{_GUID}/v2\.0/?$")
_V1_ISSUER = re.compile(rf"{V1_ISSUER_PATH}/{_GUID}/?$")


def issuer_tenant(iss: str) -> str | None:
    """The tenant id a dev-tenant issuer names (v2 ``/<tid>/v2.0`` or v1 ``/sts/<tid>/``),
    whatever host it was reached under; None for any other issuer."""
    match = _V2_ISSUER.search(iss) or _V1_ISSUER.search(iss)
    return match.group(1) if match else None


class TokenMinter:
    """Signs tokens with the active key and verifies tokens against all published keys."""

    def __init__(self, keys: KeyStore, directory: Directory) -> None:
        self.keys = keys
        self.directory = directory

    def _sign(self, claims: dict[str, Any]) -> str:
        key = self.keys.active
        return jwt.encode({"alg": "RS256", "typ": "JWT", "kid": key.kid}, claims, key)

    def _sign_claims(self, issuer: str, audience: str, lifetime: int, expired: bool,
                     claims: dict[str, Any], amr: Sequence[str] = (), *, version: str = "2.0",
                     ) -> str:
        """Sign ``claims`` inside the envelope every Entra token shares."""
        now = int(time.time())
        if expired:  # issued long enough ago that no clock-skew leeway rescues it
            now -= lifetime + 600
        envelope: dict[str, Any] = {
            "aud": audience, "iss": issuer, "iat": now, "nbf": now, "exp": now + lifetime,
            "aio": _opaque(), **claims, "rh": _opaque("1.A"), "tid": self.directory.tenant_id,
            "uti": _opaque(nbytes=16), "ver": version,
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
        v1: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Delegated access token (``scp``) for ``user`` as seen by resource ``audience``.

        ``v1``: Entra's v1 shape (the caller passes the v1 issuer and the App ID URI as
        audience). ``extra``: more claims (``xms_cc`` for CAE-capable clients).
        """
        lifetime = lifetime or random_lifetime()
        if v1:
            profile = user.profile
            claims: dict[str, Any] = {
                "acr": "1",
                "appid": azp,
                "appidacr": azpacr,
                "family_name": profile.get("surname"),
                "given_name": profile.get("givenName"),
                "ipaddr": "127.0.0.1",
                "name": user.display_name,
                "oid": user.oid,
                "scp": " ".join(scp),
                "sub": pairwise_sub(user.oid, azp),
                "unique_name": user.upn,
                "upn": user.upn,
                **(extra or {}),
            }
            return self._sign_claims(issuer, audience, lifetime, expired, claims, amr or ("pwd",),
                                     version="1.0")
        return self._sign_claims(issuer, audience, lifetime, expired, {
            "azp": azp,
            "azpacr": azpacr,
            "name": user.display_name,
            "oid": user.oid,
            "preferred_username": user.upn,
            "scp": " ".join(scp),
            "sid": _opaque(nbytes=16),
            "sub": pairwise_sub(user.oid, azp),
            **(extra or {}),
        }, amr)

    def managed_identity_token(
        self, *, issuer: str, audience: str, identity: ManagedIdentity, lifetime: int
    ) -> str:
        """App-only token of a managed identity (``sub``/``oid`` = its object id), as App
        Service's endpoint returns it; for ``api://AzureADTokenExchange`` it is the
        assertion a federated identity credential on another app accepts."""
        return self._sign_claims(issuer, audience, lifetime, False, {
            "azp": identity.client_id,
            "azpacr": "2",
            "idtyp": "app",
            "oid": identity.object_id,
            "sub": identity.object_id,
            "xms_mirid": f"/subscriptions/devtenant/resourcegroups/flask-obo/providers/"
                         f"Microsoft.ManagedIdentity/{identity.kind}/{identity.display_name}",
        })

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

    def verify(
        self,
        token: str,
        audiences: Sequence[str],
        leeway: int = 0,
        tenants: Collection[str] | None = None,
    ) -> dict[str, Any]:
        """Check signature (any published key), issuer tenant, expiry and audience.

        The issuer's host is not compared: the signature already proves the token is
        ours, and the same token legitimately travels between https://localhost:8443
        and https://devtenant:8443 in docker-compose. v2 (``/<tid>/v2.0``) and v1
        (``/sts/<tid>/``) issuers are both accepted, for a tenant in ``tenants``
        (default: this minter's tenant) that the ``tid`` claim agrees with.
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
        allowed = {self.directory.tenant_id} if tenants is None else set(tenants)
        tid = issuer_tenant(iss)
        if tid is None or tid != claims.get("tid") or tid not in allowed:
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
