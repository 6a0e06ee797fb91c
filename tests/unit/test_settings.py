"""Settings: documented defaults, one-line errors that never echo a value, certificates, .env."""

from __future__ import annotations

import datetime
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from app import create_app
from flask_obo.extension import services_of
from flask_obo.settings import Settings, SettingsError
from tests.support.fake_entra import CLIENT_ID, CLIENT_SECRET, TENANT_ID, settings_env

MAIN = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery staple"
SETTINGS_PREFIXES = ("AZURE_", "API_", "GRAPH_", "REDIS_", "TOKEN_CACHE_", "CORS_")


# --- certificates --------------------------------------------------------------------------------


def _key_and_certificate() -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flask-obo test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return key, certificate.public_bytes(serialization.Encoding.PEM)


KEY, CERT_PEM = _key_and_certificate()
PLAIN_KEY_PEM = KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
ENCRYPTED_KEY_PEM = KEY.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.BestAvailableEncryption(PASSWORD.encode()),
)


def certificate_env(path: Path, content: bytes, **overrides: str) -> dict[str, str]:
    path.write_bytes(content)
    env = settings_env(AZURE_CLIENT_CERTIFICATE_PATH=str(path), **overrides)
    del env["AZURE_CLIENT_SECRET"]
    return env


def assert_one_line_naming(error: SettingsError, variable: str, *hidden: str) -> None:
    message = str(error)
    assert message.startswith(variable), message
    assert "\n" not in message and "\r" not in message
    for value in hidden:
        assert value not in message, message


# --- defaults -----------------------------------------------------------------------------------


def test_the_minimal_environment_gives_the_documented_defaults():
    settings = Settings.from_env(settings_env())

    assert settings.tenant_id == TENANT_ID
    assert settings.client_id == CLIENT_ID
    assert settings.client_secret == CLIENT_SECRET
    assert settings.authority_host == "https://login.microsoftonline.com"
    assert settings.authority == f"https://login.microsoftonline.com/{TENANT_ID}"
    assert settings.issuer == f"https://login.microsoftonline.com/{TENANT_ID}/v2.0"
    assert settings.openid_configuration_url == (
        f"https://login.microsoftonline.com/{TENANT_ID}/v2.0/.well-known/openid-configuration"
    )
    assert settings.app_id_uri == f"api://{CLIENT_ID}"
    assert settings.required_scope == "user_impersonation"
    assert settings.graph_base_url == "https://graph.microsoft.com/v1.0"
    assert settings.graph_scopes == ("https://graph.microsoft.com/.default",)
    assert settings.token_cache_prefix == "flask-obo"
    assert settings.token_cache_ttl_seconds == 90 * 24 * 3600
    assert settings.cors_allowed_origins == ()
    assert settings.redis_url is None
    assert settings.token_cache_keys == ()


def test_explicit_values_are_taken_and_normalised():
    key1, key2 = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings = Settings.from_env(settings_env(
        AZURE_CLIENT_ID=CLIENT_ID.upper(),
        AZURE_APP_ID_URI="api://contoso.example/obo",
        AZURE_AUTHORITY_HOST="https://login.contoso.example/",
        GRAPH_SCOPES="https://graph.microsoft.com/User.Read, https://graph.microsoft.com/Mail.Read",
        REDIS_URL="rediss://cache.example:6380/0",
        TOKEN_CACHE_KEYS=f" {key1} , {key2} ",
        TOKEN_CACHE_TTL_SECONDS="3600",
        CORS_ALLOWED_ORIGINS="https://spa.example/, http://localhost:5173",
    ))

    assert settings.client_id == CLIENT_ID
    assert settings.app_id_uri == "api://contoso.example/obo"
    assert settings.issuer == f"https://login.contoso.example/{TENANT_ID}/v2.0"
    assert settings.graph_scopes == (
        "https://graph.microsoft.com/User.Read", "https://graph.microsoft.com/Mail.Read",
    )
    assert settings.token_cache_keys == (key1, key2)
    assert settings.token_cache_ttl_seconds == 3600
    assert settings.cors_allowed_origins == ("https://spa.example", "http://localhost:5173")


# --- errors ----------------------------------------------------------------------------------------

GOOD_KEY = Fernet.generate_key().decode()
BAD_KEY = "this-is-not-a-fernet-key-at-all"
REDIS_WITH_PASSWORD = "redis://:hunter2-redis-password@cache.example:6379/0"
OTHER_API = "5d0c6a4e-1111-4000-8000-00000000abcd"

CASES = {
    "missing-tenant": (settings_env(AZURE_TENANT_ID=""), "AZURE_TENANT_ID", ()),
    "non-guid-tenant": (settings_env(AZURE_TENANT_ID="contoso.onmicrosoft.com"), "AZURE_TENANT_ID",
                        ("contoso.onmicrosoft.com",)),
    "missing-client-id": (settings_env(AZURE_CLIENT_ID=" "), "AZURE_CLIENT_ID", ()),
    "non-guid-client-id": (settings_env(AZURE_CLIENT_ID="nope-not-a-guid"), "AZURE_CLIENT_ID",
                           ("nope-not-a-guid", CLIENT_SECRET)),
    "secret-and-certificate": (settings_env(AZURE_CLIENT_CERTIFICATE_PATH="/run/secrets/obo.pem"),
                               "AZURE_CLIENT_SECRET", (CLIENT_SECRET, "/run/secrets/obo.pem")),
    "neither-secret-nor-certificate": (settings_env(AZURE_CLIENT_SECRET=""), "AZURE_CLIENT_SECRET", ()),
    "plain-http-authority": (settings_env(AZURE_AUTHORITY_HOST="http://login.contoso.example"),
                             "AZURE_AUTHORITY_HOST", ("http://login.contoso.example", CLIENT_SECRET)),
    "plain-http-graph": (settings_env(GRAPH_BASE_URL="http://graph.contoso.example/v1.0"),
                         "GRAPH_BASE_URL", ("http://graph.contoso.example",)),
    "redis-url-without-keys": (settings_env(REDIS_URL=REDIS_WITH_PASSWORD), "TOKEN_CACHE_KEYS",
                               ("hunter2-redis-password",)),
    "redis-url-not-redis": (settings_env(REDIS_URL="http://:hunter2-redis-password@cache.example",
                                         TOKEN_CACHE_KEYS=GOOD_KEY),
                            "REDIS_URL", ("hunter2-redis-password", GOOD_KEY)),
    "bad-key-in-position-2": (settings_env(TOKEN_CACHE_KEYS=f"{GOOD_KEY},{BAD_KEY}"), "TOKEN_CACHE_KEYS",
                              (GOOD_KEY, BAD_KEY)),
    "ttl-zero": (settings_env(TOKEN_CACHE_TTL_SECONDS="0"), "TOKEN_CACHE_TTL_SECONDS", ()),
    "ttl-not-a-number": (settings_env(TOKEN_CACHE_TTL_SECONDS="abc"), "TOKEN_CACHE_TTL_SECONDS", ("abc",)),
    "ttl-negative": (settings_env(TOKEN_CACHE_TTL_SECONDS="-5"), "TOKEN_CACHE_TTL_SECONDS", ()),
    "scope-with-a-space": (settings_env(API_REQUIRED_SCOPE="user impersonation"), "API_REQUIRED_SCOPE",
                           ("user impersonation",)),
    "prefix-with-a-colon": (settings_env(TOKEN_CACHE_PREFIX="flask:obo"), "TOKEN_CACHE_PREFIX",
                            ("flask:obo",)),
    "cors-origin-with-a-path": (settings_env(CORS_ALLOWED_ORIGINS="https://spa.example/app"),
                                "CORS_ALLOWED_ORIGINS", ("https://spa.example/app",)),
    "app-id-uri-not-a-uri": (settings_env(AZURE_APP_ID_URI="not a uri"), "AZURE_APP_ID_URI", ("not a uri",)),
    "graph-with-a-query": (settings_env(GRAPH_BASE_URL="https://graph.microsoft.com/v1.0?$top=5"),
                           "GRAPH_BASE_URL", ("$top=5",)),
    "graph-with-a-fragment": (settings_env(GRAPH_BASE_URL="https://graph.microsoft.com/v1.0#me"),
                              "GRAPH_BASE_URL", ("#me",)),
    "scope-of-another-api": (settings_env(API_REQUIRED_SCOPE=f"api://{OTHER_API}/user_impersonation"),
                             "API_REQUIRED_SCOPE", (OTHER_API,)),
    "log-level-verbose": (settings_env(LOG_LEVEL="VERBOSE"), "LOG_LEVEL", ("VERBOSE",)),
}


@pytest.mark.parametrize(("environ", "variable", "hidden"), list(CASES.values()), ids=list(CASES))
def test_a_bad_setting_is_one_line_naming_the_variable_and_not_the_value(environ, variable, hidden):
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(environ)

    assert_one_line_naming(raised.value, variable, *hidden)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AZURE_AUTHORITY_HOST", "https://[login.contoso.example"),
        ("GRAPH_BASE_URL", "https://[graph.contoso.example/v1.0"),
        ("REDIS_URL", "redis://:hunter2@[cache.example:6379"),
        ("TOKEN_CACHE_TTL_SECONDS", "²"),
        ("TOKEN_CACHE_TTL_SECONDS", "9" * 5000),
    ],
    ids=["authority-bracket", "graph-bracket", "redis-bracket", "ttl-superscript-two", "ttl-5000-digits"],
)
def test_every_malformed_value_is_a_settings_error(variable, value):
    env = settings_env(**{variable: value, "TOKEN_CACHE_KEYS": GOOD_KEY})

    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env)

    assert_one_line_naming(raised.value, variable, value)


@pytest.mark.parametrize("variable", ["AZURE_AUTHORITY_HOST", "GRAPH_BASE_URL"])
def test_an_https_url_with_a_malformed_port_is_refused(variable):
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(settings_env(**{variable: "https://login.contoso.example:99x"}))

    assert_one_line_naming(raised.value, variable, "99x")


def test_a_graph_url_with_a_query_is_told_so():
    """Not "must be an https:// URL", which it is."""
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(settings_env(GRAPH_BASE_URL="https://graph.microsoft.com/v1.0?$top=5"))

    assert "must not have a query" in str(raised.value)
    assert "https://" not in str(raised.value)


@pytest.mark.parametrize("uri", ["api://contoso.example/obo", f"api://{TENANT_ID}/obo",
                                 "https://contoso.example/obo", "urn:contoso:obo"])
def test_app_id_uris_in_entra_forms_are_taken(uri):
    assert Settings.from_env(settings_env(AZURE_APP_ID_URI=uri)).app_id_uri == uri


# --- API_REQUIRED_SCOPE in MSAL.js's full form ---------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "extra"),
    [
        (f"api://{CLIENT_ID}/user_impersonation", {}),
        (f"api://{CLIENT_ID.upper()}/user_impersonation", {}),
        (f"{CLIENT_ID}/user_impersonation", {}),
        ("api://contoso.example/obo/user_impersonation", {"AZURE_APP_ID_URI": "api://contoso.example/obo"}),
    ],
    ids=["api-client-id", "upper-case", "bare-client-id", "app-id-uri"],
)
def test_this_apis_full_scope_means_its_name(scope, extra):
    settings = Settings.from_env(settings_env(API_REQUIRED_SCOPE=scope, **extra))

    assert settings.required_scope == "user_impersonation"


@pytest.mark.parametrize("scope", [f"api://{OTHER_API}/user_impersonation",
                                   "https://graph.microsoft.com/User.Read", f"api://{CLIENT_ID}/"])
def test_another_apis_scope_is_refused_saying_which_form_to_use(scope):
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(settings_env(API_REQUIRED_SCOPE=scope))

    assert_one_line_naming(raised.value, "API_REQUIRED_SCOPE", scope)
    assert "name alone (e.g. user_impersonation)" in str(raised.value)


def test_the_full_scope_form_lets_this_apis_tokens_in(entra):
    """Taken literally, ``api://<client id>/user_impersonation`` would 403 every token: ``scp``
    holds the bare name."""
    settings = Settings.from_env(settings_env(API_REQUIRED_SCOPE=f"api://{CLIENT_ID}/user_impersonation"))
    client = create_app(settings).test_client()

    response = client.get("/api/whoami", headers={"Authorization": f"Bearer {entra.api_token()}"})

    assert response.status_code == 200
    assert response.json["scp"] == "user_impersonation"


@pytest.mark.parametrize(("value", "level"), [(None, "INFO"), ("warning", "WARNING"), ("DEBUG", "DEBUG")])
def test_log_level_is_one_of_the_known_names(value, level):
    env = settings_env(**({"LOG_LEVEL": value} if value else {}))

    assert Settings.from_env(env).log_level == level


# --- config/gunicorn.conf.py read as plain Python (tests, tools) ---------------------------------


@pytest.fixture
def gunicorn_conf(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("GUNICORN_", "LOG_LEVEL", *SETTINGS_PREFIXES)):
            monkeypatch.delenv(name)

    def load(**environ: str) -> dict:
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        return runpy.run_path(str(MAIN / "config" / "gunicorn.conf.py"))

    return load


def test_gunicorn_conf_gives_its_values_without_the_apis_settings(gunicorn_conf):
    """Only gunicorn itself (which names the file ``__config__``) checks the API's settings."""
    conf = gunicorn_conf()

    assert conf["bind"] == "127.0.0.1:8000"
    assert conf["loglevel"] == "info"
    assert conf["max_requests"] == 5000 and conf["max_requests_jitter"] == 500


def test_gunicorn_conf_takes_zero_where_it_means_never(gunicorn_conf):
    conf = gunicorn_conf(GUNICORN_MAX_REQUESTS="0", GUNICORN_MAX_REQUESTS_JITTER="0",
                         GUNICORN_GRACEFUL_TIMEOUT="0")

    assert (conf["max_requests"], conf["max_requests_jitter"], conf["graceful_timeout"]) == (0, 0, 0)


@pytest.mark.parametrize(("variable", "value"), [("GUNICORN_WORKERS", "abc"), ("GUNICORN_THREADS", "0"),
                                                 ("GUNICORN_TIMEOUT", "0"), ("GUNICORN_MAX_REQUESTS", "-1"),
                                                 ("LOG_LEVEL", "VERBOSE")])
def test_gunicorn_conf_stops_with_one_line_on_a_bad_value(gunicorn_conf, variable, value):
    with pytest.raises(SystemExit) as raised:
        gunicorn_conf(**{variable: value})

    message = str(raised.value.code)
    assert message.startswith(f"flask-obo: configuration error: {variable}: "), message
    assert "\n" not in message and value not in message.split(": ", 2)[2]


def test_a_bad_token_cache_key_is_reported_by_position():
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(settings_env(TOKEN_CACHE_KEYS=f"{GOOD_KEY}, {BAD_KEY}"))

    assert "key 2" in str(raised.value)


def test_a_cors_origin_with_a_path_is_refused_naming_the_variable():
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(settings_env(CORS_ALLOWED_ORIGINS="https://spa.example, https://spa.example/app"))

    assert str(raised.value).startswith("CORS_ALLOWED_ORIGINS")
    assert "\n" not in str(raised.value)


def test_a_missing_certificate_file_is_named_without_its_path(tmp_path):
    path = tmp_path / "absent.pem"
    env = settings_env(AZURE_CLIENT_CERTIFICATE_PATH=str(path), AZURE_CLIENT_SECRET="")

    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env)

    assert_one_line_naming(raised.value, "AZURE_CLIENT_CERTIFICATE_PATH", str(tmp_path))


@pytest.mark.parametrize(
    ("content", "password", "variable"),
    [
        (CERT_PEM, None, "AZURE_CLIENT_CERTIFICATE_PATH"),
        (PLAIN_KEY_PEM, None, "AZURE_CLIENT_CERTIFICATE_PATH"),
        (b"not a pem file", None, "AZURE_CLIENT_CERTIFICATE_PATH"),
        (ENCRYPTED_KEY_PEM + CERT_PEM, "wrong password 12345", "AZURE_CLIENT_CERTIFICATE_PATH"),
        (ENCRYPTED_KEY_PEM + CERT_PEM, None, "AZURE_CLIENT_CERTIFICATE_PASSWORD"),
        (PLAIN_KEY_PEM + CERT_PEM, "unneeded password 12345", "AZURE_CLIENT_CERTIFICATE_PASSWORD"),
    ],
    ids=["certificate-without-key", "key-without-certificate", "not-pem", "wrong-password",
         "missing-password", "password-for-a-plain-key"],
)
def test_an_unusable_certificate_file_is_one_line_naming_the_variable(tmp_path, content, password, variable):
    overrides = {"AZURE_CLIENT_CERTIFICATE_PASSWORD": password} if password else {}
    env = certificate_env(tmp_path / "obo.pem", content, **overrides)

    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env)

    hidden = [str(tmp_path), "PRIVATE KEY-----", "CERTIFICATE-----"] + ([password] if password else [])
    assert_one_line_naming(raised.value, variable, *hidden)


def test_a_wrong_password_message_points_at_the_password(tmp_path):
    env = certificate_env(tmp_path / "obo.pem", ENCRYPTED_KEY_PEM + CERT_PEM,
                          AZURE_CLIENT_CERTIFICATE_PASSWORD="wrong password 12345")

    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env)

    assert "AZURE_CLIENT_CERTIFICATE_PASSWORD" in str(raised.value)


# --- a valid certificate ------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["key-then-certificate", "certificate-then-key"])
def test_a_certificate_with_an_encrypted_key_becomes_msal_credentials(tmp_path, order):
    pems = [ENCRYPTED_KEY_PEM, CERT_PEM]
    content = b"".join(pems if order == "key-then-certificate" else reversed(pems))
    env = certificate_env(tmp_path / "obo.pem", content, AZURE_CLIENT_CERTIFICATE_PASSWORD=PASSWORD)

    settings = Settings.from_env(env)

    assert settings.client_certificate is not None
    credential = settings.client_certificate.as_msal_credential()
    assert isinstance(credential, dict)
    assert set(credential) == {"private_key", "public_certificate"}
    assert credential["public_certificate"].encode() == CERT_PEM
    loaded = serialization.load_pem_private_key(credential["private_key"].encode(), password=None)
    assert loaded.private_numbers() == KEY.private_numbers()
    text = repr(settings)
    assert "PRIVATE KEY" not in text
    assert credential["private_key"] not in text
    assert PASSWORD not in text


def test_repr_hides_every_secret():
    key = Fernet.generate_key().decode()
    settings = Settings.from_env(settings_env(REDIS_URL=REDIS_WITH_PASSWORD, TOKEN_CACHE_KEYS=key))

    text = repr(settings)

    assert TENANT_ID in text  # the repr is useful...
    for secret in (CLIENT_SECRET, key, "hunter2-redis-password"):  # ...but keeps secrets out
        assert secret not in text


# --- wsgi.py -----------------------------------------------------------------------------------------


def test_wsgi_stops_with_one_line_naming_the_bad_variable(tmp_path):
    secret = "wsgi-subprocess-secret-4f8a"
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_PREFIXES)}
    env.update(PYTHONPATH=str(MAIN), AZURE_TENANT_ID=TENANT_ID, AZURE_CLIENT_ID="nope",
               AZURE_CLIENT_SECRET=secret)

    result = subprocess.run([sys.executable, "-c", "import wsgi"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "AZURE_CLIENT_ID" in lines[0]
    assert secret not in result.stderr and secret not in result.stdout
    assert "Traceback" not in result.stderr


# --- .env ---------------------------------------------------------------------------------------------


@pytest.fixture
def dotenv_dir(tmp_path, monkeypatch) -> Path:
    for name in list(os.environ):
        if name.startswith(SETTINGS_PREFIXES):
            monkeypatch.delenv(name)
    (tmp_path / ".env").write_text(
        f"AZURE_TENANT_ID={TENANT_ID}\n"
        f"AZURE_CLIENT_ID={CLIENT_ID}\n"
        "AZURE_CLIENT_SECRET=secret-from-dotenv\n"
        "API_REQUIRED_SCOPE=Files.Read\n"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_settings_are_read_from_dotenv(dotenv_dir):
    settings = Settings.from_env()

    assert settings.tenant_id == TENANT_ID
    assert settings.client_id == CLIENT_ID
    assert settings.client_secret == "secret-from-dotenv"
    assert settings.required_scope == "Files.Read"


def test_the_environment_overrides_dotenv(dotenv_dir, monkeypatch):
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "secret-from-environment")
    monkeypatch.setenv("API_REQUIRED_SCOPE", "Mail.Read")

    settings = Settings.from_env()

    assert settings.client_secret == "secret-from-environment"
    assert settings.required_scope == "Mail.Read"
    assert settings.client_id == CLIENT_ID  # still from .env


def test_create_app_without_arguments_uses_dotenv(dotenv_dir):
    app = create_app()

    assert services_of(app).settings.required_scope == "Files.Read"


def test_without_dotenv_or_environment_the_error_names_a_variable(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith(SETTINGS_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(SettingsError) as raised:
        Settings.from_env()

    assert str(raised.value).startswith("AZURE_")


def test_a_certificate_that_does_not_match_its_key_is_refused(tmp_path):
    other_key, _ = _key_and_certificate()
    other_key_pem = other_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(certificate_env(tmp_path / "mixed.pem", other_key_pem + CERT_PEM))
    assert_one_line_naming(raised.value, "AZURE_CLIENT_CERTIFICATE_PATH")
    assert "does not match" in str(raised.value)


def test_an_expired_certificate_is_refused_at_start_up(tmp_path):
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired")])
    expired = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(KEY.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1)).sign(KEY, hashes.SHA256())
    )
    content = PLAIN_KEY_PEM + expired.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(certificate_env(tmp_path / "expired.pem", content))
    assert_one_line_naming(raised.value, "AZURE_CLIENT_CERTIFICATE_PATH")
    assert "expired" in str(raised.value)
