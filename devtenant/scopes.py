"""Scope parsing and consent, following Entra's rules rather than echoing requests.

Entra answers with the permissions actually *granted* (from admin consent), not the
string the client sent: ``.default`` expands to the consented set, explicit scopes
must all be consented, and the response names them fully qualified
(``https://graph.microsoft.com/User.Read``) while Graph's own docs use the short form
(``User.Read``). Both forms appear in the wild, so a runtime switch picks one and the
API's cache logic can be tested against each.
"""

from __future__ import annotations

from dataclasses import dataclass

from devtenant import GRAPH_RESOURCE, errors
from devtenant.directory import App, Directory

OIDC_SCOPES = frozenset({"openid", "profile", "email", "offline_access"})
#: OIDC scopes Entra lists in a response when any identity scope was requested.
OIDC_ECHO = ("openid", "profile", "email")
DEFAULT = ".default"


@dataclass(frozen=True)
class ScopeRequest:
    """A parsed ``scope`` parameter: one resource, its permissions, OIDC extras.

    ``permissions`` is ``None`` for a ``.default`` request (expanded from consent).
    """

    resource: App
    permissions: tuple[str, ...] | None
    oidc: frozenset[str]

    @property
    def wants_id_token(self) -> bool:
        return "openid" in self.oidc

    @property
    def offline(self) -> bool:
        return "offline_access" in self.oidc

    def canonical(self) -> str:
        """Fully-qualified form used internally (token generator, refresh tokens)."""
        perms = self.permissions if self.permissions is not None else (DEFAULT,)
        qualified = [f"{self.resource.identifier}/{p}" for p in perms]
        return " ".join([*qualified, *sorted(self.oidc)])

    def response_scope(self, short: bool) -> str:
        """The ``scope`` value Entra returns, in prefixed or Graph short form.

        Only Graph's permissions ever come back short: a bare name means Graph to
        Entra and msal, so a custom API's scopes are always qualified (``api://.../x``).
        """
        perms = self.permissions or ()
        short = short and self.resource.identifier == GRAPH_RESOURCE
        named = list(perms) if short else [f"{self.resource.identifier}/{p}" for p in perms]
        if self.oidc - {"offline_access"}:
            named.extend(OIDC_ECHO)
        return " ".join(named)


def _invalid_scope(code: int, message: str) -> errors.EntraError:
    return errors.EntraError("invalid_scope", code, message)


def _resource_not_found(directory: Directory, name: str) -> errors.EntraError:
    return errors.EntraError(
        "invalid_resource",
        500011,
        f"The resource principal named {name} was not found in the tenant named "
        f"{directory.tenant_name}. This can happen if the application has not been "
        "installed by the administrator of the tenant or consented to by any user in the "
        "tenant. You might have sent your authentication request to the wrong tenant.",
    )


def parse_scope(scope: str | None, directory: Directory) -> ScopeRequest:
    """Split a scope string into resource + permissions (+ OIDC scopes).

    Bare names (``User.Read``) mean Microsoft Graph, as in Entra; a request naming
    no resource at all is treated as Graph ``.default``.
    """
    oidc: set[str] = set()
    items: list[tuple[App, str]] = []
    for item in (scope or "").split():
        if item.lower() in OIDC_SCOPES:
            oidc.add(item.lower())
            continue
        ident, _, perm = item.rpartition("/") if "/" in item else (GRAPH_RESOURCE, "", item)
        resource = directory.app(ident)
        if resource is None or not perm:
            raise _resource_not_found(directory, ident or item)
        items.append((resource, perm))
    if len({r.client_id for r, _ in items}) > 1:
        raise _invalid_scope(
            28000,
            "Provided value for the input parameter scope is not valid because it contains "
            f"more than one resource. Scope {scope} is not valid.",
        )
    resource = items[0][0] if items else directory.app(GRAPH_RESOURCE)
    assert resource is not None
    perms = [p for _, p in items]
    if not perms or DEFAULT in perms:
        if len(perms) > 1:
            raise _invalid_scope(
                70011,
                f"The provided value for the input parameter 'scope' is not valid. The scope "
                f"'{scope}' is not valid. .default scope can't be combined with resource-"
                "specific scopes.",
            )
        return ScopeRequest(resource, None, frozenset(oidc))
    exposed = {s.lower(): s for s in resource.scopes}
    canonical = []
    for perm in perms:
        if perm.lower() not in exposed:
            raise _invalid_scope(
                650053,
                f"The application asked for scope '{perm}' that doesn't exist on the "
                f"resource '{resource.client_id}'. Contact the app vendor.",
            )
        canonical.append(exposed[perm.lower()])
    return ScopeRequest(resource, tuple(dict.fromkeys(canonical)), frozenset(oidc))


def grant_delegated(request: ScopeRequest, client: App, directory: Directory) -> ScopeRequest:
    """Apply admin consent: expand ``.default``, reject anything not consented."""
    granted = directory.delegated_grant(client, request.resource)
    wanted = request.permissions if request.permissions is not None else granted
    if not wanted or any(p not in granted for p in wanted):
        raise errors.consent_required(client.client_id, client.display_name)
    return ScopeRequest(request.resource, tuple(wanted), request.oidc)


def app_only_resource(scope: str | None, directory: Directory) -> App:
    """client_credentials accepts exactly ``<resource>/.default``."""
    items = (scope or "").split()
    if not items:
        raise errors.missing_parameter("scope")
    if len(items) != 1 or not items[0].endswith("/" + DEFAULT):
        raise _invalid_scope(
            1002012,
            f"The provided value for scope {scope} is not valid. Client credential flows "
            "must have a scope value with /.default suffixed to the resource identifier "
            "(application ID URI).",
        )
    ident = items[0][: -len(DEFAULT) - 1]
    resource = directory.app(ident)
    if resource is None:
        raise _resource_not_found(directory, ident)
    return resource
