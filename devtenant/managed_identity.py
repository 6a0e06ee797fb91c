"""Managed identity endpoint of the App Service kind (what msal's ManagedIdentityClient calls).

App Service sets ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER``; msal then sends
``GET $IDENTITY_ENDPOINT?api-version=2019-08-01&resource=<resource>[&client_id=...|
&object_id=...|&mi_res_id=...]`` with ``X-IDENTITY-HEADER: $IDENTITY_HEADER`` and
reads ``access_token`` + ``expires_on``. Here the endpoint is ``<dev tenant>/msi/token``
on the same HTTPS server (msal does not mind https; requests verifies it with
REQUESTS_CA_BUNDLE); :meth:`DevTenant.managed_identity_env` gives both variables.

The identities are the home tenant's (``managed_identities`` in directory.json): no id
means the system-assigned one, ``client_id`` (AZURE_MANAGED_IDENTITY_CLIENT_ID) or
``object_id`` a user-assigned one. Tokens are app-only tokens issued by the home
tenant; for ``api://AzureADTokenExchange`` they are the assertion the API's federated
identity credentials (subject = the identity's object id) accept. Errors are App
Service's: a missing or wrong header 401, an unknown identity 400, an unknown
resource 500 (msal reports these as ``{"statusCode", "message"}``). Each token issued
counts in ``/_devtenant/counters`` under ``managed_identity`` by the identity's client id.
"""

from __future__ import annotations

import time
import uuid

from flask import Blueprint, Response, jsonify, request

from devtenant.runtime import current, issuer
from devtenant.tokens import random_lifetime

bp = Blueprint("managed_identity", __name__)

MSI_PATH = "/msi/token"
API_VERSIONS = frozenset({"2019-08-01"})
#: App Service hands out tokens valid for about a day.
MSI_LIFETIME = 24 * 3600


def _fail(status: int, message: str) -> Response:
    response = jsonify({"statusCode": status, "message": message, "correlationId": str(uuid.uuid4())})
    response.status_code = status
    return response


@bp.get(MSI_PATH)
def token() -> Response:
    runtime = current()
    directory = runtime.home
    expected = directory.identity_header or ""
    if not expected or request.headers.get("X-IDENTITY-HEADER") != expected:
        return _fail(401, "Unauthorized: the X-IDENTITY-HEADER header is missing or not valid.")
    if request.args.get("api-version") not in API_VERSIONS:
        return _fail(400, "The api-version parameter is missing or not supported (use 2019-08-01).")
    resource = (request.args.get("resource") or "").strip()
    if not resource:
        return _fail(400, "The resource parameter is required.")
    if request.args.get("mi_res_id"):
        return _fail(
            400,
            "No User Assigned or Delegated Managed Identity found for specified "
            "ClientId/ResourceId/PrincipalId.",
        )
    identity = directory.managed_identity(request.args.get("client_id"), request.args.get("object_id"))
    if identity is None:
        return _fail(
            400,
            "No User Assigned or Delegated Managed Identity found for specified "
            "ClientId/ResourceId/PrincipalId.",
        )
    app = directory.app(resource.removesuffix("/.default"))
    if app is None:
        return _fail(500, "An unexpected error occured while fetching the AAD Token.")
    lifetime = MSI_LIFETIME if app.key == "token_exchange" else random_lifetime()
    access_token = runtime.minter.managed_identity_token(
        issuer=issuer(), audience=app.audience, identity=identity, lifetime=lifetime
    )
    runtime.counters.count_managed_identity(identity.client_id)
    return jsonify(
        {
            "access_token": access_token,
            "expires_on": str(int(time.time()) + lifetime),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": identity.client_id,
        }
    )
