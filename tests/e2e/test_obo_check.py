"""``flask --app wsgi obo check`` for real: a subprocess against the dev tenant over HTTPS
and a redis-server with ``requirepass``. The right settings pass every line; each wrong
one (a tenant that does not exist, a wrong secret, an unknown client id, an unregistered
certificate, a federated token of another subject, a wrong Redis password, an authority
behind a CA this machine does not trust, the token-cache keys of another deployment) exits
1 with a line naming the cause. Start-up with three bad settings prints three lines and no
traceback, from ``flask run``, gunicorn and the check alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography.fernet import Fernet

from devtenant import pki
from flask_obo.token_cache import TokenCacheCodec, partition_key
from tests.support.servers import free_port, redis_server, wait_until
from tests.support.stack import ROOT, DevTenantProcess, api_env, devtenant

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PASSWORD = "check-redis-password"
OTHER_TENANT = "3c9e1a55-0d6b-4f1e-9a27-5b8c4d2e7f10"  # a well-formed GUID no tenant has
OTHER_CLIENT = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"


@pytest.fixture(scope="module")
def infra(tmp_path_factory) -> Iterator[tuple[DevTenantProcess, str]]:
    with redis_server(password=PASSWORD) as redis_url, \
            devtenant(tmp_path_factory.mktemp("devtenant")) as tenant:
        yield tenant, redis_url


@pytest.fixture
def env(infra) -> dict[str, str]:
    tenant, redis_url = infra
    redis.Redis.from_url(redis_url).flushdb()
    return api_env(tenant, redis_url)


def run(env: dict[str, str], *args: str, json_output: bool = True) -> tuple[int, dict | str, str]:
    """``flask --app wsgi <args>`` in a directory without a .env; (exit, output, stderr)."""
    command = [sys.executable, "-m", "flask", "--app", "wsgi", *args]
    if json_output:
        command.append("--json")
    cwd = tempfile.mkdtemp(prefix="flask-obo-check-")
    result = subprocess.run(command, cwd=cwd, env={**env, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=90)
    output = json.loads(result.stdout) if json_output and result.stdout.strip() else result.stdout
    return result.returncode, output, result.stderr


def failures(report: dict) -> list[dict]:
    return [line for line in report["checks"] if line["status"] == "FAIL"]


def only_failure(report: dict, check: str) -> dict:
    [line] = failures(report)
    assert line["check"] == check, line
    return line


def test_the_dev_tenant_passes_every_check(env):
    status, report, _ = run(env, "obo", "check")
    assert status == 0 and report["ok"], report
    checks = report["checks"]
    assert {line["status"] for line in checks} == {"ok"}, checks
    assert {line["check"] for line in checks} == {"settings", "authority", "credential", "redis",
                                                  "downstream"}
    redis_lines = " ".join(line["detail"] for line in checks if line["check"] == "redis")
    assert "password accepted" in redis_lines and "a change was reported" in redis_lines
    text_status, text, _ = run(env, "obo", "check", json_output=False)
    assert text_status == 0 and text.splitlines()[-1] == "all checks passed"
    assert all(line.startswith("ok ") for line in text.splitlines()[:-1]), text
    assert PASSWORD not in text and env["AZURE_CLIENT_SECRET"] not in text


@pytest.mark.parametrize(("change", "check", "reason", "named"), [
    ({"AZURE_TENANT_ID": OTHER_TENANT}, "authority", "AADSTS90002", "AZURE_TENANT_ID"),
    ({"AZURE_CLIENT_SECRET": "a-wrong-secret-value"}, "credential", "AADSTS7000215", "AZURE_CLIENT_SECRET"),
    ({"AZURE_CLIENT_ID": OTHER_CLIENT}, "credential", "AADSTS700016", "AZURE_CLIENT_ID"),
], ids=["wrong-tenant", "wrong-secret", "unknown-client"])
def test_a_wrong_entra_setting_is_named(env, change, check, reason, named):
    status, report, _ = run({**env, **change}, "obo", "check")
    assert status == 1 and not report["ok"]
    line = only_failure(report, check)
    assert line["detail"].startswith(reason) and named in line["fix"], line
    assert "a-wrong-secret-value" not in json.dumps(report)


def test_an_unregistered_certificate_is_aadsts700027(env, tmp_path):
    key = pki.new_rsa_key()
    pem = tmp_path / "unregistered.pem"
    pem.write_bytes(pki.key_pem(key) + pki.cert_pem(pki.make_client_cert(key, "not registered")))
    pem.chmod(0o600)
    changed = {k: v for k, v in env.items() if k != "AZURE_CLIENT_SECRET"}
    status, report, _ = run({**changed, "AZURE_CLIENT_CERTIFICATE_PATH": str(pem)}, "obo", "check")
    assert status == 1
    line = only_failure(report, "credential")
    assert line["detail"].startswith("AADSTS700027") and "AZURE_CLIENT_CERTIFICATE_PATH" in line["fix"]


def test_a_federated_token_of_another_subject_is_aadsts700213(infra, env, tmp_path):
    tenant, _ = infra
    token_file = tenant.tenant.write_federated_token(tmp_path / "token",
                                                     subject="system:serviceaccount:default:other")
    changed = {k: v for k, v in env.items() if k != "AZURE_CLIENT_SECRET"}
    status, report, _ = run({**changed, "AZURE_FEDERATED_TOKEN_FILE": str(token_file)}, "obo", "check")
    assert status == 1
    line = only_failure(report, "credential")
    assert line["detail"].startswith("AADSTS700213") and "AZURE_FEDERATED_TOKEN_FILE" in line["fix"]
    good = tenant.tenant.write_federated_token(tmp_path / "good")
    status, report, _ = run({**changed, "AZURE_FEDERATED_TOKEN_FILE": str(good)}, "obo", "check")
    assert status == 0, failures(report)


def test_a_wrong_redis_password_is_named(env):
    wrong = env["REDIS_URL"].replace(PASSWORD, "not-the-password")
    status, report, _ = run({**env, "REDIS_URL": wrong}, "obo", "check")
    assert status == 1
    line = only_failure(report, "redis")
    assert line["detail"].startswith("redis_auth") and "REDIS_URL" in line["fix"]
    assert "not-the-password" not in json.dumps(report)  # the URL is shown without it


def test_an_authority_behind_an_untrusted_ca_names_the_bundle(env, tmp_path):
    other_ca = tmp_path / "other-ca.pem"  # a CA of our own, which did not sign the dev tenant's
    other_ca.write_bytes(pki.cert_pem(pki.make_ca(pki.new_rsa_key())))
    status, report, _ = run({**env, "REQUESTS_CA_BUNDLE": str(other_ca)}, "obo", "check")
    assert status == 1
    lines = {line["check"]: line for line in failures(report)}
    assert set(lines) == {"authority", "downstream"}  # Graph is the dev tenant's host too
    authority = lines["authority"]
    assert authority["detail"].startswith("untrusted_ca")
    assert "unable to get local issuer certificate" in authority["detail"]
    assert f"{other_ca} (from REQUESTS_CA_BUNDLE)" in authority["detail"]
    assert "REQUESTS_CA_BUNDLE" in authority["fix"]


def test_token_cache_keys_of_another_deployment_are_counted(env):
    other = TokenCacheCodec([Fernet.generate_key().decode()])
    ours = TokenCacheCodec([env["TOKEN_CACHE_KEYS"]])
    client = redis.Redis.from_url(env["REDIS_URL"])
    for index, codec in enumerate([other, other, other, ours]):
        partition = partition_key(f"00000000-0000-0000-0000-00000000000{index}", "t")
        client.set(f"flask-obo:cache:{{{partition}}}", codec.seal(partition, "{}"), ex=600)
    status, report, _ = run(env, "obo", "check")
    assert status == 1
    line = only_failure(report, "redis")
    assert line["subject"] == "TOKEN_CACHE_KEYS"
    assert line["detail"] == "3 of 4 sampled entries do not decrypt with any key"


THREE_BAD = {"AZURE_CLIENT_ID": "not-a-guid", "TOKEN_CACHE_KEYS": "a b", "LOG_LEVEL": "loud"}


def _three_lines(stderr: str) -> None:
    lines = sorted(line for line in stderr.splitlines() if line.strip())
    assert "Traceback" not in stderr
    assert lines == sorted([
        "flask-obo: configuration error: AZURE_CLIENT_ID: must be a GUID",
        "flask-obo: configuration error: TOKEN_CACHE_KEYS: key 1 contains whitespace; "
        "separate keys with commas only (new,old)",
        "flask-obo: configuration error: LOG_LEVEL: must be one of debug, info, warning, error, critical",
    ]), stderr


def test_three_bad_settings_are_three_lines_everywhere(env):
    bad = {**env, **THREE_BAD}
    status, _, stderr = run(bad, "run", "--port", str(free_port()), json_output=False)
    assert status == 3
    _three_lines(stderr)

    port = free_port()
    gunicorn = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--config", str(ROOT / "config/gunicorn.conf.py"),
         "--bind", f"127.0.0.1:{port}", "wsgi:app"],
        cwd=tempfile.mkdtemp(prefix="flask-obo-gunicorn-"), env={**bad, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60)
    assert gunicorn.returncode == 1
    _three_lines(gunicorn.stderr)

    status, report, stderr = run(bad, "obo", "check")
    assert status == 1 and "Traceback" not in stderr
    assert sorted(line["subject"] for line in failures(report)) == [
        "AZURE_CLIENT_ID", "LOG_LEVEL", "TOKEN_CACHE_KEYS"]


def test_token_cache_commands_need_only_the_redis_settings(env):
    cache_only = {k: v for k, v in env.items() if not k.startswith(("AZURE_", "GRAPH_"))}
    status, stats, stderr = run(cache_only, "token-cache", "stats")
    assert status == 0, stderr
    assert stats["entries"] == 0
    # and the check says which Entra settings are missing, while still checking Redis
    status, report, _ = run(cache_only, "obo", "check")
    assert status == 1
    assert [line["subject"] for line in failures(report)] == ["AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET",
                                                              "AZURE_TENANT_ID"]
    assert any(line["check"] == "redis" and line["status"] == "ok" for line in report["checks"])


def test_a_misspelt_setting_is_a_warning_with_the_closest_name(env):
    status, report, stderr = run({**env, "LOG_FROMAT": "json"}, "obo", "check")
    assert status == 0  # a warning: the check passes
    [warning] = [line for line in report["checks"] if line["status"] == "warn"]
    assert warning["subject"] == "LOG_FROMAT" and "did you mean LOG_FORMAT?" in warning["detail"]
    assert "LOG_FROMAT: not a setting of flask-obo, ignored; did you mean LOG_FORMAT?" in stderr


def test_gunicorn_warns_of_a_misspelt_setting_at_start_up(env):
    port = free_port()
    cwd = Path(tempfile.mkdtemp(prefix="flask-obo-gunicorn-"))
    log = cwd / "gunicorn.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", str(ROOT / "config/gunicorn.conf.py"),
             "--bind", f"127.0.0.1:{port}", "--workers", "1", "wsgi:app"],
            cwd=cwd, env={**env, "GUNICORN_WORKER": "4", "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until(lambda: "did you mean" in log.read_text(), timeout=30, what="the warning")
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "GUNICORN_WORKER: not a setting of flask-obo, ignored; did you mean GUNICORN_WORKERS?" \
        in log.read_text()
    assert os.environ.get("GUNICORN_WORKER") is None
