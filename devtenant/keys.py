"""Token signing keys: creation, rotation and a hot-reloading key store.

Entra publishes several keys in its JWKS and rotates the active one from time to time;
APIs that cache the JWKS and never refetch on an unknown ``kid`` break in production.
To let tests reproduce that, the keys live in one JSON file in the state folder
(newest first, the first one signs). ``rotate-keys`` rewrites that file atomically,
and a running server notices the change with a cheap ``stat`` per request.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from joserfc.jwk import KeySet, RSAKey

from devtenant.fsutil import atomic_write

#: Active key plus the previous two stay published, as Entra keeps old keys for a while.
KEEP_KEYS = 3


def new_signing_key() -> RSAKey:
    """RSA 2048 key whose ``kid`` is its RFC 7638 thumbprint (stable and unique)."""
    key = RSAKey.generate_key(2048, private=True)
    key.ensure_kid()
    return key


def read_keys(path: Path) -> list[RSAKey]:
    """Keys from the key file, newest (active) first."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return [RSAKey.import_key(item) for item in data["keys"]]


def write_keys(path: Path, keys: list[RSAKey]) -> None:
    """Atomically replace the key file, so a reader never sees half a file."""
    payload = {"keys": [key.as_dict(private=True) for key in keys[:KEEP_KEYS]]}
    atomic_write(path, json.dumps(payload, indent=2).encode("utf-8"))


def add_new_key(path: Path) -> str:
    """Prepend a fresh key (it becomes the active one), drop the oldest; returns its kid.

    Callers hold the state lock, so two rotations never lose each other's key.
    """
    keys = read_keys(path) if path.exists() else []
    key = new_signing_key()
    write_keys(path, [key, *keys])
    return str(key.kid)


class KeyStore:
    """Thread-safe view of the key file that reloads when the file changes.

    The check is an ``os.stat`` per access; the file is replaced with ``os.replace``,
    so the inode changes on every rotation even when mtime granularity is coarse.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._keys: list[RSAKey] = []

    def _current(self) -> list[RSAKey]:
        st = os.stat(self.path)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._keys = read_keys(self.path)
                self._stamp = stamp
            return self._keys

    @property
    def active(self) -> RSAKey:
        """The key that signs new tokens."""
        return self._current()[0]

    @property
    def active_kid(self) -> str:
        return str(self.active.kid)

    def public_key_set(self) -> KeySet:
        """All published keys (public parts), for verifying tokens this tenant issued."""
        return KeySet([RSAKey.import_key(k.as_dict(private=False)) for k in self._current()])

    def jwks(self, issuer: str) -> dict[str, Any]:
        """The JWKS document in Entra's shape (public members only)."""
        keys = []
        for key in self._current():
            public = key.as_dict(private=False)
            keys.append(
                {
                    "kty": "RSA",
                    "use": "sig",
                    "kid": key.kid,
                    "n": public["n"],
                    "e": public["e"],
                    "issuer": issuer,
                }
            )
        return {"keys": keys}
