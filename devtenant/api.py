"""Python API for tests and scripts: mint SPA tokens, rotate keys, get the API's env.

A browser SPA gets its tokens from the sign-in pages (:mod:`devtenant.signin`);
tests and scripts skip the browser: minting them directly with the tenant's signing
key yields exactly what the SPA would hold (aud = API, azp = SPA, scp), which is all
the API ever sees.
Works without a running server: everything is read from the state folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from devtenant import API_CLIENT_ID, API_CLIENT_SECRET, SPA_CLIENT_ID, TENANT_ID
from devtenant.directory import Directory
from devtenant.keys import KeyStore
from devtenant.state import (
    StatePaths,
    client_certificate_pem,
    client_private_key_pem,
    ensure_state,
    recorded_server_url,
    resolve_state_dir,
    rotate_signing_keys,
)
from devtenant.tokens import TokenMinter, issuer_for


class DevTenant:
    """Handle on one state folder and the authority host tokens should name."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        authority_host: str | None = None,
    ) -> None:
        self.paths = StatePaths(resolve_state_dir(state_dir))
        self._authority_host = authority_host.rstrip("/") if authority_host else None
        self._minter_cache: TokenMinter | None = None

    # --- locations -------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.paths.root

    @property
    def authority_host(self) -> str:
        """Explicit host, else the URL the last ``serve`` recorded, else localhost:8443."""
        return self._authority_host or recorded_server_url(self.paths)

    @property
    def authority(self) -> str:
        """What to pass to msal as ``authority``."""
        return f"{self.authority_host}/{TENANT_ID}"

    @property
    def issuer(self) -> str:
        return issuer_for(self.authority_host, TENANT_ID)

    @property
    def ca_bundle_path(self) -> Path:
        return self.paths.ca_bundle

    @property
    def client_certificate_path(self) -> Path:
        return self.paths.client_pem

    # --- state -------------------------------------------------------------------------
    def ensure_state(self, extra_sans: Iterable[str] = ()) -> StatePaths:
        """Create missing state (idempotent, safe alongside a running server)."""
        return ensure_state(self.paths.root, extra_sans)

    def rotate_keys(self) -> str:
        """New active signing key (a running server picks it up); returns its kid."""
        return rotate_signing_keys(self.paths.root)

    def active_kid(self) -> str:
        self.ensure_state()
        return KeyStore(self.paths.signing_keys).active_kid

    def directory(self) -> Directory:
        self.ensure_state()
        return Directory.load(self.paths.root)

    def _minter(self) -> TokenMinter:
        """Built once; its KeyStore re-reads the key file after any rotation."""
        if self._minter_cache is None:
            self.ensure_state()
            keys = KeyStore(self.paths.signing_keys)
            self._minter_cache = TokenMinter(keys, Directory.load(self.paths.root))
        return self._minter_cache

    # --- tokens ------------------------------------------------------------------------
    def api_token(
        self,
        user: str,
        scopes: Sequence[str] = ("user_impersonation",),
        lifetime: int = 3600,
        expired: bool = False,
        mfa: bool = False,
    ) -> str:
        """Access token for the API exactly as the SPA receives it.

        ``user`` is a short name or UPN; ``scopes`` are API scopes, short or
        ``api://.../name``. ``mfa`` adds ``amr: ["pwd", "mfa"]``.
        """
        minter = self._minter()
        directory = minter.directory
        api = directory.app_by_key("api")
        scp = []
        for scope in scopes:
            for name in scope.split():
                short = name.rsplit("/", 1)[-1]
                if short not in api.scopes:
                    raise ValueError(f"the API exposes no scope {name!r} (has {api.scopes})")
                scp.append(short)
        return minter.user_token(
            issuer=self.issuer,
            audience=api.audience,
            user=directory.require_user(user),
            azp=SPA_CLIENT_ID,
            azpacr="0",
            scp=scp,
            amr=("pwd", "mfa") if mfa else (),
            lifetime=lifetime,
            expired=expired,
        )

    def app_only_token(
        self, roles: Sequence[str] | None = None, lifetime: int = 3600, client_id: str = API_CLIENT_ID
    ) -> str:
        """App-only token for the API (``roles``, no ``scp``), as a daemon would get it."""
        minter = self._minter()
        directory = minter.directory
        api = directory.app_by_key("api")
        client = directory.client(client_id)
        if client is None:
            raise ValueError(f"unknown client {client_id!r}")
        granted = directory.app_roles_granted(client, api)
        return minter.app_token(
            issuer=self.issuer,
            audience=api.audience,
            client=client,
            azpacr="1",
            roles=list(roles) if roles is not None else list(granted),
            lifetime=lifetime,
        )

    # --- configuration for the API -----------------------------------------------------
    def env(self, certificate: bool = False) -> dict[str, str]:
        """Environment variables that point the API at this dev tenant."""
        self.ensure_state()
        values = {
            "AZURE_TENANT_ID": TENANT_ID,
            "AZURE_CLIENT_ID": API_CLIENT_ID,
            "AZURE_AUTHORITY_HOST": self.authority_host,
            "GRAPH_BASE_URL": f"{self.authority_host}/v1.0",
            "REQUESTS_CA_BUNDLE": str(self.ca_bundle_path),
        }
        if certificate:
            values["AZURE_CLIENT_CERTIFICATE_PATH"] = str(self.client_certificate_path)
        else:
            values["AZURE_CLIENT_SECRET"] = API_CLIENT_SECRET
        return values

    def msal_client_credential(self) -> dict[str, str]:
        """``client_credential`` for msal's ConfidentialClientApplication (certificate)."""
        self.ensure_state()
        return {
            "private_key": client_private_key_pem(self.paths).decode("ascii"),
            "public_certificate": client_certificate_pem(self.paths).decode("ascii"),
        }
