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

from devtenant import (
    API_APP_ROLE,
    API_CLIENT_ID,
    API_CLIENT_SECRET,
    SPA_CLIENT_ID,
    TENANT_ID,
    revocation,
)
from devtenant.directory import Directory, User
from devtenant.federation import (
    DEFAULT_ISSUER,
    DEFAULT_LIFETIME,
    DEFAULT_SUBJECT,
    TOKEN_EXCHANGE_AUDIENCE,
    federation_issuer,
    mint_service_account_token,
)
from devtenant.fsutil import atomic_write
from devtenant.keys import KeyStore
from devtenant.managed_identity import MSI_PATH
from devtenant.state import (
    StatePaths,
    client_certificate_pem,
    client_private_key_pem,
    ensure_state,
    recorded_server_url,
    resolve_state_dir,
    rotate_signing_keys,
)
from devtenant.tokens import TokenMinter, issuer_for, v1_issuer_for, v1_issuer_host


class DevTenant:
    """Handle on one state folder and the authority host tokens should name."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        authority_host: str | None = None,
    ) -> None:
        self.paths = StatePaths(resolve_state_dir(state_dir))
        self._authority_host = authority_host.rstrip("/") if authority_host else None
        self._minter_cache: dict[str, TokenMinter] | None = None

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
    def v1_issuer_host(self) -> str:
        """AZURE_V1_ISSUER_HOST: ``<authority host>/sts`` (Entra: https://sts.windows.net);
        v1 tokens' issuer is ``<this>/<tid>/``."""
        return v1_issuer_host(self.authority_host)

    def authority_for(self, tenant: str | None = None) -> str:
        """msal ``authority`` for a hosted tenant (GUID or domain; default: home)."""
        return f"{self.authority_host}/{self._tenant(tenant).tenant_id}"

    def federation_issuer(self, name: str = DEFAULT_ISSUER) -> str:
        """The AKS-style OIDC issuer the API's federated credential trusts."""
        return federation_issuer(self.authority_host, name)

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

    def directory(self, tenant: str | None = None) -> Directory:
        """The home tenant's directory, or the hosted tenant ``tenant`` (GUID or domain)."""
        self.ensure_state()
        return self._tenant(tenant)

    def directories(self) -> list[Directory]:
        """Every hosted tenant, home first."""
        return [m.directory for m in self._minters().values()]

    def _minters(self) -> dict[str, TokenMinter]:
        """Built once; the KeyStore re-reads the key file after any rotation."""
        if self._minter_cache is None:
            self.ensure_state()
            keys = KeyStore(self.paths.signing_keys)
            tenants = Directory.load_all(self.paths.root)
            self._minter_cache = {d.tenant_id: TokenMinter(keys, d) for d in tenants}
        return self._minter_cache

    def _minter(self, tenant: str | None = None) -> TokenMinter:
        return self._minters()[self._tenant(tenant).tenant_id]

    def _tenant(self, tenant: str | None) -> Directory:
        minters = self._minters()
        if tenant is None:
            return next(iter(minters.values())).directory
        for minter in minters.values():
            if minter.directory.is_tenant(tenant):
                return minter.directory
        known = ", ".join(f"{m.directory.tenant_id} ({m.directory.domain})" for m in minters.values())
        raise KeyError(f"unknown tenant {tenant!r}; hosted tenants: {known}")

    def find_user(self, user: str, tenant: str | None = None) -> tuple[Directory, User]:
        """A user by short name, UPN or object id: in ``tenant`` if given, else the home
        tenant first, then the others (a UPN names its tenant by its domain)."""
        if tenant is not None:
            directory = self._tenant(tenant)
            return directory, directory.require_user(user)
        domain = user.rpartition("@")[2].lower() if "@" in user else None
        candidates = self.directories()
        for directory in candidates:
            if domain and domain != directory.domain:
                continue
            found = directory.user(user)
            if found is not None:
                return directory, found
        known = ", ".join(u.upn for d in candidates for u in d.users)
        raise KeyError(f"unknown user {user!r}; known users: {known}")

    # --- tokens ------------------------------------------------------------------------
    def api_token(
        self,
        user: str,
        scopes: Sequence[str] = ("user_impersonation",),
        lifetime: int = 3600,
        expired: bool = False,
        mfa: bool = False,
        v1: bool = False,
        tenant: str | None = None,
    ) -> str:
        """Access token for the API exactly as the SPA receives it.

        ``user`` is a short name, UPN or object id; ``scopes`` are API scopes, short or
        ``api://.../name``. ``mfa`` adds ``amr: ["pwd", "mfa"]``. ``v1``: a v1 token
        (issuer ``<host>/sts/<tid>/``, audience the App ID URI, ``appid``, ``upn``,
        ``ver: "1.0"``). ``tenant`` (GUID or domain) picks the user's tenant; without
        it the user is looked up in the home tenant, then the second one.
        """
        directory, found = self.find_user(user, tenant)
        minter = self._minter(directory.tenant_id)
        api = directory.app_by_key("api")
        scp = []
        for scope in scopes:
            for name in scope.split():
                short = name.rsplit("/", 1)[-1]
                if short not in api.scopes:
                    raise ValueError(f"the API exposes no scope {name!r} (has {api.scopes})")
                scp.append(short)
        tid = directory.tenant_id
        return minter.user_token(
            issuer=v1_issuer_for(self.authority_host, tid) if v1 else issuer_for(self.authority_host, tid),
            audience=api.identifier if v1 else api.audience,
            user=found,
            azp=SPA_CLIENT_ID,
            azpacr="0",
            scp=scp,
            amr=("pwd", "mfa") if mfa else (),
            lifetime=lifetime,
            expired=expired,
            v1=v1,
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

    # --- workload identity federation ----------------------------------------------------
    def federated_token(
        self,
        subject: str = DEFAULT_SUBJECT,
        audience: str = TOKEN_EXCHANGE_AUDIENCE,
        lifetime: int = DEFAULT_LIFETIME,
        expired: bool = False,
        issuer: str = DEFAULT_ISSUER,
    ) -> str:
        """A service account token of the AKS-style issuer ``issuer`` (its own key), as
        the kubelet projects it: with the defaults, the API's federated credential
        ``aks-flask-obo`` accepts it as ``client_assertion``."""
        self.ensure_state()
        path = self.paths.federation_keys(issuer)
        if not path.exists():
            raise KeyError(f"unknown federation issuer {issuer!r}")
        return mint_service_account_token(
            KeyStore(path), self.federation_issuer(issuer), subject, audience, lifetime, expired
        )

    def write_federated_token(self, path: str | os.PathLike[str] | None = None, **kwargs: object) -> Path:
        """Write :meth:`federated_token` to ``path`` (default ``<state>/federated-token``)
        atomically, as AKS refreshes AZURE_FEDERATED_TOKEN_FILE; returns the path."""
        target = Path(path) if path is not None else self.paths.federated_token
        token = self.federated_token(**kwargs)  # type: ignore[arg-type]
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, token.encode("ascii"), 0o644)
        return target

    # --- managed identity ----------------------------------------------------------------
    def managed_identity_endpoint(self) -> str:
        return f"{self.authority_host}{MSI_PATH}"

    def managed_identity_env(self, user_assigned: bool = False) -> dict[str, str]:
        """IDENTITY_ENDPOINT + IDENTITY_HEADER (App Service's), and with ``user_assigned``
        AZURE_MANAGED_IDENTITY_CLIENT_ID of the user-assigned identity."""
        directory = self.directory()
        values = {
            "IDENTITY_ENDPOINT": self.managed_identity_endpoint(),
            "IDENTITY_HEADER": directory.identity_header or "",
        }
        if user_assigned:
            identity = next(i for i in directory.managed_identities if i.kind == "UserAssigned")
            values["AZURE_MANAGED_IDENTITY_CLIENT_ID"] = identity.client_id
        return values

    # --- continuous access evaluation ------------------------------------------------------
    def revoke(self, user: str, require_sign_in: bool = False, require_mfa: bool = False
               ) -> revocation.Revocation:
        """Revoke the user's sessions now (a running server sees it at once); see
        :mod:`devtenant.revocation` for what each flag does."""
        self.ensure_state()
        _, found = self.find_user(user)
        return revocation.revoke(self.paths, found.oid, require_sign_in, require_mfa)

    def clear_revocation(self, user: str | None = None) -> None:
        """Forget the user's revocation (all revocations without ``user``)."""
        self.ensure_state()
        revocation.clear(self.paths, self.find_user(user)[1].oid if user else None)

    # --- configuration for the API -----------------------------------------------------
    def env(
        self,
        certificate: bool = False,
        federated: bool = False,
        managed_identity: bool = False,
        user_assigned: bool = False,
    ) -> dict[str, str]:
        """Environment variables that point the API at this dev tenant.

        The credential is the client secret, or with ``certificate`` the certificate,
        with ``federated`` a federated token file (written now, 1 h;
        AZURE_FEDERATED_TOKEN_FILE), with ``managed_identity`` App Service's endpoint
        (IDENTITY_ENDPOINT/IDENTITY_HEADER; ``user_assigned`` adds
        AZURE_MANAGED_IDENTITY_CLIENT_ID).
        """
        self.ensure_state()
        values = {
            "AZURE_TENANT_ID": TENANT_ID,
            "AZURE_CLIENT_ID": API_CLIENT_ID,
            "AZURE_AUTHORITY_HOST": self.authority_host,
            "AZURE_V1_ISSUER_HOST": self.v1_issuer_host,
            "GRAPH_BASE_URL": f"{self.authority_host}/v1.0",
            # Daemons with this role on the API may call /api/whoami (see DevTenant.daemon_env).
            "API_APP_ROLE": API_APP_ROLE,
            "REQUESTS_CA_BUNDLE": str(self.ca_bundle_path),
        }
        if federated:
            values["AZURE_FEDERATED_TOKEN_FILE"] = str(self.write_federated_token())
        elif managed_identity or user_assigned:
            values["AZURE_CLIENT_ASSERTION"] = "managed_identity"
            values.update(self.managed_identity_env(user_assigned))
        elif certificate:
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
