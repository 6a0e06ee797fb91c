"""The state folder: CA, TLS and client certificates, signing keys, CA bundle.

Everything secret or machine-specific is generated on first use instead of being
committed, so each checkout gets its own CA and keys. ``ensure_state`` is idempotent
and safe to call from several processes at once (exclusive lock + atomic writes);
every CLI command and ``create_app`` call it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from devtenant import DEFAULT_AUTHORITY_HOST, STATE_DIR_ENV, pki
from devtenant.fsutil import atomic_write, exclusive_lock
from devtenant.keys import add_new_key

DEFAULT_STATE_DIR = ".devtenant"
SYSTEM_CA_FALLBACK = "/etc/ssl/certs/ca-certificates.crt"


@dataclass(frozen=True)
class StatePaths:
    """Where each artefact lives inside the state folder."""

    root: Path

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server-key.pem"

    @property
    def client_pem(self) -> Path:
        """Private key + certificate of the API app (AZURE_CLIENT_CERTIFICATE_PATH)."""
        return self.root / "api-client.pem"

    @property
    def ca_bundle(self) -> Path:
        """System CAs + the local CA, for REQUESTS_CA_BUNDLE."""
        return self.root / "ca-bundle.pem"

    @property
    def signing_keys(self) -> Path:
        return self.root / "signing-keys.json"

    def federation_keys(self, name: str) -> Path:
        """Signing keys of the federation (workload identity) issuer ``name``."""
        return self.root / f"federation-{name}-keys.json"

    @property
    def revocations(self) -> Path:
        """Users whose sessions were revoked (CAE), shared by the CLI and the server."""
        return self.root / "revocations.json"

    @property
    def federated_token(self) -> Path:
        """Default AZURE_FEDERATED_TOKEN_FILE (``federated-token``, ``env --federated``)."""
        return self.root / "federated-token"

    @property
    def server_info(self) -> Path:
        """The public URL of the last ``serve``, the default issuer for ``token``."""
        return self.root / "server.json"


def resolve_state_dir(state_dir: str | os.PathLike[str] | None = None) -> Path:
    """Explicit argument, else $DEVTENANT_STATE_DIR, else ./.devtenant (absolute)."""
    chosen = state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    return Path(chosen).expanduser().resolve()


def _system_ca_pem() -> bytes:
    """The CAs ``requests`` would trust by default, so the bundle stays a superset."""
    try:
        import certifi

        candidate = certifi.where()
    except ImportError:  # certifi is a dependency of requests, but be forgiving
        candidate = SYSTEM_CA_FALLBACK
    for path in (candidate, SYSTEM_CA_FALLBACK):
        if os.path.exists(path):
            return Path(path).read_bytes()
    return b""


def _write_if_changed(path: Path, data: bytes, mode: int = 0o644) -> None:
    if not path.exists() or path.read_bytes() != data:
        atomic_write(path, data, mode)


def _ensure_ca(paths: StatePaths) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    if paths.ca_cert.exists() and paths.ca_key.exists():
        return (
            pki.load_pem_certs(paths.ca_cert.read_bytes())[0],
            pki.load_pem_key(paths.ca_key.read_bytes()),
        )
    key = pki.new_rsa_key()
    cert = pki.make_ca(key)
    atomic_write(paths.ca_key, pki.key_pem(key))
    atomic_write(paths.ca_cert, pki.cert_pem(cert), 0o644)
    # A new CA invalidates any leaf signed by an old one.
    for stale in (paths.server_cert, paths.server_key):
        stale.unlink(missing_ok=True)
    return cert, key


def _ensure_server_cert(
    paths: StatePaths,
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    extra_sans: Iterable[str],
) -> None:
    wanted = [pki.normalise_san(n) for n in (*pki.DEFAULT_SANS, *extra_sans) if n.strip()]
    if paths.server_cert.exists() and paths.server_key.exists():
        current = pki.load_pem_certs(paths.server_cert.read_bytes())[0]
        have = {pki.normalise_san(n) for n in pki.san_names(current)}
        if set(wanted) <= have and not pki.needs_renewal(current):
            return
        # Keep the SANs earlier runs asked for, so `--san` is additive.
        wanted += sorted(have - set(wanted))
    key = pki.new_rsa_key()
    cert = pki.make_server_cert(ca_cert, ca_key, key, wanted)
    atomic_write(paths.server_key, pki.key_pem(key))
    atomic_write(paths.server_cert, pki.cert_pem(cert), 0o644)


def _ensure_client_pem(paths: StatePaths) -> None:
    if paths.client_pem.exists():
        certs = pki.load_pem_certs(paths.client_pem.read_bytes())
        if certs and not pki.needs_renewal(certs[0]):
            return
    key = pki.new_rsa_key()
    cert = pki.make_client_cert(key, "flask-obo API (devtenant client certificate)")
    atomic_write(paths.client_pem, pki.key_pem(key) + pki.cert_pem(cert))


def ensure_state(
    state_dir: str | os.PathLike[str] | None = None, extra_sans: Iterable[str] = ()
) -> StatePaths:
    """Create whatever is missing in the state folder and return its paths.

    Cheap when everything exists (a few file reads), so every entry point calls it.
    """
    paths = StatePaths(resolve_state_dir(state_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    gitignore = paths.root / ".gitignore"
    with exclusive_lock(paths.lock):
        if not gitignore.exists():
            atomic_write(gitignore, b"*\n", 0o644)
        ca_cert, ca_key = _ensure_ca(paths)
        _ensure_server_cert(paths, ca_cert, ca_key, extra_sans)
        _ensure_client_pem(paths)
        if not paths.signing_keys.exists():
            add_new_key(paths.signing_keys)
        for name in _federation_issuers():
            if not paths.federation_keys(name).exists():
                add_new_key(paths.federation_keys(name))
        bundle = _system_ca_pem().rstrip(b"\n") + b"\n" + paths.ca_cert.read_bytes()
        _write_if_changed(paths.ca_bundle, bundle.lstrip(b"\n"))
    return paths


def _federation_issuers() -> tuple[str, ...]:
    from devtenant.directory import Directory

    return Directory.load().federation_issuers


def rotate_signing_keys(state_dir: str | os.PathLike[str] | None = None) -> str:
    """Make a new active signing key (older ones stay published); returns its kid."""
    paths = ensure_state(state_dir)
    with exclusive_lock(paths.lock):
        return add_new_key(paths.signing_keys)


def record_server_url(paths: StatePaths, url: str) -> None:
    """Remember the URL ``serve`` answers on, so ``token``/``env`` default to it."""
    with exclusive_lock(paths.lock):
        atomic_write(paths.server_info, json.dumps({"public_url": url}).encode(), 0o644)


def recorded_server_url(paths: StatePaths) -> str:
    """URL recorded by the last ``serve``, else the documented default."""
    try:
        data = json.loads(paths.server_info.read_text(encoding="utf-8"))
        return str(data["public_url"]).rstrip("/")
    except (OSError, ValueError, KeyError):
        return DEFAULT_AUTHORITY_HOST


def client_certificate_pem(paths: StatePaths) -> bytes:
    """Only the certificate part of api-client.pem (what is 'uploaded' to the app)."""
    return pki.cert_pem(pki.load_pem_certs(paths.client_pem.read_bytes())[0])


def client_private_key_pem(paths: StatePaths) -> bytes:
    """Only the private key part of api-client.pem."""
    return pki.key_pem(pki.load_pem_key(paths.client_pem.read_bytes()))
