"""The API's credential in each form an app registration can have: which settings choose
it, and how certificates and federated token files are re-read when they rotate."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from flask_obo import Settings, SettingsError
from flask_obo.credentials import (
    CertificateFile,
    ClientSecret,
    FederatedTokenFile,
    ManagedIdentityAssertion,
    client_credential,
)
from flask_obo.errors import IdentityProviderUnavailable
from tests.support.fake_entra import settings_env
from tests.unit.test_settings import _key_and_certificate

MI_CLIENT_ID = "7d6c5b4a-3f2e-4d1c-8b9a-0f1e2d3c4b5a"


def pem_file(path: Path) -> Path:
    key, certificate = _key_and_certificate()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    path.write_bytes(key_pem + certificate)
    return path


def jwt_with_exp(exp: float, marker: str = "a") -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return f"{part({'alg': 'RS256'})}.{part({'exp': int(exp), 'sub': marker})}.c2ln"


def without_secret(**overrides: str) -> dict[str, str]:
    env = settings_env(**overrides)
    del env["AZURE_CLIENT_SECRET"]
    return env


def test_each_setting_chooses_its_credential(tmp_path):
    assert isinstance(client_credential(Settings.from_env(settings_env())), ClientSecret)
    cert = Settings.from_env(without_secret(AZURE_CLIENT_CERTIFICATE_PATH=str(pem_file(tmp_path / "c.pem"))))
    assert isinstance(client_credential(cert), CertificateFile)
    token_file = tmp_path / "token"
    token_file.write_text(jwt_with_exp(time.time() + 3600))
    federated = Settings.from_env(without_secret(AZURE_FEDERATED_TOKEN_FILE=str(token_file),
                                                 AZURE_AUTHORITY_HOST="https://login.microsoftonline.com/"))
    assert isinstance(client_credential(federated), FederatedTokenFile)
    assert federated.authority_host == "https://login.microsoftonline.com"  # AKS's trailing slash
    identity = Settings.from_env(without_secret(AZURE_CLIENT_ASSERTION="managed_identity",
                                                AZURE_MANAGED_IDENTITY_CLIENT_ID=MI_CLIENT_ID))
    assert isinstance(client_credential(identity), ManagedIdentityAssertion)
    assert identity.managed_identity_client_id == MI_CLIENT_ID


@pytest.mark.parametrize(("env", "message"), [
    (settings_env(AZURE_CLIENT_ASSERTION="managed_identity"),
     "AZURE_CLIENT_SECRET: set only one of AZURE_CLIENT_SECRET, AZURE_CLIENT_ASSERTION"),
    (without_secret(), "AZURE_CLIENT_SECRET: missing .or set AZURE_CLIENT_CERTIFICATE_PATH"),
    (without_secret(AZURE_CLIENT_ASSERTION="workload"),
     "AZURE_CLIENT_ASSERTION: must be one of managed_identity"),
    (without_secret(AZURE_FEDERATED_TOKEN_FILE="/nonexistent/token"),
     "AZURE_FEDERATED_TOKEN_FILE: cannot read the file"),
    (settings_env(AZURE_MANAGED_IDENTITY_CLIENT_ID=MI_CLIENT_ID),
     "AZURE_MANAGED_IDENTITY_CLIENT_ID: needs AZURE_CLIENT_ASSERTION=managed_identity"),
    (settings_env(AZURE_CLIENT_CAPABILITIES="cp1 ; drop"), "AZURE_CLIENT_CAPABILITIES: must be"),
])
def test_credential_settings_are_checked(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_client_capabilities_default_to_cae_and_can_be_none():
    assert Settings.from_env(settings_env()).client_capabilities == ("cp1",)
    assert Settings.from_env(settings_env(AZURE_CLIENT_CAPABILITIES="none")).client_capabilities == ()


def test_a_rotated_certificate_file_is_used_from_the_next_build(tmp_path):
    path = pem_file(tmp_path / "api.pem")
    settings = Settings.from_env(without_secret(AZURE_CLIENT_CERTIFICATE_PATH=str(path)))
    credential = client_credential(settings)
    first = credential.for_msal()
    assert credential.version == 0

    pem_file(tmp_path / "next.pem").replace(path)  # the CSI driver swaps the file in
    second = credential.for_msal()
    assert second != first and credential.version == 1
    assert credential.for_msal() == second and credential.version == 1  # unchanged: no reload

    path.write_text("half-written")  # mid-rotation: the last good one stays
    assert credential.for_msal() == second and credential.version == 1
    assert credential.reload() is False


def test_a_federated_token_is_read_again_past_its_exp_or_when_the_file_changes(tmp_path):
    path = tmp_path / "azure-identity-token"
    path.write_text(jwt_with_exp(time.time() + 3600, "one"))
    assertion = FederatedTokenFile(str(path)).for_msal()["client_assertion"]
    first = assertion()
    assert assertion() == first  # cached while valid

    path.write_text(jwt_with_exp(time.time() + 3600, "two"))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    second = assertion()
    assert second != first

    expiring = FederatedTokenFile(str(path))
    path.write_text(jwt_with_exp(time.time() + 30, "three"))  # within a minute of its exp
    assert expiring.assertion().endswith(".c2ln")
    path.write_text(jwt_with_exp(time.time() + 3600, "four"))
    stamp = path.stat().st_mtime_ns
    os.utime(path, ns=(stamp, stamp))  # same mtime: only the expiry sends it back to the file
    assert "four" in base64.urlsafe_b64decode(expiring.assertion().split(".")[1] + "==").decode()


def test_a_federated_token_file_swapped_in_within_the_same_mtime_is_read_again(tmp_path):
    """Regression: only the mtime was compared, so a file the kubelet swapped in (a new
    inode, the same size) within the clock's granularity of the last write kept the old,
    possibly refused, token until its exp: a failure that stuck for up to an hour."""
    path = tmp_path / "azure-identity-token"
    path.write_text(jwt_with_exp(time.time() + 3600, "bad1"))
    credential = FederatedTokenFile(str(path))
    assert "bad1" in base64.urlsafe_b64decode(credential.assertion().split(".")[1] + "==").decode()
    stamp = path.stat().st_mtime_ns
    staged = tmp_path / "staged"
    staged.write_text(jwt_with_exp(time.time() + 3600, "good"))
    assert staged.stat().st_size == path.stat().st_size
    os.utime(staged, ns=(stamp, stamp))
    os.replace(staged, path)
    assert "good" in base64.urlsafe_b64decode(credential.assertion().split(".")[1] + "==").decode()


def test_a_refused_federated_token_is_retried_only_if_the_file_holds_another(tmp_path):
    """Regression: ``reload`` always said "changed", so while the file held an expired
    token every request exchanged twice with Entra ID, both refused (AADSTS700024)."""
    path = tmp_path / "azure-identity-token"
    path.write_text(jwt_with_exp(time.time() - 600, "old"))
    credential = FederatedTokenFile(str(path))
    sent = credential.assertion()
    assert credential.reload() is False  # the same token: no retry
    assert credential.assertion() == sent
    path.write_text(jwt_with_exp(time.time() + 3600, "new"))
    assert credential.reload() is True
    assert credential.assertion() != sent
    path.unlink()
    assert credential.reload() is False  # nothing to retry with (the request gets a 503)


def test_an_unreadable_federated_token_file_is_a_503_not_a_500(tmp_path):
    path = tmp_path / "token"
    path.write_text(jwt_with_exp(time.time() + 3600))
    credential = FederatedTokenFile(str(path))
    path.unlink()
    with pytest.raises(IdentityProviderUnavailable):
        credential.assertion()
