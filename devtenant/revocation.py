"""Revoked user sessions (Continuous Access Evaluation), shared through the state folder.

``python -m devtenant revoke <user>`` (or ``POST /_devtenant/revoke``) records *when* a
user's sessions were revoked, like an admin's "Revoke sessions" in Entra
(``revokeSignInSessions``). A running server re-reads the file when it changes (one
``stat`` per request), so the CLI reaches a running server. What a revocation does:

* Graph answers 401 ``insufficient_claims`` (``nbf`` = the revocation time) to
  CAE tokens (``xms_cc`` contains ``cp1``) issued before it; other tokens keep working
  until they expire, as in Entra (non-CAE tokens are short-lived instead).
* Refresh tokens issued before it are refused (AADSTS50173).
* ``require_sign_in``: OBO assertions issued before it are refused too
  (``interaction_required`` AADSTS50173 with the ``nbf`` claims challenge): the
  middle tier cannot recover silently and must send the challenge to its client.
* ``require_mfa``: implies ``require_sign_in``; the new assertion must also carry MFA
  (else AADSTS50079 with the tenant's MFA policy challenge).

Token times are whole seconds, so the revocation time is the next whole second and
recording it waits for that second to begin (under a second): every token issued
before the call has ``iat < at``, every token issued after it ``iat >= at``, without
ever dating a token in the future.
"""

from __future__ import annotations

import base64
import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from devtenant.fsutil import atomic_write, exclusive_lock
from devtenant.state import StatePaths


@dataclass(frozen=True)
class Revocation:
    at: int
    require_sign_in: bool = False
    require_mfa: bool = False

    def revokes(self, issued_at: float) -> bool:
        return issued_at < self.at

    def claims(self) -> str:
        """The claims request a client must satisfy: a token issued at or after ``at``."""
        return json.dumps(
            {"access_token": {"nbf": {"essential": True, "value": str(self.at)}}}, separators=(",", ":")
        )

    def claims_b64(self) -> str:
        """``claims`` as Graph's WWW-Authenticate carries it (standard base64)."""
        return base64.b64encode(self.claims().encode()).decode("ascii")


def _read(path: Path) -> dict[str, Revocation]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return {oid: Revocation(**item) for oid, item in data.items()}


def revoke(paths: StatePaths, oid: str, require_sign_in: bool = False,
           require_mfa: bool = False) -> Revocation:
    """Record a revocation of ``oid``'s sessions now (replacing an older one)."""
    record = Revocation(
        math.ceil(time.time()), require_sign_in or require_mfa, require_mfa
    )
    with exclusive_lock(paths.lock):
        current = _read(paths.revocations)
        current[oid] = record
        _write(paths.revocations, current)
    time.sleep(max(0.0, record.at - time.time()))
    return record


def clear(paths: StatePaths, oid: str | None = None) -> None:
    """Forget the revocation of ``oid`` (or all of them)."""
    with exclusive_lock(paths.lock):
        current = _read(paths.revocations)
        if oid is None:
            current.clear()
        else:
            current.pop(oid, None)
        _write(paths.revocations, current)


def _write(path: Path, records: dict[str, Revocation]) -> None:
    payload = {oid: asdict(r) for oid, r in records.items()}
    atomic_write(path, json.dumps(payload, indent=2).encode("utf-8"), 0o644)


class RevocationStore:
    """Thread-safe, hot-reloading view of revocations.json (absent file: none)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._records: dict[str, Revocation] = {}

    def get(self, oid: str) -> Revocation | None:
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._records = _read(self.path) if stamp else {}
                self._stamp = stamp
            return self._records.get(oid)
