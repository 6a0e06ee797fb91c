"""Background handles: on-behalf-of work that outlives the request.

A route starts a job that will call Graph as its user long after the request (and the
SPA's token) is gone: ``obo.background_handle()`` returns an opaque string the job queue
carries, and the job, in any process with the same settings, passes it as
``on_behalf_of=`` to ``acquire_token``, ``downstream`` or ``user_credential``. The job
is then served from that user's cache entry and its refresh token (msal redeems it when
the access token has expired), for as long as Entra ID honours the refresh token. This
is what MSAL.NET's ``InitiateLongRunningProcessInWebApi`` does.

A handle is the user's ``oid``, ``tid`` and the generation of their cache entry
(``UserTokenCache.generation``), encrypted and authenticated with Fernet under keys
derived (HKDF, a label of their own, the API's client id) from ``TOKEN_CACHE_KEYS``:

* it reveals nothing but its creation time (Fernet's timestamp);
* it cannot be forged, nor edited to name another user: that fails the Fernet MAC, and
  the handle is refused before anything is read for it (``InvalidBackgroundHandle``);
* sealed with the first key, it opens with any of them (``MultiFernet``): rotating
  ``TOKEN_CACHE_KEYS`` keeps handles working while their key is listed;
* a sign-out (``forget_user``) removes the entry, and the entry the user gets on their
  next sign-in has a new generation, so the old handles stop working
  (``BackgroundHandleRevoked``); a refresh token Entra ID refuses ends them too
  (``RefreshTokenExpired``). Both are ``InteractionRequired``: the job records it and the
  user starts it again after signing in.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import InvalidBackgroundHandle
from .protector import EntraAccessToken
from .token_acquisition import CachedUser

#: The HKDF label: handle keys are never the keys that seal token caches.
HANDLE_KEY_INFO = b"flask-obo background handle v1"
MAX_HANDLE_LENGTH = 2048  # a handle is ~250 characters; anything far longer is not one


class BackgroundHandles:
    """Issues and opens background handles for one API (its client id and cache keys)."""

    def __init__(self, cache_keys: Iterable[str], client_id: str) -> None:
        fernets = [Fernet(_handle_key(key, client_id)) for key in cache_keys]
        if not fernets:
            raise ValueError("at least one Fernet key is required")
        self._fernet = MultiFernet(fernets)

    def issue(self, user: EntraAccessToken, generation: str) -> str:
        """A handle naming ``user`` and their cache entry's ``generation``."""
        payload = json.dumps({"o": user.oid, "t": user.tid, "g": generation}, separators=(",", ":"))
        return self._fernet.encrypt(payload.encode()).decode("ascii")

    def open(self, handle: str) -> CachedUser:
        """The user ``handle`` names; ``InvalidBackgroundHandle`` (400) for anything this
        API did not issue or that was altered, whatever the defect: nothing else is done
        for such a handle, no Redis read and no call to Entra ID."""
        if not isinstance(handle, str) or not handle or len(handle) > MAX_HANDLE_LENGTH:
            raise InvalidBackgroundHandle()
        try:
            payload = json.loads(self._fernet.decrypt(handle.encode("ascii")))
        except (InvalidToken, UnicodeError, ValueError):
            raise InvalidBackgroundHandle() from None
        fields = [payload.get(name) for name in ("o", "t", "g")] if isinstance(payload, dict) else []
        values = [value for value in fields if isinstance(value, str) and value]
        if len(values) != 3:
            raise InvalidBackgroundHandle()  # authentic but not a handle of ours: another use of the key
        oid, tid, generation = values
        return CachedUser(oid, tid, generation)


def _handle_key(cache_key: str, client_id: str) -> bytes:
    """A Fernet key for handles derived from a ``TOKEN_CACHE_KEYS`` key (HKDF-SHA256). The
    client id in the label keeps two APIs sharing cache keys from honouring each other's
    handles."""
    secret = base64.urlsafe_b64decode(cache_key)
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=HANDLE_KEY_INFO + b"|" + client_id.encode()).derive(secret)
    return base64.urlsafe_b64encode(derived)
