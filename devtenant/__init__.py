"""devtenant: a local Entra ID (v2 endpoints) + Microsoft Graph for offline development.

It serves, over HTTPS, exactly the parts of Entra ID and Graph that flask-obo uses
(discovery, JWKS, the token endpoint with On-Behalf-Of / refresh_token /
client_credentials, Graph ``/me`` and ``/me/manager``) so that the API can run its
real, unpatched msal code against it, and the browser sign-in a SPA does with
msal-browser (``/authorize`` with authorization code + PKCE, ``/logout``; see
:mod:`devtenant.signin`). Identity breadth: workload identity federation
(:mod:`devtenant.federation`, client assertions in :mod:`devtenant.clientauth`), daemons
with app roles (client credentials: ``DAEMON_CLIENT_ID``), an
App Service managed identity endpoint (:mod:`devtenant.managed_identity`), v1 tokens
(:mod:`devtenant.tokens`), a second tenant (``other_tenants`` in directory.json) and
CAE session revocation (:mod:`devtenant.revocation`).

Importing this package has no side effects: the constants below are literals (a test
checks that they agree with ``directory.json``, the single data source the server
reads), and the heavier objects are imported lazily on first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

TENANT_ID = "7f3c2a91-5b6e-4d8a-9e1f-0c4b8a2d6e35"
TENANT_DOMAIN = "flaskobodev.onmicrosoft.com"
API_CLIENT_ID = "5e1a7c3d-2b9f-4e6a-8d0c-1f7b3a9e2c64"
API_APP_ID_URI = f"api://{API_CLIENT_ID}"
API_CLIENT_SECRET = "Dev8Q~flaskobo.devtenant.secret-NOT-FOR-PRODUCTION"
API_SCOPE = "user_impersonation"
API_APP_ROLE = "access_as_application"
SPA_CLIENT_ID = "9b2d4f6a-8c1e-4a3b-b5d7-e9f0a1c2d3e4"
#: Daemons calling the API with app-only tokens (client credentials): the first is assigned
#: the API's app role API_APP_ROLE, the second no app role at all.
DAEMON_CLIENT_ID = "7d1c9e42-3a5b-4c8d-9e0f-1a2b3c4d5e6f"
DAEMON_CLIENT_SECRET = "Dev8Q~daemon.devtenant.secret-NOT-FOR-PRODUCTION"
UNASSIGNED_DAEMON_CLIENT_ID = "9f3e1a64-5c7d-4eaf-9021-3c4d5e6f7a81"
UNASSIGNED_DAEMON_CLIENT_SECRET = "Dev8Q~unassigned.devtenant.secret-NOT-FOR-PRODUCTION"
GRAPH_RESOURCE = "https://graph.microsoft.com"
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
GRAPH_DELEGATED_PERMISSIONS = ("User.Read", "User.ReadBasic.All")
TASKS_API_CLIENT_ID = "fe8aca95-d701-40a5-b01e-aca31c3d1308"
TASKS_API_RESOURCE = f"api://{TASKS_API_CLIENT_ID}"
TASKS_API_SCOPES = ("Tasks.Read", "Tasks.ReadWrite")
TASKS_API_DELEGATED_PERMISSIONS = ("Tasks.Read",)
MFA_POLICY_ID = "4f2b8c1d-6e3a-4b5c-9d7e-1a2b3c4d5e6f"
#: The second hosted tenant (multi-tenant tests): the API and SPA have service
#: principals there, its users are Megan Bowen and her manager Isaiah Langer.
SECOND_TENANT_ID = "89554b7d-d6ac-4920-8a1f-733bce7d669a"
SECOND_TENANT_DOMAIN = "contosodev.onmicrosoft.com"
#: Workload identity federation: the audience of assertions, and the API's credential
#: for the dev tenant's AKS-style issuer (``<host>/federation/aks``).
TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
FEDERATED_SUBJECT = "system:serviceaccount:default:flask-obo"
#: App Service managed identities (subjects of the API's other federated credentials).
MANAGED_IDENTITY_CLIENT_ID = "43a7df47-2bee-4819-962f-30f5fc5590d5"
MANAGED_IDENTITY_OBJECT_ID = "6c0d61aa-e2b5-4a87-8fba-c6c9f633a2cf"
USER_ASSIGNED_IDENTITY_CLIENT_ID = "133f51ad-4120-47af-b021-2738a99a415f"
USER_ASSIGNED_IDENTITY_OBJECT_ID = "23f91f23-f1eb-4d09-9eef-ba42bcba49b0"
DEFAULT_AUTHORITY_HOST = "https://localhost:8443"
STATE_DIR_ENV = "DEVTENANT_STATE_DIR"

_LAZY = {
    "DevTenant": "devtenant.api",
    "create_app": "devtenant.server",
    "serve": "devtenant.server",
    "ensure_state": "devtenant.state",
}

if TYPE_CHECKING:  # pragma: no cover
    from devtenant.api import DevTenant
    from devtenant.server import create_app, serve
    from devtenant.state import ensure_state


def __getattr__(name: str) -> Any:
    """Import heavy modules (Flask, Authlib, cryptography) only when asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'devtenant' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "API_APP_ID_URI",
    "API_APP_ROLE",
    "API_CLIENT_ID",
    "API_CLIENT_SECRET",
    "API_SCOPE",
    "DAEMON_CLIENT_ID",
    "DAEMON_CLIENT_SECRET",
    "DEFAULT_AUTHORITY_HOST",
    "FEDERATED_SUBJECT",
    "GRAPH_APP_ID",
    "GRAPH_DELEGATED_PERMISSIONS",
    "GRAPH_RESOURCE",
    "MANAGED_IDENTITY_CLIENT_ID",
    "MANAGED_IDENTITY_OBJECT_ID",
    "MFA_POLICY_ID",
    "SECOND_TENANT_DOMAIN",
    "SECOND_TENANT_ID",
    "SPA_CLIENT_ID",
    "STATE_DIR_ENV",
    "TASKS_API_CLIENT_ID",
    "TASKS_API_DELEGATED_PERMISSIONS",
    "TASKS_API_RESOURCE",
    "TASKS_API_SCOPES",
    "TENANT_DOMAIN",
    "TENANT_ID",
    "TOKEN_EXCHANGE_AUDIENCE",
    "UNASSIGNED_DAEMON_CLIENT_ID",
    "UNASSIGNED_DAEMON_CLIENT_SECRET",
    "USER_ASSIGNED_IDENTITY_CLIENT_ID",
    "USER_ASSIGNED_IDENTITY_OBJECT_ID",
    "DevTenant",
    "create_app",
    "ensure_state",
    "serve",
]
