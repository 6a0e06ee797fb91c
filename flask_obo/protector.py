"""Protecting the API: validate Entra ID v2 access tokens with an Authlib ResourceProtector.

Authlib's stock JWT validators don't fit Entra tokens (RFC 9068 demands ``typ: at+jwt``,
``client_id`` and ``jti``; RFC 7523's never checks ``aud``), so ``EntraTokenValidator``
checks exactly what Entra guarantees: RS256 from the tenant's published keys, issuer,
audience, lifetime with 60 s leeway, ``tid``/``oid``/``scp``, and the required scope.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, NoReturn

from authlib.integrations.flask_oauth2 import ResourceProtector
from authlib.integrations.flask_oauth2 import current_token as authlib_current_token
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import MissingAuthorizationError, UnsupportedTokenTypeError
from authlib.oauth2.rfc6750 import BearerTokenValidator, InsufficientScopeError, InvalidTokenError
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import GuestProtocol, RSAKey
from joserfc.jws import JWSRegistry
from werkzeug.local import LocalProxy

from .authority import AuthorityUnavailable, SigningKeys
from .errors import (
    REALM,
    IdentityProviderUnavailable,
    InsufficientScope,
    InvalidAccessToken,
    MissingToken,
)
from .settings import Settings

log = logging.getLogger(__name__)

LEEWAY_SECONDS = 60
MAX_TOKEN_LENGTH = 16 * 1024
# RS256 and nothing else; header parameters Entra may add (e.g. x5t, nonce) are tolerated.
_RS256_ONLY = JWSRegistry(algorithms=["RS256"], strict_check_header=False)


class EntraAccessToken(dict[str, Any]):
    """Validated claims, plus the raw token kept for a later On-Behalf-Of exchange."""

    def __init__(self, claims: dict[str, Any], raw: str) -> None:
        super().__init__(claims)
        self.raw = raw

    @property
    def scopes(self) -> frozenset[str]:
        scp = self.get("scp")
        return frozenset(scp.split(" ")) if isinstance(scp, str) else frozenset()

    @property
    def oid(self) -> str:
        return str(self["oid"])

    @property
    def tid(self) -> str:
        return str(self["tid"])

    @property
    def is_app_only(self) -> bool:
        return "scp" not in self and "roles" in self


class _UnknownSigningKey(Exception):
    pass


class EntraTokenValidator(BearerTokenValidator):
    """Bearer validator for Entra ID v2 access tokens issued to this API."""

    def __init__(self, settings: Settings, keys: SigningKeys) -> None:
        super().__init__(realm=REALM)
        self._keys = keys
        self._claims = jwt.JWTClaimsRegistry(
            leeway=LEEWAY_SECONDS,
            iss={"essential": True, "value": settings.issuer},
            aud={"essential": True, "values": [settings.client_id, settings.app_id_uri]},
            exp={"essential": True},
            tid={"essential": True, "value": settings.tenant_id},
            oid={"essential": True},
        )

    def authenticate_token(self, token_string: str) -> EntraAccessToken:
        if len(token_string) > MAX_TOKEN_LENGTH or token_string.count(".") != 2:
            raise InvalidTokenError(realm=self.realm)
        try:
            token = jwt.decode(token_string, self._resolve_key, registry=_RS256_ONLY)
            self._claims.validate(token.claims)
            claims = token.claims
            uuid.UUID(claims["oid"])
            uuid.UUID(claims["tid"])
            if "scp" in claims and not isinstance(claims["scp"], str):
                raise ValueError("scp is not a string")
            if "scp" not in claims and "roles" not in claims:
                raise ValueError("neither scp nor roles")
        except AuthorityUnavailable:
            log.warning("cannot validate tokens: the authority's signing keys are unavailable")
            raise IdentityProviderUnavailable() from None
        except (_UnknownSigningKey, JoseError, ValueError, TypeError, KeyError, AttributeError,
                RecursionError) as exc:
            # One fixed answer for every defect, so a caller learns nothing from the error.
            log.info("rejected a bearer token: %s", type(exc).__name__)
            raise InvalidTokenError(realm=self.realm) from None
        return EntraAccessToken(claims, token_string)

    def validate_token(self, token: EntraAccessToken, scopes: list[str], request: Any) -> None:
        # scopes holds the one required scope; "a substring doesn't count", so compare
        # whole space-separated values. An app-only token (roles, no scp) never qualifies.
        if token.is_app_only or not set(scopes) <= token.scopes:
            raise InsufficientScopeError()

    def _resolve_key(self, obj: GuestProtocol) -> RSAKey:
        kid = obj.headers().get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise _UnknownSigningKey()
        return key


class EntraResourceProtector(ResourceProtector):
    """Authlib's Flask protector, answering with ``flask_obo.errors`` (RFC 6750 headers,
    fixed JSON bodies). Authlib keeps the validated token for ``current_token``."""

    def __init__(self, validator: EntraTokenValidator) -> None:
        super().__init__()
        self.register_token_validator(validator)

    def authenticate(self, scope: str) -> EntraAccessToken:
        """Validate the request's bearer token for ``scope`` or raise the matching ``ApiError``."""
        try:
            token = self.acquire_token([scope])
        except OAuth2Error as error:
            self.raise_error_response(error, scope)
        assert isinstance(token, EntraAccessToken)
        return token

    def raise_error_response(self, error: OAuth2Error, scope: str = "") -> NoReturn:
        if isinstance(error, (MissingAuthorizationError, UnsupportedTokenTypeError)):
            raise MissingToken()
        if isinstance(error, InsufficientScopeError):
            raise InsufficientScope(scope)
        raise InvalidAccessToken()


def validated_token() -> EntraAccessToken:
    """The token ``EntraResourceProtector.authenticate`` validated in this request.

    Read through Authlib's public ``current_token`` proxy rather than its ``g`` key.
    """
    token = authlib_current_token._get_current_object()
    if not isinstance(token, EntraAccessToken):
        raise RuntimeError(
            "current_token is set only in a request that a protected route authenticated"
        )
    return token


#: The validated access token of the current request (a proxy, as Authlib's ``current_token``).
current_token: EntraAccessToken = LocalProxy(validated_token)  # type: ignore[assignment]
