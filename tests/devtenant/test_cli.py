"""``python -m devtenant`` commands (no server needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from devtenant import API_CLIENT_ID, API_CLIENT_SECRET, SPA_CLIENT_ID, TENANT_ID
from devtenant.api import DevTenant
from tests.devtenant.conftest import claims_of, header_of

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devtenant", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_token_prints_only_the_spa_access_token(tmp_path: Path) -> None:
    out = run("token", "adele", "--state-dir", str(tmp_path), "--mfa", "--lifetime", "600")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert out.stdout.count("\n") == 1 and token.count(".") == 2
    claims = claims_of(token)
    assert claims["aud"] == API_CLIENT_ID and claims["azp"] == SPA_CLIENT_ID
    assert claims["scp"] == "user_impersonation" and claims["amr"] == ["pwd", "mfa"]
    assert claims["exp"] - claims["iat"] == 600
    # Default issuer host when no server recorded one.
    assert claims["iss"] == f"https://localhost:8443/{TENANT_ID}/v2.0"
    assert header_of(token)["kid"] == DevTenant(tmp_path).active_kid()

    app_only = run("token", "--app-only", "--state-dir", str(tmp_path))
    claims = claims_of(app_only.stdout.strip())
    assert claims["roles"] == ["access_as_application"] and "scp" not in claims
    assert claims["idtyp"] == "app" and claims["aud"] == API_CLIENT_ID

    bad = run("token", "nobody", "--state-dir", str(tmp_path))
    assert bad.returncode == 2 and "nobody" in bad.stderr and bad.stdout == ""


def test_env_init_and_rotate(tmp_path: Path) -> None:
    host = "https://devtenant:8443"
    out = run("env", "--state-dir", str(tmp_path), "--authority-host", host)
    assert out.returncode == 0, out.stderr
    env = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert env == {
        "AZURE_TENANT_ID": TENANT_ID,
        "AZURE_CLIENT_ID": API_CLIENT_ID,
        "AZURE_AUTHORITY_HOST": host,
        "AZURE_V1_ISSUER_HOST": f"{host}/sts",
        "GRAPH_BASE_URL": f"{host}/v1.0",
        "API_APP_ROLE": "access_as_application",
        "REQUESTS_CA_BUNDLE": str(tmp_path / "ca-bundle.pem"),
        "AZURE_CLIENT_SECRET": API_CLIENT_SECRET,
    }
    cert = run("env", "--certificate", "--state-dir", str(tmp_path)).stdout
    assert f"AZURE_CLIENT_CERTIFICATE_PATH={tmp_path / 'api-client.pem'}" in cert
    assert "AZURE_CLIENT_SECRET" not in cert

    init = run("init", "--state-dir", str(tmp_path))
    assert init.stdout.strip() == str(tmp_path)
    old = DevTenant(tmp_path).active_kid()
    rotated = run("rotate-keys", "--state-dir", str(tmp_path)).stdout.strip()
    assert rotated != old and DevTenant(tmp_path).active_kid() == rotated
