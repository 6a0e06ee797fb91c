"""X.509 material for the dev tenant: a local CA, its HTTPS server certificate, and the
API app's self-signed client certificate.

msal refuses ``http://`` authorities, so the dev tenant must speak TLS with a
certificate that ``requests`` can verify; a private CA (added to ``ca-bundle.pem``)
is the least intrusive way. The extensions follow what strict verifiers (Python 3.13's
``VERIFY_X509_STRICT``, Go, browsers) demand, so the same certs work everywhere.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "devtenant", "127.0.0.1", "::1")
RENEW_BEFORE = dt.timedelta(days=30)


def new_rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """Generate an RSA key (2048 bits: what Entra uses, and fast enough for tests)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def key_pem(key: rsa.RSAPrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM: the API reads its client key without a passphrase."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flask-obo devtenant"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(key: rsa.RSAPrivateKey) -> x509.Certificate:
    """Self-signed CA valid for 10 years; only ever trusted via ca-bundle.pem."""
    now = _now()
    name = _name("flask-obo devtenant local CA")
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def make_server_cert(
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    key: rsa.RSAPrivateKey,
    sans: Iterable[str],
) -> x509.Certificate:
    """Leaf TLS certificate for the given DNS names / IP addresses, signed by the CA."""
    names = list(dict.fromkeys(sans))
    now = _now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=397))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def make_client_cert(key: rsa.RSAPrivateKey, common_name: str) -> x509.Certificate:
    """Self-signed client certificate, like the ones uploaded to an Entra app registration."""
    now = _now()
    name = _name(common_name)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=730))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )


def san_names(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses (as strings) a certificate is valid for."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = set(ext.get_values_for_type(x509.DNSName))
    names.update(str(ip) for ip in ext.get_values_for_type(x509.IPAddress))
    return names


def normalise_san(value: str) -> str:
    """Canonical text of a SAN so that '::1' and '0:0::1' compare equal."""
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        return value.strip().lower()


def needs_renewal(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc - RENEW_BEFORE < _now()


def thumbprint(cert: x509.Certificate, algorithm: str = "sha256") -> str:
    """base64url (unpadded) certificate thumbprint, the form of JOSE x5t / x5t#S256."""
    digest = hashes.SHA256() if algorithm == "sha256" else hashes.SHA1()  # noqa: S303
    raw = cert.fingerprint(digest)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def load_pem_certs(data: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(data)


def load_pem_key(data: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("devtenant only uses RSA keys")
    return key
