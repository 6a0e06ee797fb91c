"""Workload identity federation: an OIDC issuer of the AKS kind, served by the dev tenant.

AKS publishes an OIDC issuer per cluster (discovery + JWKS) and projects a service
account token for ``api://AzureADTokenExchange`` into the pod
(``AZURE_FEDERATED_TOKEN_FILE``); Entra trusts it through a federated identity
credential on the app (issuer + subject + audience, see ``directory.json``). Here the
issuer is ``<dev tenant>/federation/<name>`` with its own signing key
(``federation-<name>-keys.json`` in the state folder), and
``python -m devtenant federated-token`` / :meth:`DevTenant.federated_token` play the
kubelet writing the token file.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from flask import Blueprint, Response, abort, jsonify
from joserfc import jwt

from devtenant.keys import KeyStore
from devtenant.runtime import base_url, current

bp = Blueprint("federation", __name__, url_prefix="/federation")

#: What Entra expects a workload identity assertion to be for.
TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
DEFAULT_ISSUER = "aks"
DEFAULT_SUBJECT = "system:serviceaccount:default:flask-obo"
#: AKS projects tokens valid for an hour and refreshes them well before they expire.
DEFAULT_LIFETIME = 3600


def federation_issuer(base: str, name: str = DEFAULT_ISSUER) -> str:
    return f"{base.rstrip('/')}/federation/{name}"


def mint_service_account_token(
    keys: KeyStore,
    issuer: str,
    subject: str = DEFAULT_SUBJECT,
    audience: str = TOKEN_EXCHANGE_AUDIENCE,
    lifetime: int = DEFAULT_LIFETIME,
    expired: bool = False,
) -> str:
    """A Kubernetes projected service account token (what the kubelet writes)."""
    now = int(time.time())
    if expired:
        now -= lifetime + 600
    namespace, _, account = subject.removeprefix("system:serviceaccount:").partition(":")
    claims: dict[str, Any] = {
        "aud": [audience],
        "exp": now + lifetime,
        "iat": now,
        "iss": issuer,
        "jti": secrets.token_hex(16),
        "kubernetes.io": {
            "namespace": namespace,
            "pod": {"name": f"{account or 'workload'}-devtenant", "uid": secrets.token_hex(16)},
            "serviceaccount": {"name": account, "uid": secrets.token_hex(16)},
        },
        "nbf": now,
        "sub": subject,
    }
    key = keys.active
    return jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key)


def _keys(name: str) -> KeyStore:
    store = current().federation_keys.get(name)
    if store is None:
        abort(404)
    return store


@bp.get("/<name>/.well-known/openid-configuration")
def discovery(name: str) -> Response:
    _keys(name)
    iss = federation_issuer(base_url(), name)
    return jsonify(
        {
            "issuer": iss,
            "jwks_uri": f"{iss}/openid/v1/jwks",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }
    )


@bp.get("/<name>/openid/v1/jwks")
def jwks(name: str) -> Response:
    keys = _keys(name).jwks("")["keys"]
    published = [{k: v for k, v in key.items() if k != "issuer"} | {"alg": "RS256"} for key in keys]
    return jsonify({"keys": published})
