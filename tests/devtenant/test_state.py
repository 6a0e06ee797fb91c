"""State folder: generated material, idempotence, concurrency, no import side effects."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding

import devtenant
from devtenant import pki
from devtenant.directory import Directory
from devtenant.state import ensure_state

REPO = Path(__file__).resolve().parents[2]


def _verifies(ca: x509.Certificate, leaf: x509.Certificate) -> bool:
    ca.public_key().verify(
        leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(), leaf.signature_hash_algorithm
    )
    return leaf.issuer == ca.subject


def test_ensure_state_creates_everything(tmp_path: Path) -> None:
    paths = ensure_state(tmp_path / "s", extra_sans=["api.example.test"])
    ca = pki.load_pem_certs(paths.ca_cert.read_bytes())[0]
    server = pki.load_pem_certs(paths.server_cert.read_bytes())[0]
    assert _verifies(ca, server)
    assert {"localhost", "devtenant", "127.0.0.1", "::1", "api.example.test"} <= pki.san_names(server)
    client_pem = paths.client_pem.read_bytes()
    assert b"PRIVATE KEY" in client_pem and b"BEGIN CERTIFICATE" in client_pem
    assert b"ENCRYPTED" not in client_pem
    pki.load_pem_key(client_pem)  # loads without a passphrase
    bundle = paths.ca_bundle.read_bytes()
    assert paths.ca_cert.read_bytes().strip() in bundle
    assert bundle.count(b"BEGIN CERTIFICATE") > 10  # system CAs are kept
    keys = json.loads(paths.signing_keys.read_text())["keys"]
    assert len(keys) == 1 and keys[0]["kid"] and keys[0]["kty"] == "RSA"


def test_ensure_state_is_idempotent_and_san_additive(tmp_path: Path) -> None:
    first = ensure_state(tmp_path)
    snapshot = {p: p.read_bytes() for p in (first.ca_cert, first.signing_keys, first.client_pem)}
    server_before = first.server_cert.read_bytes()
    ensure_state(tmp_path)
    assert first.server_cert.read_bytes() == server_before
    ensure_state(tmp_path, extra_sans=["extra.test"])
    names = pki.san_names(pki.load_pem_certs(first.server_cert.read_bytes())[0])
    assert "extra.test" in names and "localhost" in names
    ensure_state(tmp_path)  # no --san: the extra name is kept, cert not reissued
    assert "extra.test" in pki.san_names(pki.load_pem_certs(first.server_cert.read_bytes())[0])
    assert {p: p.read_bytes() for p in snapshot} == snapshot


def test_concurrent_ensure_state_processes_agree(tmp_path: Path) -> None:
    state = tmp_path / "race"
    code = "import sys; from devtenant.state import ensure_state; ensure_state(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(state)], cwd=REPO) for _ in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    paths = ensure_state(state)
    ca = pki.load_pem_certs(paths.ca_cert.read_bytes())[0]
    assert _verifies(ca, pki.load_pem_certs(paths.server_cert.read_bytes())[0])
    assert len(json.loads(paths.signing_keys.read_text())["keys"]) == 1
    assert not list(state.glob(".*.*"))  # no temp files left behind


def test_import_has_no_side_effects(tmp_path: Path) -> None:
    code = "import devtenant, devtenant.server, devtenant.api, devtenant.__main__; print(devtenant.TENANT_ID)"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []


def test_constants_match_directory_json() -> None:
    directory = Directory.load()
    api = directory.app_by_key("api")
    assert directory.tenant_id == devtenant.TENANT_ID
    assert directory.domain == devtenant.TENANT_DOMAIN
    assert directory.mfa_policy_id == devtenant.MFA_POLICY_ID
    assert api.client_id == devtenant.API_CLIENT_ID
    assert api.client_secret == devtenant.API_CLIENT_SECRET
    assert api.identifier_uris == (devtenant.API_APP_ID_URI,)
    assert devtenant.API_SCOPE in api.scopes and devtenant.API_APP_ROLE in api.app_roles
    assert directory.app_by_key("spa").client_id == devtenant.SPA_CLIENT_ID
    graph = directory.app_by_key("graph")
    assert (graph.client_id, graph.identifier) == (devtenant.GRAPH_APP_ID, devtenant.GRAPH_RESOURCE)
    assert directory.delegated_grant(api, graph) == devtenant.GRAPH_DELEGATED_PERMISSIONS
    daemon, unassigned = directory.app_by_key("daemon"), directory.app_by_key("unassigned_daemon")
    assert (daemon.client_id, daemon.client_secret) == (
        devtenant.DAEMON_CLIENT_ID, devtenant.DAEMON_CLIENT_SECRET)
    assert (unassigned.client_id, unassigned.client_secret) == (
        devtenant.UNASSIGNED_DAEMON_CLIENT_ID, devtenant.UNASSIGNED_DAEMON_CLIENT_SECRET)
    assert directory.app_roles_granted(daemon, api) == (devtenant.API_APP_ROLE,)
    assert directory.app_roles_granted(unassigned, api) == ()


def test_directory_users_and_lookups() -> None:
    directory = Directory.load()
    assert [u.short for u in directory.users] == [
        "adele", "nestor", "patti", "alex", "lynne", "megan",
    ]  # fmt: skip
    adele = directory.require_user("Adele@flaskobodev.onmicrosoft.com")
    assert directory.user("adele") is adele and directory.user(adele.oid) is adele
    chain = [directory.manager_of(directory.require_user(u)) for u in ("adele", "nestor", "patti")]
    assert [m.short if m else None for m in chain] == ["nestor", "patti", None]
    assert directory.require_user("alex").mfa_required
    assert directory.require_user("lynne").consent_missing
    assert directory.require_user("megan").manager == "patti" and not directory.require_user("megan").flags
