"""The API's own credential towards Entra ID, in each form an app registration can have.

* ``ClientSecret``: ``AZURE_CLIENT_SECRET``.
* ``CertificateFile``: ``AZURE_CLIENT_CERTIFICATE_PATH`` (PEM key + certificate). Key
  Vault's CSI driver rotates the file in place, so it is re-read when it changes (checked
  with one ``stat`` per application build) and, after Entra refuses the certificate, once
  on demand (``reload``), as Microsoft.Identity.Web does. The users' applications share
  its signed client assertions (``SharedAssertions``).
* ``FederatedTokenFile``: ``AZURE_FEDERATED_TOKEN_FILE`` (workload identity federation,
  as AKS injects it): a JWT from a trusted issuer is the client assertion. The file
  rotates, so its token is re-read at each token request once past its ``exp`` (or when
  the file changed), never used beyond it.
* ``ManagedIdentityAssertion``: ``AZURE_CLIENT_ASSERTION=managed_identity`` (optionally
  ``AZURE_MANAGED_IDENTITY_CLIENT_ID`` for a user-assigned identity): msal's
  ``ManagedIdentityClient`` gets a token for ``api://AzureADTokenExchange``, which is the
  client assertion; msal caches it until near its expiry.

msal binds a credential to an application at construction; the token provider builds one
application per user and process. So a credential has a ``version``: when it changes
(a rotated certificate), the provider rebuilds that user's application. Assertions are
callables msal invokes at each token request, so they never go stale.

Given a certificate as a key and certificate, msal parses the certificate for each
application and signs an assertion for each: with an application per user, a user's first
request paid a PEM parse, a private-key load (its RSA checks: about 0.2 s of CPU) and a
signature. The provider's applications get ``for_msal(audience)`` instead: a client
assertion signed once per token endpoint with msal's own ``JwtAssertionCreator`` (the same
PS256 and ``x5t#S256``/``x5c`` headers), reused by every user's application until msal's
``AutoRefresher`` renews it, a minute before it expires.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msal
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from msal.application import extract_certs
from msal.oauth2cli.assertion import JwtAssertionCreator

from .errors import IdentityProviderUnavailable
from .http import ResolvedSession
from .msal_http import EntraUnavailable, bounded_timeout
from .settings import ClientCertificate, Settings, SettingsError, load_certificate

log = logging.getLogger(__name__)

#: Entra's answers meaning "this client credential is not (or no longer) valid": AADSTS700027
#: (certificate signature), 700024 (assertion time range), 7000214 (certificate revoked),
#: 1000502 (certificate expired), 7000274 / 7000277 (certificate not found / not valid).
CREDENTIAL_ERROR_CODES = frozenset({700027, 700024, 7000214, 1000502, 7000274, 7000277})
TOKEN_EXCHANGE_RESOURCE = "api://AzureADTokenExchange"
_EXPIRY_MARGIN_SECONDS = 60  # an assertion this close to its exp is read again


class ClientCredential(Protocol):
    @property
    def version(self) -> int:
        """Bumped whenever ``for_msal`` would give a different credential."""

    def for_msal(self, audience: Callable[[], str] | None = None) -> str | dict[str, Any]:
        """msal's ``client_credential`` (checked for changes first). ``audience`` gives the
        token endpoint of the application it is for (asked at each token request): a
        certificate is then a client assertion shared by all such applications."""

    def reload(self) -> bool:
        """Entra refused the credential: read it again; True if it changed (retry once)."""


class ClientSecret:
    version = 0

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def for_msal(self, audience: Callable[[], str] | None = None) -> str:
        return self._secret

    def reload(self) -> bool:
        return False


class CertificateFile:
    """A PEM certificate file, re-read when it changes on disk."""

    def __init__(self, path: str, password: str | None, loaded: ClientCertificate, client_id: str) -> None:
        self._path, self._password = path, password
        self._client_id = client_id
        self._certificate = loaded
        self._assertions = SharedAssertions(loaded, client_id)
        self._stamp = self._stat()
        self._lock = threading.Lock()
        self.version = 0

    def for_msal(self, audience: Callable[[], str] | None = None) -> dict[str, Any]:
        if self._stat() != self._stamp:
            self.reload()
        if audience is None:  # an application of its own (``obo check``, app tokens)
            return self._certificate.as_msal_credential()
        assertions = self._assertions  # this version's, even if the file rotates meanwhile
        return {"client_assertion": lambda: assertions.signed_for(audience())}

    def reload(self) -> bool:
        with self._lock:
            stamp = self._stat()
            try:
                certificate = load_certificate(self._path, self._password)
            except SettingsError as error:  # mid-rotation, or a bad file: keep the last good one
                if stamp != self._stamp:  # once per change of the file, not per request
                    log.warning("client certificate not reloaded: %s", error)
                self._stamp = stamp
                return False
            self._stamp = stamp
            if certificate == self._certificate:
                return False
            self._certificate = certificate
            self._assertions = SharedAssertions(certificate, self._client_id)
            self.version += 1
            log.info("client certificate reloaded from AZURE_CLIENT_CERTIFICATE_PATH")
            return True

    def _stat(self) -> tuple[int, int, int] | None:
        return _file_stamp(self._path)


class SharedAssertions:
    """One certificate's client assertions: one per token endpoint (audience), signed with
    msal's ``JwtAssertionCreator`` as msal signs them itself, and shared by every
    application until msal's ``AutoRefresher`` signs a new one (a minute before its 10
    minute life ends). The private key is loaded once, on first use."""

    MAX_AUDIENCES = 1000  # one per tenant of a multi-tenant API (as TenantConfigurations)

    def __init__(self, certificate: ClientCertificate, client_id: str) -> None:
        self._certificate, self._client_id = certificate, client_id
        self._creator: JwtAssertionCreator | None = None
        self._by_audience: dict[str, Callable[[], bytes]] = {}
        self._lock = threading.Lock()

    def signed_for(self, audience: str) -> bytes:
        with self._lock:
            refresher = self._by_audience.get(audience)
            if refresher is None:
                if len(self._by_audience) >= self.MAX_AUDIENCES:
                    self._by_audience.clear()
                refresher = self._by_audience[audience] = self._jwt_creator().create_regenerative_assertion(
                    audience=audience, issuer=self._client_id)
        # AutoRefresher has no lock of its own: two threads may both sign at renewal, harmlessly.
        return refresher()

    def _jwt_creator(self) -> JwtAssertionCreator:
        if self._creator is None:
            pem = self._certificate.certificate_pem
            certificate = x509.load_pem_x509_certificate(pem.encode())
            self._creator = JwtAssertionCreator(
                serialization.load_pem_private_key(self._certificate.private_key_pem.encode(), None),
                "PS256", headers={"x5c": extract_certs(pem)},
                sha256_thumbprint=certificate.fingerprint(hashes.SHA256()).hex())
        return self._creator


class _RotatingAssertion:
    """A client assertion msal asks for at each token request (shared by both kinds)."""

    version = 0

    def for_msal(self, audience: Callable[[], str] | None = None) -> dict[str, Callable[[], str]]:
        return {"client_assertion": self.assertion}

    def assertion(self) -> str:
        raise NotImplementedError

    def reload(self) -> bool:
        return False


class FederatedTokenFile(_RotatingAssertion):
    """``AZURE_FEDERATED_TOKEN_FILE``: read again once its token is past its ``exp``
    (less a minute) or the file changed; never cached beyond ``exp``."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._good_until = 0.0
        self._stamp: tuple[int, int, int] | None = None

    def assertion(self) -> str:
        """The token msal sends; an unreadable file is Entra ID being out of reach (503)."""
        token = self._read()
        if token is None:
            raise IdentityProviderUnavailable()
        return token

    def _read(self) -> str | None:
        """The file's token, read again when due; None (logged) when it cannot be read."""
        with self._lock:
            # The file's identity, size and mtime: the kubelet swaps in a new file (a new
            # inode) whose mtime may equal the last one's at the clock's granularity.
            stamp = _file_stamp(str(self._path))
            if self._token is None or time.time() >= self._good_until or stamp != self._stamp:
                try:
                    token = self._path.read_text().strip()
                except (OSError, UnicodeDecodeError):
                    log.warning("cannot read AZURE_FEDERATED_TOKEN_FILE")
                    return None
                self._token, self._stamp = token, stamp
                self._good_until = _expiry(token) - _EXPIRY_MARGIN_SECONDS
            return self._token

    def reload(self) -> bool:
        """Read the file again: True only if it now holds another token (an expired or
        untrusted token still in the file is not worth a second exchange)."""
        with self._lock:
            previous, self._token = self._token, None
        token = self._read()
        return token is not None and token != previous


class ManagedIdentityAssertion(_RotatingAssertion):
    """A managed identity's token for ``api://AzureADTokenExchange`` as the assertion."""

    def __init__(self, client_id: str | None, timeout: tuple[float, float]) -> None:
        identity: Any = (msal.UserAssignedManagedIdentity(client_id=client_id) if client_id
                         else msal.SystemAssignedManagedIdentity())
        self._client = msal.ManagedIdentityClient(identity, http_client=_BoundedSession(timeout))

    def assertion(self) -> str:
        try:
            result = self._client.acquire_token_for_client(resource=TOKEN_EXCHANGE_RESOURCE)
        except (requests.RequestException, msal.ManagedIdentityError, ValueError, EntraUnavailable) as exc:
            log.warning("managed identity endpoint failed: %s", type(exc).__name__)
            raise IdentityProviderUnavailable() from None
        token = result.get("access_token")
        if not isinstance(token, str):
            log.warning("managed identity refused a token: %s", result.get("error"))
            raise IdentityProviderUnavailable()
        return token


class _BoundedSession(ResolvedSession):
    """msal's HTTP client for the managed identity endpoint. msal sends those requests with
    no timeout, so each gets the Entra ID timeouts, capped by the request's deadline: a
    hung IMDS must not hold the user's locks and a waiting-room seat past it. A
    ``requests.Session`` (msal's Service Fabric path requires one) that reads the proxy
    environment once (``NO_PROXY`` must list the IMDS address where a proxy is set)."""

    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__()
        self._timeout = timeout

    def request(self, method: str, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = bounded_timeout(self._timeout)
        return super().request(method, url, *args, **kwargs)


def client_credential(settings: Settings) -> ClientCredential:
    """The credential the settings name (``Settings`` checked there is exactly one)."""
    if settings.federated_token_file:
        return FederatedTokenFile(settings.federated_token_file)
    if settings.client_assertion == "managed_identity":
        return ManagedIdentityAssertion(settings.managed_identity_client_id,
                                        settings.entra_timeout)
    if settings.client_certificate is not None:
        assert settings.client_certificate_path is not None
        return CertificateFile(settings.client_certificate_path, settings.client_certificate_password,
                               settings.client_certificate, settings.client_id)
    assert settings.client_secret is not None
    return ClientSecret(settings.client_secret)


def _file_stamp(path: str) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten (None: unreadable)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _expiry(token: str) -> float:
    """The ``exp`` of a JWT, unverified (Entra verifies it; this only says when to re-read)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return 0.0  # not a JWT we can read: re-read it every time
