"""The tenant's directory: users, app registrations, consent and app-role assignments.

All of it comes from ``directory.json`` (shipped with the package) so the fixed
identities the API and its tests rely on are data, not code. Lookups accept the
forms people actually type: a user by short name, UPN or object id; an app by
client id or any of its identifier URIs.
"""

from __future__ import annotations

import hmac
import json
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from devtenant import pki


@dataclass(frozen=True)
class User:
    """A directory user; ``profile`` holds the Graph ``user`` properties."""

    short: str
    oid: str
    upn: str
    display_name: str
    manager: str | None
    flags: frozenset[str]
    profile: dict[str, Any]

    @property
    def mfa_required(self) -> bool:
        return "mfa_required" in self.flags

    @property
    def consent_missing(self) -> bool:
        return "consent_missing" in self.flags


#: Hosts of loopback redirect URIs (RFC 8252 section 7.3): any port matches.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def origin_of(uri: str) -> str:
    """scheme://host[:port] of a URL, as a browser's ``Origin`` header names it."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _is_loopback(uri: str) -> bool:
    parts = urlsplit(uri)
    return parts.scheme == "http" and (parts.hostname or "") in LOOPBACK_HOSTS


def redirect_uri_matches(registered: str, requested: str) -> bool:
    """Exact match, except that an ``http`` loopback URI matches on any port (as Entra
    does for ``http://localhost`` and ``http://127.0.0.1``, per RFC 8252)."""
    if requested == registered:
        return True
    if not (_is_loopback(registered) and _is_loopback(requested)):
        return False
    want, got = urlsplit(registered), urlsplit(requested)
    try:
        got.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    return (got.hostname, got.path or "/", got.query, got.fragment) == (
        want.hostname, want.path or "/", want.query, want.fragment,
    )  # fmt: skip


@dataclass(frozen=True)
class FederatedCredential:
    """A federated identity credential on an app registration (workload identity federation).

    ``issuer`` is a path on the dev tenant (``/federation/aks``, or ``/<tid>/v2.0`` for
    managed identities, whose tokens the tenant itself issues): the dev tenant is
    reached under several hosts (localhost, the docker-compose name), so only the
    path of an assertion's ``iss`` is compared. ``subject`` and ``audiences`` are
    compared exactly (case-sensitively), as Entra does.
    """

    name: str
    issuer: str
    subject: str
    audiences: tuple[str, ...]


@dataclass(frozen=True)
class ManagedIdentity:
    """A managed identity (service principal only) that App Service hands tokens for."""

    key: str
    kind: str  # "SystemAssigned" | "UserAssigned"
    display_name: str
    client_id: str
    object_id: str


@dataclass
class App:
    """An app registration + service principal; doubles as Authlib's client model."""

    key: str
    client_id: str
    display_name: str
    identifier_uris: tuple[str, ...]
    service_principal_id: str
    public_client: bool = True
    client_secret: str | None = None
    certificate_file: str | None = None
    token_audience: str | None = None
    scopes: tuple[str, ...] = ()
    app_roles: tuple[str, ...] = ()
    #: Redirect URIs of the 'Single-Page Application' platform (manifest ``spa.redirectUris``).
    spa_redirect_uris: tuple[str, ...] = ()
    federated_credentials: tuple[FederatedCredential, ...] = ()
    certificates: list[x509.Certificate] = field(default_factory=list)

    @property
    def identifier(self) -> str:
        """The resource identifier tokens use as ``aud`` prefix for scopes."""
        return self.identifier_uris[0] if self.identifier_uris else self.client_id

    @property
    def audience(self) -> str:
        """``aud`` of access tokens for this resource: its client id, as in v2 tokens,
        unless the registration says otherwise (Graph: https://graph.microsoft.com)."""
        return self.token_audience or self.client_id

    # --- authlib.oauth2.rfc6749.ClientMixin -------------------------------------
    def get_client_id(self) -> str:
        return self.client_id

    def check_client_secret(self, client_secret: str) -> bool:
        return bool(self.client_secret) and hmac.compare_digest(
            self.client_secret.encode(), client_secret.encode()
        )

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.public_client:
            return method == "none"
        return method in {"client_secret_basic", "client_secret_post", "private_key_jwt"}

    def check_grant_type(self, grant_type: str) -> bool:
        if self.public_client:  # a SPA: codes (PKCE) and the refresh tokens they bring
            return bool(self.spa_redirect_uris) and grant_type in {"authorization_code", "refresh_token"}
        return True

    def get_allowed_scope(self, scope: str) -> str:
        return scope

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return any(redirect_uri_matches(r, redirect_uri) for r in self.spa_redirect_uris)

    def get_default_redirect_uri(self) -> str | None:
        return self.spa_redirect_uris[0] if self.spa_redirect_uris else None

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    # --- SPA platform -----------------------------------------------------------------
    def check_origin(self, origin: str | None) -> bool:
        """Is ``origin`` the origin of one of the SPA redirect URIs (loopback: any port)?"""
        if not origin:
            return False
        origin = origin.rstrip("/").lower()
        return any(
            origin == origin_of(r) or redirect_uri_matches(r, f"{origin}{urlsplit(r).path or '/'}")
            for r in self.spa_redirect_uris
        )


#: In a state folder: ``{"count": N}`` adds N synthetic users to the home tenant
#: (``load00001``...), for load tests that need many distinct users (see ``write_load_users``).
LOAD_USERS_FILE = "load-users.json"
_LOAD_USERS = uuid.UUID("5b0c2a8e-7f3d-4c1a-9e6b-2d4f8a0c1e37")  # their object ids' namespace


def write_load_users(state_root: Path, count: int) -> None:
    """Give the home tenant ``count`` synthetic users (``load00001``…) once the dev tenant
    (re)starts on ``state_root``: consented, no manager, no MFA."""
    (state_root / LOAD_USERS_FILE).write_text(json.dumps({"count": count}))


def load_user_name(n: int) -> str:
    """The short name of the ``n``-th synthetic user (1-based)."""
    return f"load{n:05d}"


def _load_users(state_root: Path | None, domain: str) -> list[dict[str, Any]]:
    path = state_root / LOAD_USERS_FILE if state_root is not None else None
    if path is None or not path.exists():
        return []
    count = int(json.loads(path.read_text())["count"])
    users = []
    for n in range(1, count + 1):
        short = load_user_name(n)
        upn = f"{short}@{domain}"
        users.append({"short": short, "id": str(uuid.uuid5(_LOAD_USERS, short)),
                      "displayName": f"Load User {n}", "givenName": "Load", "surname": f"User {n}",
                      "userPrincipalName": upn, "mail": upn, "jobTitle": None, "officeLocation": None,
                      "businessPhones": [], "mobilePhone": None, "preferredLanguage": "en-US",
                      "manager": None, "flags": []})
    return users


def _read_json() -> dict[str, Any]:
    text = resources.files("devtenant").joinpath("directory.json").read_text("utf-8")
    return json.loads(text)


class Directory:
    """In-memory view of directory.json, plus the client certificates from the state folder."""

    def __init__(self, data: dict[str, Any], state_root: Path | None = None) -> None:
        tenant = data["tenant"]
        #: The tenant that holds the app registrations (the others only have their SPs).
        self.home: bool = data.get("home", True)
        self.tenant_id: str = tenant["id"]
        self.tenant_name: str = tenant["display_name"]
        self.domain: str = tenant["domain"]
        self.mfa_policy_id: str = tenant["mfa_policy_id"]
        self.apps = [self._app(a, state_root) for a in data["applications"]]
        synthetic = _load_users(state_root, self.domain) if self.home else []
        self.users = [self._user(u) for u in [*data["users"], *synthetic]]
        self._by_ref = {ref: user for user in reversed(self.users)
                        for ref in (user.short, user.upn.lower(), user.oid)}
        self._delegated = {
            (g["client_id"], g["resource"]): tuple(g["scope"].split())
            for g in data["oauth2_permission_grants"]
        }
        self._roles = {
            (g["client_id"], g["resource"]): tuple(g["roles"]) for g in data["app_role_assignments"]
        }
        identities = data.get("managed_identities", {})
        self.identity_header: str | None = identities.get("identity_header")
        self.managed_identities = [ManagedIdentity(**item) for item in identities.get("identities", ())]
        self.federation_issuers: tuple[str, ...] = tuple(
            item["name"] for item in data.get("federation_issuers", ())
        )

    @classmethod
    def load(cls, state_root: Path | None = None) -> Directory:
        """The home tenant (the one holding the app registrations)."""
        return cls(_read_json(), state_root)

    @classmethod
    def load_all(cls, state_root: Path | None = None) -> list[Directory]:
        """Every hosted tenant, home first.

        A second tenant holds service principals of some home apps (same client ids,
        secrets, certificates and federated credentials, which belong to the app
        registration; its own object ids), its own consents and its own users.
        Managed identities and federation issuers exist in the home tenant only.
        """
        data = _read_json()
        tenants = [cls(data, state_root)]
        for other in data.get("other_tenants", ()):
            sps = other["service_principals"]
            apps = [
                {**app, "service_principal_id": sps[app["key"]]}
                for app in data["applications"]
                if app["key"] in sps
            ]
            tenants.append(cls({**other, "home": False, "applications": apps}, state_root))
        return tenants

    @staticmethod
    def _app(item: dict[str, Any], state_root: Path | None) -> App:
        app = App(
            key=item["key"],
            client_id=item["app_id"],
            display_name=item["display_name"],
            identifier_uris=tuple(item.get("identifier_uris", ())),
            service_principal_id=item["service_principal_id"],
            public_client=item.get("public_client", True),
            client_secret=item.get("client_secret"),
            certificate_file=item.get("certificate_file"),
            token_audience=item.get("token_audience"),
            scopes=tuple(item.get("scopes", ())),
            app_roles=tuple(item.get("app_roles", ())),
            spa_redirect_uris=tuple(item.get("spa", {}).get("redirectUris", ())),
            federated_credentials=tuple(
                FederatedCredential(f["name"], f["issuer"], f["subject"], tuple(f["audiences"]))
                for f in item.get("federated_identity_credentials", ())
            ),
        )
        if app.certificate_file and state_root is not None:
            pem = (state_root / app.certificate_file).read_bytes()
            app.certificates = pki.load_pem_certs(pem)
        return app

    @staticmethod
    def _user(item: dict[str, Any]) -> User:
        profile = {k: v for k, v in item.items() if k not in {"short", "manager", "flags"}}
        return User(
            short=item["short"],
            oid=item["id"],
            upn=item["userPrincipalName"],
            display_name=item["displayName"],
            manager=item.get("manager"),
            flags=frozenset(item.get("flags", ())),
            profile=profile,
        )

    # --- lookups ------------------------------------------------------------------
    def is_tenant(self, value: str) -> bool:
        """Entra accepts the tenant GUID or a verified domain in the path."""
        return value.lower() in {self.tenant_id, self.domain}

    def user(self, ref: str) -> User | None:
        """Find a user by short name, UPN or object id (case-insensitive)."""
        return self._by_ref.get(ref.strip().lower())

    def require_user(self, ref: str) -> User:
        user = self.user(ref)
        if user is None:
            known = ", ".join(u.short for u in self.users)
            raise KeyError(f"unknown user {ref!r}; known users: {known}")
        return user

    def manager_of(self, user: User) -> User | None:
        return self.user(user.manager) if user.manager else None

    def app(self, ref: str) -> App | None:
        """Find an app by client id or identifier URI (``api://...``, Graph URL...)."""
        needle = ref.strip().rstrip("/").lower()
        for app in self.apps:
            if needle == app.client_id or needle in {u.lower() for u in app.identifier_uris}:
                return app
        return None

    def client(self, client_id: str | None) -> App | None:
        """Authlib's ``query_client``: the token endpoint only takes the GUID form."""
        needle = (client_id or "").strip().lower()
        return next((a for a in self.apps if a.client_id == needle), None)

    def app_by_key(self, key: str) -> App:
        return next(a for a in self.apps if a.key == key)

    def delegated_grant(self, client: App, resource: App) -> tuple[str, ...]:
        """Delegated permissions admin-consented for ``client`` on ``resource``."""
        return self._delegated.get((client.client_id, resource.identifier), ())

    def managed_identity(self, client_id: str | None = None, object_id: str | None = None,
                         ) -> ManagedIdentity | None:
        """The system-assigned identity (no id given), or the one with that client/object id."""
        for identity in self.managed_identities:
            if client_id is None and object_id is None:
                wanted = identity.kind == "SystemAssigned"
            else:
                wanted = identity.client_id == (client_id or "").strip().lower() or (
                    identity.object_id == (object_id or "").strip().lower()
                )
            if wanted:
                return identity
        return None

    def app_roles_granted(self, client: App, resource: App) -> tuple[str, ...]:
        """Application permissions (app roles) assigned to ``client`` on ``resource``."""
        return self._roles.get((client.client_id, resource.identifier), ())
