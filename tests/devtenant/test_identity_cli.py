"""Identity breadth without msal: the CLI, directory data, and in-process endpoint details."""

from __future__ import annotations

import json
from pathlib import Path

from flask.testing import FlaskClient

import devtenant
from devtenant import API_CLIENT_ID, API_CLIENT_SECRET, SECOND_TENANT_ID, TENANT_ID
from devtenant.api import DevTenant
from devtenant.directory import Directory
from tests.devtenant.conftest import BASE, JWT_BEARER, MSAL_SCOPE, claims_of
from tests.devtenant.test_cli import run


def test_identity_constants_match_directory_json() -> None:
    home, second = Directory.load_all()
    assert home.home and not second.home
    assert (second.tenant_id, second.domain) == (SECOND_TENANT_ID, devtenant.SECOND_TENANT_DOMAIN)
    assert [u.display_name for u in second.users] == ["Megan Bowen", "Isaiah Langer"]
    assert second.app_by_key("api").client_id == API_CLIENT_ID
    assert second.app_by_key("api").service_principal_id != home.app_by_key("api").service_principal_id
    assert second.delegated_grant(second.app_by_key("api"), second.app_by_key("graph")) == ("User.Read",)
    assert second.managed_identities == [] and second.federation_issuers == ()
    system = home.managed_identity()
    assert system and (system.client_id, system.object_id) == (
        devtenant.MANAGED_IDENTITY_CLIENT_ID, devtenant.MANAGED_IDENTITY_OBJECT_ID,
    )  # fmt: skip
    user = home.managed_identity(devtenant.USER_ASSIGNED_IDENTITY_CLIENT_ID)
    assert user and user.object_id == devtenant.USER_ASSIGNED_IDENTITY_OBJECT_ID
    credentials = {c.name: c for c in home.app_by_key("api").federated_credentials}
    aks = credentials["aks-flask-obo"]
    assert (aks.issuer, aks.subject) == ("/federation/aks", devtenant.FEDERATED_SUBJECT)
    assert aks.audiences == (devtenant.TOKEN_EXCHANGE_AUDIENCE,)
    assert {c.subject for c in credentials.values()} >= {system.object_id, user.object_id}


def test_cli_federated_token_file(tmp_path: Path) -> None:
    out = tmp_path / "tokens" / "azure-identity-token"
    done = run(
        "federated-token", "--state-dir", str(tmp_path), "--authority-host", "https://devtenant:8443",
        "--out", str(out), "--lifetime", "600", "--subject", "system:serviceaccount:ns:sa",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    claims = claims_of(out.read_text())
    assert claims["iss"] == "https://devtenant:8443/federation/aks"
    assert claims["sub"] == "system:serviceaccount:ns:sa" and claims["aud"] == ["api://AzureADTokenExchange"]
    assert claims["exp"] - claims["iat"] == 600
    assert claims["kubernetes.io"]["serviceaccount"]["name"] == "sa"
    printed = run("federated-token", "--state-dir", str(tmp_path)).stdout.strip()
    assert claims_of(printed)["sub"] == devtenant.FEDERATED_SUBJECT
    bad = run("federated-token", "--issuer", "nope", "--state-dir", str(tmp_path))
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_cli_token_v1_and_second_tenant(tmp_path: Path) -> None:
    v1 = claims_of(run("token", "adele", "--v1", "--state-dir", str(tmp_path)).stdout.strip())
    assert v1["ver"] == "1.0" and v1["iss"] == f"https://localhost:8443/sts/{TENANT_ID}/"
    assert v1["aud"] == devtenant.API_APP_ID_URI and "azp" not in v1
    megan = run("token", "megan", "--tenant", devtenant.SECOND_TENANT_DOMAIN, "--state-dir", str(tmp_path))
    claims = claims_of(megan.stdout.strip())
    assert claims["tid"] == SECOND_TENANT_ID
    assert claims["preferred_username"] == "megan@contosodev.onmicrosoft.com"
    by_upn = claims_of(run("token", "isaiah@contosodev.onmicrosoft.com", "--state-dir", str(tmp_path)).stdout)
    assert by_upn["tid"] == SECOND_TENANT_ID and by_upn["name"] == "Isaiah Langer"
    bad = run("token", "megan", "--tenant", "nowhere.example", "--state-dir", str(tmp_path))
    assert bad.returncode == 2 and "nowhere.example" in bad.stderr


def test_cli_revoke_and_clear(tmp_path: Path) -> None:
    done = run("revoke", "adele", "--require-mfa", "--state-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    stored = json.loads((tmp_path / "revocations.json").read_text())
    adele = DevTenant(tmp_path).directory().require_user("adele")
    assert stored[adele.oid]["require_mfa"] and stored[adele.oid]["require_sign_in"]
    # New tokens for the user are issued at or after the revocation.
    assert claims_of(DevTenant(tmp_path).api_token("adele"))["iat"] >= stored[adele.oid]["at"]
    assert run("revoke", "--clear", "--state-dir", str(tmp_path)).returncode == 0
    assert json.loads((tmp_path / "revocations.json").read_text()) == {}
    assert run("revoke", "--state-dir", str(tmp_path)).returncode == 2


def test_cli_env_credentials(tmp_path: Path) -> None:
    def env(*flags: str) -> dict[str, str]:
        out = run("env", *flags, "--state-dir", str(tmp_path), "--authority-host", "https://devtenant:8443")
        assert out.returncode == 0, out.stderr
        return dict(line.split("=", 1) for line in out.stdout.splitlines())

    federated = env("--federated")
    assert "AZURE_CLIENT_SECRET" not in federated
    token_file = Path(federated["AZURE_FEDERATED_TOKEN_FILE"])
    assert token_file == tmp_path / "federated-token"
    assert claims_of(token_file.read_text())["iss"] == "https://devtenant:8443/federation/aks"
    assert federated["AZURE_V1_ISSUER_HOST"] == "https://devtenant:8443/sts"
    managed = env("--managed-identity", "--user-assigned")
    assert managed["IDENTITY_ENDPOINT"] == "https://devtenant:8443/msi/token"
    assert managed["IDENTITY_HEADER"] and "AZURE_CLIENT_SECRET" not in managed
    assert managed["AZURE_CLIENT_ASSERTION"] == "managed_identity"  # what the API reads
    assert managed["AZURE_MANAGED_IDENTITY_CLIENT_ID"] == devtenant.USER_ASSIGNED_IDENTITY_CLIENT_ID
    assert "AZURE_MANAGED_IDENTITY_CLIENT_ID" not in env("--managed-identity")


def test_organizations_token_endpoint_uses_the_implied_tenant(
    dt_client: FlaskClient, dt_tenant: DevTenant
) -> None:
    data = {
        "grant_type": JWT_BEARER,
        "requested_token_use": "on_behalf_of",
        "assertion": dt_tenant.api_token("megan", tenant=SECOND_TENANT_ID),
        "scope": MSAL_SCOPE,
        "client_id": API_CLIENT_ID,
        "client_secret": API_CLIENT_SECRET,
    }
    ok = dt_client.post("/organizations/oauth2/v2.0/token", base_url=BASE, data=data)
    assert ok.status_code == 200, ok.get_json()
    assert claims_of(ok.get_json()["access_token"])["tid"] == SECOND_TENANT_ID
    app_only = dt_client.post(
        "/common/oauth2/v2.0/token",
        base_url=BASE,
        data={
            "grant_type": "client_credentials", "client_id": API_CLIENT_ID,
            "client_secret": API_CLIENT_SECRET, "scope": "https://graph.microsoft.com/.default",
        },
    )  # fmt: skip
    assert app_only.status_code == 400 and app_only.get_json()["error_codes"] == [50059]
    unknown = dt_client.get("/common/.well-known/openid-configuration", base_url=BASE)
    assert unknown.get_json()["error_codes"] == [90002]


def test_runtime_resolves_hosted_tenants(dt_client: FlaskClient) -> None:
    runtime = dt_client.application.extensions["devtenant"]
    assert runtime.revocations.get("no-such-oid") is None
    second = runtime.tenant(devtenant.SECOND_TENANT_DOMAIN)
    assert second is not None and second.tenant_id == SECOND_TENANT_ID
    assert runtime.tenant("contoso.example") is None
