"""The token cache: one msal ``SerializableTokenCache`` per user, sealed for storage.

Two things here go beyond msal's defaults:

* ``UserTokenCache`` records each token under the scopes that were *asked for* as well
  as those Entra returned. msal's silent lookup only hits when the stored ``scope``
  covers the requested scopes, but Entra does not echo the request: for
  ``https://graph.microsoft.com/.default`` it returns the granted permissions, and
  for Graph it may drop the resource prefix (``User.Read openid profile``). Left alone,
  every request would miss and redeem the refresh token: one call to Entra per request.
* ``TokenCacheCodec`` compresses the serialized cache, binds it to its partition and
  encrypts it with MultiFernet. A blob copied under another user's key decrypts but
  fails the binding check, so it is never used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import zlib
from collections.abc import Iterable
from typing import Any

import msal
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

log = logging.getLogger(__name__)

OIDC_SCOPES = frozenset({"openid", "profile", "email", "offline_access"})
_FORMAT_VERSION = b"\x01"
_PARTITION_BYTES = 32
# A section of our own beside msal's (msal keeps sections it does not know as they are).
_GENERATION_SECTION, _GENERATION_ENTRY = "FlaskOboGeneration", "current"
MAX_SERIALIZED_BYTES = 1024 * 1024  # a decompression bomb is a miss, not an outage


def partition_key(oid: str, tid: str) -> str:
    """The user's partition: SHA-256 of ``"<oid>.<tid>"`` (msal's home account id).

    Hashing keeps user identifiers out of Redis key names and logs.
    """
    return hashlib.sha256(f"{oid}.{tid}".lower().encode()).hexdigest()


class UserTokenCache(msal.SerializableTokenCache):
    """A single user's msal cache whose entries are findable by the scopes requested."""

    def load(self, serialized: str | None) -> bool:
        """Replace the contents with ``serialized``; False (and empty) when that is not
        an msal cache. A blob that decrypts is still untrusted input: msal itself would
        raise on a wrong shape at every lookup, a failure that would stick to the user."""
        try:
            document = json.loads(serialized) if serialized else {}
        except (ValueError, RecursionError):  # RecursionError: nesting too deep to parse
            document = None
        if not is_msal_cache(document):
            self.deserialize(None)
            return False
        with self._lock:
            self._cache = document
            self.has_state_changed = False
        return True

    def serialize(self) -> str:
        """The cache as compact JSON, which msal's ``deserialize`` reads as it reads its own.
        (msal indents it, and with an indent ``json`` encodes in pure Python: several times
        slower, and every saved exchange paid it, then parsed and re-encoded it to seal.)"""
        with self._lock:
            self.has_state_changed = False
            return json.dumps(self._cache, separators=(",", ":"))

    def add(self, event: dict[str, Any], **kwargs: Any) -> None:
        requested = _scope_list(event.get("data", {}).get("scope"))
        returned = _scope_list(event.get("scope")) or requested
        super().add(dict(event, scope=stored_scopes(requested, returned)), **kwargs)
        self.stamp_generation()

    @property
    def generation(self) -> str | None:
        """A random name for this entry's lifetime: a cache that starts empty (the first
        exchange, or the first after a sign-out removed the entry) gets a new one, and it
        is kept as the entry is refreshed. Background handles name it, so a handle
        outlives neither a sign-out nor the entry (``flask_obo.background``)."""
        with self._lock:
            section = (self._cache or {}).get(_GENERATION_SECTION)
            entry = section.get(_GENERATION_ENTRY) if isinstance(section, dict) else None
            value = entry.get("value") if isinstance(entry, dict) else None
            return value if isinstance(value, str) and value else None

    def stamp_generation(self) -> str:
        """The entry's generation, giving it one if it has none (an entry written before
        generations existed); a new one marks the cache changed, to be saved."""
        current = self.generation
        if current is not None:
            return current
        value = secrets.token_urlsafe(16)
        with self._lock:
            if self._cache is None:
                self._cache = {}
            self._cache[_GENERATION_SECTION] = {_GENERATION_ENTRY: {"value": value}}
            self.has_state_changed = True
        return value

    def account_of(self, oid: str, tid: str) -> dict[str, Any] | None:
        """The msal account of the user ``oid`` in tenant ``tid``, if cached."""
        return next((a for a in self.search(self.CredentialType.ACCOUNT) if _is_user(a, oid, tid)), None)

    def belongs_to(self, oid: str, tid: str) -> bool:
        """True when every account and refresh token in here is this user's."""
        accounts = list(self.search(self.CredentialType.ACCOUNT))
        if not all(_is_user(a, oid, tid) for a in accounts):
            return False
        homes = {a.get("home_account_id") for a in accounts}
        return all(rt.get("home_account_id") in homes
                   for rt in self.search(self.CredentialType.REFRESH_TOKEN))


_TEXT_FIELDS = frozenset({
    "home_account_id", "environment", "client_id", "realm", "target", "secret", "credential_type",
    "local_account_id", "username", "authority_type", "family_id", "token_type", "key_id",
})
_TIME_FIELDS = frozenset({"expires_on", "extended_expires_on", "cached_at", "refresh_on"})
_STRING_FIELDS = _TEXT_FIELDS | _TIME_FIELDS
_NOTHING: frozenset[str] = frozenset()
# What msal indexes without a default when it reads an entry of each kind.
_REQUIRED_FIELDS = {
    "AccessToken": frozenset({"secret", "expires_on"}),
    "RefreshToken": frozenset({"secret"}),
    "IdToken": frozenset({"secret"}),
}


def is_msal_cache(document: Any) -> bool:
    """Is ``document`` shaped as msal reads it: sections of entries, each a dict whose
    identity fields are strings and times are whole numbers as (ASCII) strings, with the
    fields msal's lookups index without a default?

    Every re-load of a user checks their whole cache, so each field costs one set lookup
    (a string value: is it a time?; any other value: is it a field that must be a string?)."""
    if not isinstance(document, dict):
        return False
    for section, entries in document.items():
        if not isinstance(entries, dict):
            return False
        required = _REQUIRED_FIELDS.get(section, _NOTHING)
        for entry in entries.values():
            if not isinstance(entry, dict) or not required <= entry.keys():
                return False
            for name, value in entry.items():
                if isinstance(value, str):
                    if name in _TIME_FIELDS and not (value.isascii() and value.isdigit()):
                        return False
                elif name in _STRING_FIELDS:
                    return False
    return True


def _is_user(account: dict[str, Any], oid: str, tid: str) -> bool:
    """Match on the object id and tenant *in this tenant* (``local_account_id``, ``realm``),
    not on ``home_account_id``: for a guest (B2B) user that names their home tenant, so it
    never equals the API token's ``oid.tid``."""
    return (str(account.get("local_account_id", "")).lower() == oid.lower()
            and str(account.get("realm", "")).lower() == tid.lower())


def stored_scopes(requested: Iterable[str], returned: Iterable[str]) -> list[str]:
    """The scopes a new token is filed under.

    Returned short names (``User.Read``) get the resource prefix of the request, so both
    of Entra's forms match an explicit request. A ``/.default`` request is filed under
    ``/.default`` too, since by definition it was granted whatever Entra returned.
    """
    requested = list(requested)
    resource = next(
        (s.rsplit("/", 1)[0] for s in requested if "/" in s and s not in OIDC_SCOPES), None
    )
    scopes = set()
    for scope in returned:
        if resource and scope not in OIDC_SCOPES and "/" not in scope and ":" not in scope:
            scope = f"{resource}/{scope}"
        scopes.add(scope)
    scopes.update(s for s in requested if s.endswith("/.default"))
    return sorted(scopes)


def _scope_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple, set)):
        return [s for s in value if isinstance(s, str)]
    return []


def _deflate(data: bytes) -> bytes:
    """zlib at level 9 with an 8 KiB window (``wbits`` 13) instead of 32 KiB: a sealed cache
    is a few KiB, so the bytes are the same, and the compressor's smaller buffers make it
    cheaper to set up, which for a few KiB is most of its work. ``open`` (any window, up to
    32 KiB) reads both, so blobs sealed before and after this change open alike."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, 13)
    return deflater.compress(data) + deflater.flush()


class TokenCacheCodec:
    """Serialized msal cache ⇄ the bytes stored for it.

    Layout before encryption: version byte, 32-byte partition digest, zlib(compact JSON).
    The Fernet token is stored decoded from its base64 text: the same bytes, a quarter
    smaller. Put a new key first to rotate: old blobs still decrypt and are re-sealed
    with the new key on their next write.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        fernets = [Fernet(key) for key in keys]
        if not fernets:
            raise ValueError("at least one Fernet key is required")
        self._first = fernets[0]
        self._fernet = MultiFernet(fernets)

    def seal(self, partition: str, serialized: str) -> bytes:
        """``serialized`` sealed as it is: give it compact (``UserTokenCache.serialize``)."""
        plaintext = _FORMAT_VERSION + bytes.fromhex(partition) + _deflate(serialized.encode())
        return base64.urlsafe_b64decode(self._fernet.encrypt(plaintext))

    def sealed_with_first_key(self, blob: bytes) -> bool:
        """Does the first key alone decrypt ``blob``? (Fernet tokens do not name their key.)"""
        try:
            self._first.decrypt(base64.urlsafe_b64encode(blob))
        except InvalidToken:
            return False
        return True

    def rekeyed(self, blob: bytes) -> bytes:
        """``blob`` re-encrypted with the first key (``MultiFernet.rotate``: same plaintext,
        same timestamp). Raises ``InvalidToken`` when no key decrypts it."""
        return base64.urlsafe_b64decode(self._fernet.rotate(base64.urlsafe_b64encode(blob)))

    def open(self, partition: str, blob: bytes) -> str | None:
        """The serialized cache, or None (logged) when the blob must not be used."""
        try:
            plaintext = self._fernet.decrypt(base64.urlsafe_b64encode(blob))
        except InvalidToken:
            log.warning("token cache for partition %s does not decrypt; ignoring it", partition)
            return None
        header_length = len(_FORMAT_VERSION) + _PARTITION_BYTES
        if (
            plaintext[:1] != _FORMAT_VERSION
            or plaintext[1:header_length] != bytes.fromhex(partition)
        ):
            log.warning("token cache under partition %s belongs to another partition; ignoring it",
                        partition)
            return None
        inflater = zlib.decompressobj()
        try:
            serialized = inflater.decompress(plaintext[header_length:], MAX_SERIALIZED_BYTES)
        except zlib.error:
            serialized = b""
        if not serialized or inflater.unconsumed_tail:
            log.warning("token cache for partition %s is unreadable; ignoring it", partition)
            return None
        return serialized.decode()
