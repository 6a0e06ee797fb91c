"""An Entra ID + Graph double at the HTTP layer (``responses``), for unit tests.

msal runs unpatched against it. It signs real RS256 tokens with joserfc, counts every
request that reaches the token endpoint, and can be told how to answer per user.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import responses
from joserfc import jwt
from joserfc.jwk import RSAKey

TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "6d1f0c9e-3b8a-4f2e-9c5d-7a1b2c3d4e5f"
SPA_CLIENT_ID = "0b5e2f7a-1c3d-4e6f-8a9b-c1d2e3f4a5b6"
CLIENT_SECRET = "unit-test-client-secret-value"
AUTHORITY_HOST = "https://login.microsoftonline.com"
GRAPH = "https://graph.microsoft.com/v1.0"
ISSUER = f"{AUTHORITY_HOST}/{TENANT_ID}/v2.0"
METADATA_URL = f"{ISSUER}/.well-known/openid-configuration"
JWKS_URL = f"{AUTHORITY_HOST}/{TENANT_ID}/discovery/v2.0/keys"
TOKEN_URL = f"{AUTHORITY_HOST}/{TENANT_ID}/oauth2/v2.0/token"
GRANTED = ("User.Read", "User.ReadBasic.All")

ADELE = "a1a1a1a1-0000-4000-8000-000000000001"
BOB = "b2b2b2b2-0000-4000-8000-000000000002"
APP = "app"  # behaviours[APP]: how client-credentials requests are answered


def _random(nbytes: int) -> str:
    return base64.urlsafe_b64encode(os.urandom(nbytes)).decode().rstrip("=")


def settings_env(**overrides: str) -> dict[str, str]:
    env = {
        "AZURE_TENANT_ID": TENANT_ID,
        "AZURE_CLIENT_ID": CLIENT_ID,
        "AZURE_CLIENT_SECRET": CLIENT_SECRET,
    }
    env.update(overrides)
    return env


@dataclass
class Behaviour:
    """How the token endpoint answers one user: 'ok' or an error kind."""

    kind: str = "ok"
    retry_after: str | None = None


@dataclass
class FakeEntra:
    scope_form: str = "prefixed"  # prefixed | short | granted-with-default
    realistic: bool = False  # Graph tokens and refresh tokens of real size
    refresh_in: int | None = None  # Entra's hint to renew a long-lived token early
    guests: dict[str, tuple[str, str]] = field(default_factory=dict)  # oid -> home (oid, tid)
    expires_in: int = 3600
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "key-1"}))
    published: list[RSAKey] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    graph_requests: list[str] = field(default_factory=list)
    graph_urls: list[str] = field(default_factory=list)
    # client-request-id of each token and Graph request, in order ("token" / "graph", id)
    client_request_ids: list[tuple[str, str | None]] = field(default_factory=list)
    graph_traceparents: list[str | None] = field(default_factory=list)  # W3C trace context
    jwks_fetches: int = 0
    metadata_fetches: int = 0
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    graph_behaviours: dict[str, list[str]] = field(default_factory=dict)
    graph_tokens: dict[str, str] = field(default_factory=dict)
    managers: dict[str, str | None] = field(default_factory=dict)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    app_tokens: list[str] = field(default_factory=list)  # client-credentials tokens, in order

    def __post_init__(self) -> None:
        self.published = [self.key]
        self.add_user(ADELE, "Adele Vance", manager=BOB)
        self.add_user(BOB, "Bob Boss", manager=None)

    # --- minting what the SPA would send ------------------------------------------------
    def add_user(self, oid: str, name: str, manager: str | None = None) -> None:
        upn = name.split()[0].lower() + "@contoso.example"
        self.users[oid] = {"id": oid, "displayName": name, "mail": upn,
                           "userPrincipalName": upn, "jobTitle": "Engineer"}
        self.managers[oid] = manager

    def api_token(self, oid: str = ADELE, *, scp: str | None = "user_impersonation",
                  key: RSAKey | None = None, alg: str = "RS256", **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "aud": CLIENT_ID, "iss": ISSUER, "iat": now, "nbf": now, "exp": now + 3600,
            "azp": SPA_CLIENT_ID, "name": self.users.get(oid, {}).get("displayName", "x"),
            "oid": oid, "preferred_username": self.users.get(oid, {}).get("userPrincipalName"),
            "sub": "sub-" + oid[:8], "tid": TENANT_ID, "ver": "2.0", "uti": uuid.uuid4().hex,
        }
        if scp is not None:
            payload["scp"] = scp
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        signing_key = key or self.key
        return jwt.encode({"alg": alg, "typ": "JWT", "kid": signing_key.kid}, payload, signing_key,
                          algorithms=[alg])

    # --- the HTTP double ----------------------------------------------------------------
    def register(self, rsps: responses.RequestsMock) -> None:
        rsps.add_callback(responses.GET, METADATA_URL, callback=self._metadata)
        rsps.add_callback(responses.GET, JWKS_URL, callback=self._jwks)
        rsps.add_callback(responses.POST, TOKEN_URL, callback=self._token)
        rsps.add_callback(responses.GET, f"{GRAPH}/me", callback=self._graph)
        rsps.add_callback(responses.GET, f"{GRAPH}/me/manager", callback=self._graph)

    def obo_calls(self) -> int:
        return self.grant_calls("urn:ietf:params:oauth:grant-type:jwt-bearer")

    def grant_calls(self, grant_type: str) -> int:
        return Counter(r.get("grant_type") for r in self.token_requests)[grant_type]

    def _metadata(self, request: Any) -> tuple[int, dict[str, str], str]:
        self.metadata_fetches += 1
        base = f"{AUTHORITY_HOST}/{TENANT_ID}"
        return 200, {}, json.dumps({
            "issuer": ISSUER, "jwks_uri": JWKS_URL, "token_endpoint": TOKEN_URL,
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "id_token_signing_alg_values_supported": ["RS256"],
        })

    def _jwks(self, request: Any) -> tuple[int, dict[str, str], str]:
        self.jwks_fetches += 1
        keys = [dict(k.as_dict(private=False), use="sig") for k in self.published]
        return 200, {}, json.dumps({"keys": keys})

    def _token(self, request: Any) -> tuple[int, dict[str, str], str]:
        form = {k: v[0] for k, v in parse_qs(request.body).items()}
        self.token_requests.append(form)
        self.client_request_ids.append(("token", request.headers.get("client-request-id")))
        if form.get("grant_type") == "client_credentials":  # the API's own token
            behaviour = self.behaviours.get(APP, Behaviour())
            if behaviour.kind != "ok":
                return self._error(behaviour)
            return 200, {}, json.dumps(self._app_success(form))
        oid = self._oid_for(form)
        behaviour = self.behaviours.get(oid, Behaviour())
        if behaviour.kind != "ok":
            return self._error(behaviour)
        return 200, {}, json.dumps(self._success(oid, form))

    def _app_success(self, form: dict[str, str]) -> dict[str, Any]:
        """client_credentials: no refresh token, no id token, no scope echoed (as Entra ID)."""
        access_token = f"app-at-{len(self.token_requests)}-{uuid.uuid4().hex}"
        self.app_tokens.append(access_token)
        hint = {} if self.refresh_in is None else {"refresh_in": self.refresh_in}
        return {**hint, "token_type": "Bearer", "expires_in": self.expires_in,
                "ext_expires_in": self.expires_in, "access_token": access_token}

    def app_calls(self) -> int:
        return self.grant_calls("client_credentials")

    def _oid_for(self, form: dict[str, str]) -> str:
        if "assertion" in form:
            payload = form["assertion"].split(".")[1]
            return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["oid"]
        return form.get("refresh_token", "rt-" + "0" * 36).removeprefix("rt-")[:36]

    def _success(self, oid: str, form: dict[str, str]) -> dict[str, Any]:
        n = len(self.token_requests)
        # Self-describing, so a Graph double in another process accepts it too.
        access_token = self._graph_jwt(oid) if self.realistic else f"graph-at-{oid}-{n}-{uuid.uuid4().hex}"
        self.graph_tokens[access_token] = oid
        oidc = [s for s in form.get("scope", "").split() if s in ("openid", "profile")]
        if self.scope_form == "short":
            scope = [*GRANTED, *oidc, "email"]
        elif self.scope_form == "granted-with-default":
            scope = [f"https://graph.microsoft.com/{s}" for s in GRANTED]
        else:
            scope = [f"https://graph.microsoft.com/{s}" for s in GRANTED] + oidc
        home_oid, home_tid = self.guests.get(oid, (oid, TENANT_ID))  # a guest's is their home's
        client_info = base64.urlsafe_b64encode(
            json.dumps({"uid": home_oid, "utid": home_tid}).encode()).decode().rstrip("=")
        id_token = jwt.encode({"alg": "RS256", "kid": self.key.kid},
                              {"aud": CLIENT_ID, "iss": ISSUER, "oid": oid, "tid": TENANT_ID,
                               "sub": "s", "preferred_username": self.users[oid]["mail"],
                               "name": self.users[oid]["displayName"], "exp": int(time.time()) + 3600},
                              self.key)
        hint = {} if self.refresh_in is None else {"refresh_in": self.refresh_in}
        return {
            **hint,
            "token_type": "Bearer", "scope": " ".join(scope), "expires_in": self.expires_in,
            "ext_expires_in": self.expires_in, "access_token": access_token,
            "refresh_token": f"rt-{oid}-{n}-" + (_random(1000) if self.realistic else ""),
            "id_token": id_token, "client_info": client_info,
        }

    def _graph_jwt(self, oid: str) -> str:
        """A Graph access token of real size and shape (~2.3 KB, Entra's v1 claim set)."""
        now, user = int(time.time()), self.users[oid]
        claims = {
            "aud": "00000003-0000-0000-c000-000000000000", "iss": f"https://sts.windows.net/{TENANT_ID}/",
            "iat": now, "nbf": now, "exp": now + self.expires_in, "acct": 0, "acr": "1",
            "aio": _random(90), "amr": ["pwd", "mfa"], "app_displayname": "flask-obo API",
            "appid": CLIENT_ID, "appidacr": "1", "family_name": user["displayName"].split()[-1],
            "given_name": user["displayName"].split()[0], "idtyp": "user", "ipaddr": "203.0.113.7",
            "name": user["displayName"], "oid": oid, "platf": "3", "puid": "10032001E2B3C4D5",
            "rh": "0." + _random(60), "scp": " ".join(GRANTED) + " profile openid email",
            "sid": str(uuid.uuid4()), "signin_state": ["kmsi"], "sub": _random(32),
            "tenant_region_scope": "EU", "tid": TENANT_ID, "unique_name": user["userPrincipalName"],
            "upn": user["userPrincipalName"], "uti": _random(16), "ver": "1.0",
            "wids": ["b79fbf4d-3ef9-4689-8143-76b194e85509"], "xms_ftd": _random(60),
            "xms_idrel": "1 20", "xms_st": {"sub": _random(32)}, "xms_tcdt": 1600000000,
        }
        return jwt.encode({"alg": "RS256", "typ": "JWT", "kid": self.key.kid, "x5t": self.key.kid},
                          claims, self.key)

    def _error(self, behaviour: Behaviour) -> tuple[int, dict[str, str], str]:
        headers = {"Retry-After": behaviour.retry_after} if behaviour.retry_after else {}
        if behaviour.kind == "throttled":
            return 429, headers, json.dumps({"error": "temporarily_unavailable"})
        if behaviour.kind == "server_error":
            return 500, headers, "upstream exploded"
        body: dict[str, Any] = {"timestamp": "2026-11-26 12:00:00Z", "trace_id": str(uuid.uuid4()),
                                "correlation_id": str(uuid.uuid4())}
        if behaviour.kind == "mfa":
            body.update(error="interaction_required", error_codes=[50079],
                        error_description="AADSTS50079: MFA required.",
                        claims='{"access_token":{"capolids":{"essential":true,"values":["p1"]}}}')
        elif behaviour.kind == "consent":
            body.update(error="invalid_grant", suberror="consent_required", error_codes=[65001],
                        error_description="AADSTS65001: The user or administrator has not consented.")
        elif behaviour.kind == "invalid_grant":
            body.update(error="invalid_grant", error_codes=[50013],
                        error_description="AADSTS50013: Assertion failed signature validation.")
        else:
            body.update(error="invalid_client", error_codes=[7000215],
                        error_description="AADSTS7000215: Invalid client secret provided.")
        return 400, headers, json.dumps(body)

    def _graph(self, request: Any) -> tuple[int, dict[str, str], str]:
        path = request.path_url.split("?")[0].removeprefix("/v1.0")
        self.graph_requests.append(path)
        self.graph_urls.append(request.url)
        self.client_request_ids.append(("graph", request.headers.get("client-request-id")))
        self.graph_traceparents.append(request.headers.get("traceparent"))
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        oid = self.graph_tokens.get(token) or (token[9:45] if token.startswith("graph-at-") else None)
        if oid is None:
            return 401, {}, json.dumps({"error": {"code": "InvalidAuthenticationToken"}})
        queued = self.graph_behaviours.get(oid)
        if queued:
            kind = queued.pop(0)
            if kind == "claims":
                claims = base64.b64encode(b'{"access_token":{"nbf":{"essential":true,"value":"1"}}}')
                return 401, {"WWW-Authenticate": f'Bearer realm="", error="insufficient_claims", '
                                                 f'claims="{claims.decode()}"'}, "{}"
            status = int(kind)
            return status, {"Retry-After": "0"}, json.dumps({"error": {"code": "x"}})
        if path == "/me/manager":
            manager = self.managers.get(oid)
            if manager is None:
                return 404, {}, json.dumps({"error": {"code": "Request_ResourceNotFound"}})
            return 200, {}, json.dumps(self.users[manager])
        return 200, {}, json.dumps(self.users[oid])
