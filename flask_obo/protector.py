"""Protecting the API: validate Entra ID access tokens (v2 and v1) with an Authlib ResourceProtector.

Authlib's stock JWT validators don't fit Entra tokens (RFC 9068 demands ``typ: at+jwt``,
``client_id`` and ``jti``; RFC 7523's never checks ``aud``), so ``EntraTokenValidator``
checks exactly what Entra guarantees: RS256 from the tenant's published keys, issuer,
audience, lifetime with 60 s leeway, ``tid``/``oid``/``scp``, and the required scope.

A successful validation is remembered for a while (``ValidatedTokens``), so a client that
sends the same token again (an SPA sends one token for up to an hour) costs a SHA-256
instead of an RS256 verification and the claim checks. The protector itself skips
Authlib's request wrapper, which builds the request's full URL that nothing here reads,
and keeps the validated token for ``current_token`` under its own name in ``g``.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple, NoReturn

from authlib.integrations.flask_oauth2 import ResourceProtector, token_authenticated
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import MissingAuthorizationError, UnsupportedTokenTypeError
from authlib.oauth2.rfc6750 import BearerTokenValidator, InsufficientScopeError, InvalidTokenError
from flask import g, request
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
    MissingAppRole,
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
    def roles(self) -> tuple[str, ...]:
        """The token's app roles (``roles``): an app-only token's application permissions,
        or a user's app roles in a delegated one. Empty when none."""
        roles = self.get("roles")
        return tuple(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else ()

    @property
    def is_app(self) -> bool:
        """An app-only token (client credentials, a daemon): ``idtyp`` is ``app``, or (v1
        tokens, v2 without the optional ``idtyp`` claim) it has ``roles`` and no ``scp``.
        No user is behind it, so there is nobody to act on behalf of."""
        return self.get("idtyp") == "app" or ("roles" in self and "scp" not in self)

    @property
    def app_id(self) -> str | None:
        """The client application that got the token: ``azp`` (v2) or ``appid`` (v1)."""
        app_id = self.get("azp", self.get("appid"))
        return app_id if isinstance(app_id, str) else None


class _UnknownSigningKey(Exception):
    pass


class _AppTokenRefused(InsufficientScopeError):
    """An app-only token without any of the route's app roles."""


class _Validated(NamedTuple):
    claims: dict[str, Any]
    kid: str
    key: RSAKey  # the key object the signature was verified with
    expires_at: float  # the token's exp (wall clock, as joserfc checks it)


class ValidatedTokens:
    """This worker's successful token validations, by SHA-256 of the raw token (LRU).

    A hit skips only what would come out the same. Validating a given token again can
    only give another verdict because of the clock or the keys: the audiences, issuers and
    tenants it is checked against are the process's configuration, fixed for its life,
    and the token's bytes are the key of the entry. So a remembered token is accepted
    without re-verification

    * only before its ``exp`` (no leeway: past it, the full check decides, leeway and all);
    * only while the key set still holds, under the token's ``kid``, the very key object
      its signature was verified with. A refetch of the keys (every 24 h, or on an unknown
      ``kid``) keeps the object of a key whose material is unchanged
      (``authority.SigningKeys``) and makes a new one otherwise, so a withdrawn or replaced
      key sends every token it verified through the full check again, at once.

    That is exactly the full check's verdict, so there is no further time limit: an
    earlier version redid every validation after 5 minutes, which bought no security (the
    check it redid could not come out differently) and cost each user whose requests to
    a worker were minutes apart a full RS256 check. Revocation is not part of validating a
    JWT either way. Failed validations are never remembered; the scope check runs on every
    request. The cache holds claims, never the raw token, and at most ``limit`` entries
    (least recently used dropped).
    """

    def __init__(self, limit: int, clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self._clock = clock
        self._entries: OrderedDict[bytes, _Validated] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def digest(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def get(self, digest: bytes) -> _Validated | None:
        """The remembered validation, unless the token has expired (then it is forgotten)."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if self._clock() >= entry.expires_at:
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return entry

    def put(self, digest: bytes, claims: dict[str, Any], kid: str, key: RSAKey) -> None:
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool) or exp <= self._clock():
            return  # accepted within the leeway past exp: checked afresh every time
        entry = _Validated(_shared_strings(claims), kid, key, float(exp))
        with self._lock:
            self._entries[digest] = entry
            self._entries.move_to_end(digest)
            while len(self._entries) > self.limit:
                self._entries.popitem(last=False)

    def forget(self, digest: bytes) -> None:
        with self._lock:
            self._entries.pop(digest, None)


#: Claims whose values every user of a tenant shares (the same audience, issuer, tenant,
#: scopes...): remembered as one string object each, like every claim's name.
SHARED_VALUE_CLAIMS = frozenset({"aud", "iss", "tid", "ver", "scp", "azp", "appid", "azpacr", "appidacr",
                                 "idp", "idtyp", "acr", "amr", "roles", "xms_cc"})


def _shared_strings(claims: dict[str, Any]) -> dict[str, Any]:
    """``claims`` with its names, and the values of ``SHARED_VALUE_CLAIMS`` that are
    strings, interned: each token's JSON is parsed on its own, so without this every
    remembered validation holds its own copies of the same strings (about a third of an
    entry). The same claims, equal in every way."""
    return {sys.intern(name): sys.intern(value) if name in SHARED_VALUE_CLAIMS and isinstance(value, str)
            else value for name, value in claims.items()}


class EntraTokenValidator(BearerTokenValidator):
    """Bearer validator for Entra ID access tokens issued to this API, v2 and v1.

    An app registration's default ``accessTokenAcceptedVersion`` (null) makes Entra issue
    v1 tokens: issuer ``https://sts.windows.net/<tid>/`` (``AZURE_V1_ISSUER_HOST``),
    audience the App ID URI. Both versions are signed by the same keys and carry ``tid``,
    ``oid`` and ``scp``, so everything but the issuer's form is checked alike. The issuer
    must be the token's own tenant's, and that tenant the configured one, or one of
    ``AZURE_ALLOWED_TENANTS`` for a multi-tenant API.
    """

    def __init__(self, settings: Settings, keys: SigningKeys,
                 validated: ValidatedTokens | None = None) -> None:
        super().__init__(realm=REALM)
        self._keys = keys
        # Its own bound (VALIDATION_MEMORY_TOKENS), not the memory tier's: with more users
        # than the tier holds, a user's re-load from Redis should not also cost an RS256 check.
        self.validated = validated or ValidatedTokens(settings.validation_memory_tokens)
        self._settings = settings
        self._claims = jwt.JWTClaimsRegistry(
            leeway=LEEWAY_SECONDS,
            iss={"essential": True},
            aud={"essential": True, "values": [settings.client_id, settings.app_id_uri]},
            exp={"essential": True},
            tid={"essential": True},
            oid={"essential": True},
        )

    def authenticate_token(self, token_string: str) -> EntraAccessToken:
        if len(token_string) > MAX_TOKEN_LENGTH or token_string.count(".") != 2:
            raise InvalidTokenError(realm=self.realm)
        digest = self.validated.digest(token_string)
        try:
            remembered = self.validated.get(digest)
            if remembered is not None:
                if self._keys.get(remembered.kid) is remembered.key:
                    return EntraAccessToken(remembered.claims, token_string)
                self.validated.forget(digest)  # the key set changed: check it all again
            used: list[tuple[str, RSAKey]] = []

            def resolve(obj: GuestProtocol) -> RSAKey:
                kid, key = self._resolve_key(obj)
                used.append((kid, key))
                return key

            token = jwt.decode(token_string, resolve, registry=_RS256_ONLY)
            self._claims.validate(token.claims)
            claims = token.claims
            uuid.UUID(claims["oid"])
            tid = str(uuid.UUID(claims["tid"]))
            if claims["tid"] != tid or not self._settings.tenant_allowed(tid):
                raise ValueError("a tenant this API does not serve")
            if claims["iss"] not in self._settings.issuers_for(tid):
                raise ValueError("not the issuer of the token's tenant")
            if "scp" in claims and not isinstance(claims["scp"], str):
                raise ValueError("scp is not a string")
            if "roles" in claims and not (isinstance(claims["roles"], list)
                                          and all(isinstance(r, str) for r in claims["roles"])):
                raise ValueError("roles is not a list of strings")
            if "scp" not in claims and "roles" not in claims and claims.get("idtyp") != "app":
                raise ValueError("neither scp nor roles, and not an app token")
        except AuthorityUnavailable as exc:
            log.warning("cannot validate tokens: the authority's signing keys are unavailable (%s)", exc)
            raise IdentityProviderUnavailable() from None
        except (_UnknownSigningKey, JoseError, ValueError, TypeError, KeyError, AttributeError,
                RecursionError) as exc:
            # One fixed answer for every defect, so a caller learns nothing from the error.
            log.info("rejected a bearer token: %s", type(exc).__name__)
            raise InvalidTokenError(realm=self.realm) from None
        kid, key = used[-1]
        self.validated.put(digest, claims, kid, key)
        return EntraAccessToken(claims, token_string)

    def validate_token(self, token: EntraAccessToken, scopes: list[str] | None, request: Any,
                       app_roles: tuple[str, ...] = ()) -> None:
        """A delegated token needs the required scope (``scopes``: it alone, or none when
        no delegated token may pass); an app-only token one of ``app_roles`` (none: it
        never passes). "A substring doesn't count": whole space-separated values compare."""
        if token.is_app:
            if not set(app_roles) & set(token.roles):
                raise _AppTokenRefused()
        elif not scopes or not set(scopes) <= token.scopes:
            raise InsufficientScopeError()

    def _resolve_key(self, obj: GuestProtocol) -> tuple[str, RSAKey]:
        kid = obj.headers().get("kid")
        if not isinstance(kid, str):
            raise _UnknownSigningKey()
        key = self._keys.get(kid)
        if key is None:
            raise _UnknownSigningKey()
        return kid, key


class EntraResourceProtector(ResourceProtector):
    """Authlib's Flask protector, answering with ``flask_obo.errors`` (RFC 6750 headers,
    fixed JSON bodies)."""

    def __init__(self, validator: EntraTokenValidator) -> None:
        super().__init__()
        self.register_token_validator(validator)

    def authenticate(self, scope: str | None, app_roles: tuple[str, ...] = ()) -> EntraAccessToken:
        """Validate the request's bearer token: a delegated token needs ``scope`` (None:
        delegated tokens are refused), an app-only token one of ``app_roles`` (none: app
        tokens are refused). Raises the matching ``ApiError``."""
        try:
            return self.acquire_token([scope] if scope else None, app_roles=app_roles)
        except OAuth2Error as error:
            self.raise_error_response(error, scope, app_roles)

    def acquire_token(self, scopes: list[str] | None = None, **kwargs: Any) -> EntraAccessToken:
        """Authlib's ``acquire_token`` (validate, send ``token_authenticated``, keep the
        token for the request), without its ``FlaskJsonRequest``: building one computes the
        request's full URL (more CPU than checking a remembered token), and the validator
        reads nothing but the Authorization header. The token is kept as
        ``g.flask_obo_token``, which ``current_token`` reads: not Authlib's private key."""
        token: EntraAccessToken = self.validate_request(scopes, _HeadersOnly(request.headers), **kwargs)
        token_authenticated.send(self, token=token)
        g.flask_obo_token = token
        return token

    def raise_error_response(self, error: OAuth2Error, scope: str | None = "",
                             app_roles: tuple[str, ...] = ()) -> NoReturn:
        if isinstance(error, (MissingAuthorizationError, UnsupportedTokenTypeError)):
            raise MissingToken()
        if isinstance(error, InsufficientScopeError):
            # Name what the caller's kind of token lacks: an app token the roles (when
            # some would do), a delegated one the scope (when one would do).
            if app_roles and (isinstance(error, _AppTokenRefused) or not scope):
                raise MissingAppRole(app_roles)
            raise InsufficientScope(scope or "")
        raise InvalidAccessToken()


class _HeadersOnly:
    """What Authlib's ``validate_request`` reads of a request: its headers."""

    def __init__(self, headers: Any) -> None:
        self.headers = headers


def validated_token() -> EntraAccessToken:
    """The token ``EntraResourceProtector.authenticate`` validated in this request."""
    token = g.get("flask_obo_token")
    if not isinstance(token, EntraAccessToken):
        raise RuntimeError(
            "current_token is set only in a request that a protected route authenticated"
        )
    return token


#: The validated access token of the current request, a proxy like Authlib's ``current_token``.
current_token: EntraAccessToken = LocalProxy(validated_token)  # type: ignore[assignment]
