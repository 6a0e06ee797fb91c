"""What the API learns from its Entra ID authority: OpenID configuration and signing keys.

Both are fetched lazily (never at import or start-up), cached in the process, and
refreshed on a schedule. A failed refresh keeps the last good copy, because an
authority hiccup must not turn every valid token into a 401.

With an ``AuthorityDiskCache`` the last good copies also survive the process: a worker
that gunicorn recycles (max_requests) starts from the disk copy instead of the network,
so an Entra ID outage at that moment does not become an outage of this API.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import requests
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

from .diagnosis import AUTHORITY, Diagnosis
from .settings import DEFAULT_ENTRA_TIMEOUT

log = logging.getLogger(__name__)

METADATA_MAX_AGE = 24 * 3600
KEYS_MAX_AGE = 24 * 3600
UNKNOWN_KID_REFETCH_INTERVAL = 300
RETRY_FAILED_REFRESH_AFTER = 60
DISK_COPY_MAX_BYTES = 1024 * 1024

Status = Literal["ok", "stale", "unavailable"]
_T = TypeVar("_T")


class AuthorityUnavailable(Exception):
    """The authority could not be reached and nothing usable is cached."""


@dataclass(frozen=True)
class DiskCopy:
    """A document as the authority served it, and how old it is (seconds, wall clock)."""

    text: str
    age: float


class AuthorityDiskCache:
    """The last good openid-configuration and JWKS on local disk, one file per URL.

    Whoever can write these files can make this API accept forged tokens, so a file is
    only read when it and its directory belong to this process's user and nobody else can
    write them; anything else is ignored with a warning. Files are opened relative to the
    checked directory and never through a symlink, so the check cannot be raced. Nothing
    here ever raises: without a usable disk copy the API simply asks the authority.
    """

    def __init__(self, directory: str | None = None, clock: Callable[[], float] = time.time) -> None:
        default = os.path.join(tempfile.gettempdir(), f"flask-obo-authority-{os.geteuid()}")
        self.directory = directory or default
        self._clock = clock
        self._warned: set[str] = set()

    def load(self, url: str) -> DiskCopy | None:
        """The stored copy of ``url``, or None when there is none we can trust."""
        try:
            dir_fd = self._open_directory(create=False)
        except FileNotFoundError:
            return None
        except (OSError, _Untrusted) as exc:
            self._warn(f"ignoring the authority cache directory {self.directory}: {exc}")
            return None
        name = _file_name(url)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as file:
                _check_trusted(os.fstat(file.fileno()), "file", regular=True)
                raw = file.read(DISK_COPY_MAX_BYTES + 1)
            if len(raw) > DISK_COPY_MAX_BYTES:
                raise _Untrusted(f"larger than {DISK_COPY_MAX_BYTES} bytes")
            record = json.loads(raw)
            if (not isinstance(record, dict) or record.get("url") != url
                    or not isinstance(record.get("text"), str)
                    or not isinstance(record.get("fetched_at"), int | float)):
                raise _Untrusted("not a stored copy of this URL")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError, _Untrusted) as exc:  # bad JSON is a ValueError
            self._warn(f"ignoring the authority cache file {name}: {exc}")
            return None
        finally:
            os.close(dir_fd)
        age = self._clock() - record["fetched_at"]
        return DiskCopy(record["text"], age if age >= 0 else float("inf"))  # from the future: distrust

    def save(self, url: str, text: str) -> None:
        """Store ``text`` as fetched now, atomically: readers see the old file or the new one."""
        payload = json.dumps({"url": url, "fetched_at": self._clock(), "text": text}).encode()
        if len(payload) > DISK_COPY_MAX_BYTES:
            self._warn(f"not storing a {len(payload)}-byte document from the authority: too large")
            return
        temporary = f".tmp-{secrets.token_hex(8)}"
        try:
            dir_fd = self._open_directory(create=True)
        except (OSError, _Untrusted) as exc:
            self._warn(f"cannot use the authority cache directory {self.directory}: {exc}")
            return
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(temporary, flags, 0o600, dir_fd=dir_fd)
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(payload)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temporary, _file_name(url), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except OSError:
                with suppress(OSError):
                    os.unlink(temporary, dir_fd=dir_fd)
                raise
        except OSError as exc:
            self._warn(f"cannot write to the authority cache directory {self.directory}: {exc}")
        finally:
            os.close(dir_fd)

    def _open_directory(self, create: bool) -> int:
        if create:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            _check_trusted(os.fstat(fd), "directory", regular=False)
        except _Untrusted:
            os.close(fd)
            raise
        return fd

    def _warn(self, message: str) -> None:
        """Warn once per problem: the same broken file must not log on every request."""
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)


class _Untrusted(Exception):
    """A disk copy (or its directory) that this process must not believe."""


def _check_trusted(st: os.stat_result, what: str, regular: bool) -> None:
    if not (stat.S_ISREG if regular else stat.S_ISDIR)(st.st_mode):
        raise _Untrusted(f"not a {'regular file' if regular else 'directory'}")
    if st.st_uid != os.geteuid():
        raise _Untrusted(f"the {what} belongs to uid {st.st_uid}, not to this process's uid {os.geteuid()}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _Untrusted(f"the {what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


def _file_name(url: str) -> str:
    """A name that says nothing about the URL (which names the tenant)."""
    return hashlib.sha256(url.encode()).hexdigest() + ".json"


class _Refreshed:
    """The bookkeeping OpenIdConfiguration and SigningKeys share: when the copy in hand
    was fetched, when to refresh it, the disk copy, and the warning about using it stale.

    Times are on ``clock`` (monotonic); a disk copy's wall-clock age is converted once,
    when it is loaded.
    """

    what = ""
    grammar = ("is", "its", "it")
    max_age = 0.0

    def __init__(self, session: requests.Session, clock: Callable[[], float],
                 disk: AuthorityDiskCache | None, timeout: tuple[float, float],
                 diagnosis: Diagnosis | None = None) -> None:
        self._session = session
        self._diagnosis = diagnosis  # names a wrong tenant or an untrusted CA (once a minute)
        self._clock = clock
        self._disk = disk
        self._timeout = timeout
        self._lock = threading.Lock()
        self._fetched_at = float("-inf")
        self._next_refresh = 0.0
        self._last_stale_warning = float("-inf")

    def _status(self, have_copy: bool) -> Status:
        if not have_copy:
            return "unavailable"
        return "ok" if self._clock() - self._fetched_at < self.max_age else "stale"

    def _from_disk(self, url: str, parse: Callable[[str], _T]) -> _T | None:
        """The disk copy of ``url``, parsed, with the refresh scheduled by its age."""
        copy = self._disk.load(url) if self._disk is not None else None
        if copy is None:
            return None
        try:
            value = parse(copy.text)
        except AuthorityUnavailable as exc:
            log.warning("ignoring the %s on disk: %s", self.what, exc)
            return None
        self._fetched_at = self._clock() - copy.age
        self._next_refresh = self._fetched_at + self.max_age
        log.info("loaded the %s from disk (%s old)", self.what, _duration(copy.age))
        return value

    def _fetch(self, url: str) -> str:
        try:
            # Never followed: the keys and the metadata must come from the authority itself.
            response = self._session.get(url, timeout=self._timeout, allow_redirects=False)
        except requests.RequestException as exc:
            if self._diagnosis is not None:
                self._diagnosis.failed(AUTHORITY, url, exc)
            raise AuthorityUnavailable(f"{url}: {type(exc).__name__}") from None
        if response.is_redirect:
            location = urlsplit(response.headers.get("Location", ""))
            raise AuthorityUnavailable(
                f"{url}: HTTP {response.status_code} redirecting to "
                f"{location.scheme}://{location.netloc}{location.path}; redirects are not followed")
        if response.status_code != 200:
            if self._diagnosis is not None:
                self._diagnosis.answered(url, response)
            raise AuthorityUnavailable(f"{url}: HTTP {response.status_code}")
        if self._diagnosis is not None:
            self._diagnosis.clear(AUTHORITY)
        return response.text

    def _fetched(self, url: str, text: str) -> None:
        self._fetched_at = self._clock()
        self._next_refresh = self._fetched_at + self.max_age
        if self._disk is not None:
            self._disk.save(url, text)

    def _refresh_failed(self, exc: AuthorityUnavailable) -> None:
        """Keep the copy in hand; retry in a minute (a refresh that was not due, e.g. for an
        unknown kid, leaves the schedule alone). Say so when the copy is past its time."""
        now = self._clock()
        if self._next_refresh <= now:
            self._next_refresh = now + RETRY_FAILED_REFRESH_AFTER
        age = now - self._fetched_at
        if age < self.max_age:
            log.warning("%s refresh failed (%s); keeping the cached copy (%s old)",
                        self.what, exc, _duration(age))
        elif now - self._last_stale_warning >= RETRY_FAILED_REFRESH_AFTER:
            self._last_stale_warning = now
            are, their, them = self.grammar
            log.warning(
                "the %s %s %s old, past %s %g h refresh time: "
                "the authority is unreachable (%s); still using %s",
                self.what, are, _duration(age), their, self.max_age / 3600, exc, them,
            )


class OpenIdConfiguration(_Refreshed):
    """The tenant's ``/.well-known/openid-configuration`` document, cached for 24 h.

    msal's construction also needs this document; serving it from here means building
    a user's msal application (once per user per worker, see ``memory_tier``) costs no
    network call.
    """

    what = "openid-configuration"
    max_age = METADATA_MAX_AGE

    def __init__(
        self,
        url: str,
        session: requests.Session,
        clock: Callable[[], float] = time.monotonic,
        *,
        disk: AuthorityDiskCache | None = None,
        timeout: tuple[float, float] = DEFAULT_ENTRA_TIMEOUT,
        diagnosis: Diagnosis | None = None,
    ) -> None:
        super().__init__(session, clock, disk, timeout, diagnosis)
        self.url = url
        self._document: dict[str, Any] | None = None
        self._text = ""

    def document(self) -> dict[str, Any]:
        self._refresh_if_due()
        assert self._document is not None
        return self._document

    def text(self) -> str:
        """The document exactly as served, for msal's tenant discovery."""
        self._refresh_if_due()
        return self._text

    def status(self) -> Status:
        """"ok", "stale" (older than 24 h) or "unavailable" (nothing in hand): what requests
        would use now. Never touches the network and never waits for a refresh; it may load
        the disk copy, so a new worker reports what it will validate with."""
        self._load_from_disk_if_empty()
        return self._status(self._document is not None)

    def _cached_document(self) -> dict[str, Any] | None:
        """The document in hand or on disk, without network I/O (for ``SigningKeys.status``)."""
        self._load_from_disk_if_empty()
        return self._document

    def _load_from_disk_if_empty(self) -> None:
        if self._document is None and self._lock.acquire(blocking=False):
            try:
                self._use_disk_copy()
            finally:
                self._lock.release()

    def _use_disk_copy(self) -> None:
        if self._document is None and (loaded := self._from_disk(self.url, _with_text(_metadata))):
            self._document, self._text = loaded

    def _refresh_if_due(self) -> None:
        if self._document is not None and self._clock() < self._next_refresh:
            return
        with _refresh_lock(self._lock, have_cached=self._document is not None) as refreshing:
            if not refreshing:
                return
            self._use_disk_copy()  # a new process: the disk copy spares the network if young enough
            if self._document is not None and self._clock() < self._next_refresh:
                return
            try:
                text = self._fetch(self.url)
                document = _metadata(text)
            except AuthorityUnavailable as exc:
                if self._document is None:
                    raise
                self._refresh_failed(exc)
                return
            self._document, self._text = document, text
            self._fetched(self.url, text)


class SigningKeys(_Refreshed):
    """The authority's JWKS, keyed by ``kid``.

    An unknown ``kid`` (Entra rolled its keys) triggers one refetch, at most once per
    five minutes, so a flood of forged ``kid`` values cannot hammer the authority.
    """

    what = "signing keys"
    grammar = ("are", "their", "them")
    max_age = KEYS_MAX_AGE

    def __init__(
        self,
        metadata: OpenIdConfiguration,
        session: requests.Session,
        clock: Callable[[], float] = time.monotonic,
        *,
        disk: AuthorityDiskCache | None = None,
        timeout: tuple[float, float] = DEFAULT_ENTRA_TIMEOUT,
        diagnosis: Diagnosis | None = None,
    ) -> None:
        super().__init__(session, clock, disk, timeout, diagnosis)
        self._metadata = metadata
        self._keys: dict[str, RSAKey] | None = None
        self._last_unknown_kid_fetch = float("-inf")

    def get(self, kid: str) -> RSAKey | None:
        """The RSA key for ``kid``, or None when the authority does not publish it."""
        keys = self._keys
        asked_authority = False
        if keys is None or self._clock() >= self._next_refresh:
            keys, asked_authority = self._refresh(scheduled=True)
        key = keys.get(kid)
        if (key is None and not asked_authority  # a fresh answer needs no second request
                and self._clock() - self._last_unknown_kid_fetch >= UNKNOWN_KID_REFETCH_INTERVAL):
            keys, _ = self._refresh(scheduled=False)
            key = keys.get(kid)
        return key

    def status(self) -> Status:
        """Like ``OpenIdConfiguration.status``, for the keys: no network I/O, no waiting."""
        if self._keys is None and self._lock.acquire(blocking=False):
            try:
                document = self._metadata._cached_document()
                if self._keys is None and document is not None:
                    self._keys = self._from_disk(document["jwks_uri"], _rsa_signing_keys)
            finally:
                self._lock.release()
        return self._status(self._keys is not None)

    def _refresh(self, scheduled: bool) -> tuple[dict[str, RSAKey], bool]:
        """The keys to use, and whether the authority was asked for them."""
        with _refresh_lock(self._lock, have_cached=self._keys is not None) as refreshing:
            if not refreshing:
                assert self._keys is not None
                return self._keys, False
            url = self._metadata.document()["jwks_uri"]
            if self._keys is None:  # a new process: the disk copy spares the network if young enough
                self._keys = self._from_disk(url, _rsa_signing_keys)
            now = self._clock()
            if self._keys is not None:
                already_done = (
                    now < self._next_refresh
                    if scheduled
                    else now - self._last_unknown_kid_fetch < UNKNOWN_KID_REFETCH_INTERVAL
                )
                if already_done:  # another thread refreshed while we waited, or the disk copy is young
                    return self._keys, False
            if not scheduled:
                self._last_unknown_kid_fetch = now
            try:
                text = self._fetch(url)
                keys = _unchanged_kept(self._keys, _rsa_signing_keys(text))
            except AuthorityUnavailable as exc:
                if self._keys is None:
                    raise
                self._refresh_failed(exc)
                return self._keys, True
            self._keys = keys
            self._fetched(url, text)
            log.info("loaded %d signing keys from the authority", len(keys))
            return keys, True


@contextmanager
def _refresh_lock(lock: threading.Lock, have_cached: bool) -> Iterator[bool]:
    """Yield whether this thread should refresh. With a cached copy in hand, threads do
    not queue behind a refresh in progress (it may take a slow authority's timeouts):
    they go on with the cached copy."""
    if not lock.acquire(blocking=not have_cached):
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _json_object(text: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        raise AuthorityUnavailable("not JSON") from None
    if not isinstance(document, dict):
        raise AuthorityUnavailable("not a JSON object")
    return document


def _metadata(text: str) -> dict[str, Any]:
    document = _json_object(text)
    if not isinstance(document.get("jwks_uri"), str):
        raise AuthorityUnavailable("openid-configuration has no jwks_uri")
    return document


def _with_text(parse: Callable[[str], _T]) -> Callable[[str], tuple[_T, str]]:
    return lambda text: (parse(text), text)


def _rsa_signing_keys(text: str) -> dict[str, RSAKey]:
    entries = _json_object(text).get("keys")
    if not isinstance(entries, list):
        raise AuthorityUnavailable("JWKS has no keys array")
    keys: dict[str, RSAKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") != "RSA" or entry.get("use", "sig") != "sig":
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str):
            continue
        try:
            keys[kid] = RSAKey.import_key({k: v for k, v in entry.items() if k in {"kty", "n", "e", "kid"}})
        except (JoseError, ValueError, TypeError):
            log.warning("skipping an unreadable key in the JWKS")
    if not keys:
        raise AuthorityUnavailable("JWKS holds no RSA signing keys")
    return keys


def _unchanged_kept(old: dict[str, RSAKey] | None, new: dict[str, RSAKey]) -> dict[str, RSAKey]:
    """``new``, with the object already held for each key whose material (``kid``, ``n``,
    ``e``) is unchanged. The protector's remembered validations hold on to the key object
    that verified them, and are redone when it is no longer the one in the key set: so a
    refetch that changes nothing (the daily refresh, one on a forged ``kid``) keeps them,
    and a withdrawn or replaced key drops exactly the tokens it verified."""
    if not old:
        return new
    return {kid: held if (held := old.get(kid)) is not None
            and held.as_dict(private=False) == key.as_dict(private=False) else key
            for kid, key in new.items()}


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "an unknown number of hours"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


class TenantConfigurations:
    """The OpenID configuration msal needs for each tenant the API exchanges tokens in.

    Single-tenant, that is the one ``home`` document. A multi-tenant API
    (``AZURE_TENANT_ID=organizations``) validates with the ``organizations`` document's
    keys, but runs On-Behalf-Of in each user's own tenant, so msal asks for that tenant's
    document: one ``OpenIdConfiguration`` per allowed tenant, made on first use and kept
    (at most ``limit``, least recently used dropped), with the same disk copies and
    refresh rules as the home document.
    """

    def __init__(self, home: OpenIdConfiguration, session: requests.Session, *,
                 authority_host: str, allowed: Callable[[str], bool], multi_tenant: bool,
                 disk: AuthorityDiskCache | None = None,
                 timeout: tuple[float, float] = DEFAULT_ENTRA_TIMEOUT, limit: int = 1000,
                 diagnosis: Diagnosis | None = None) -> None:
        self.home = home
        self._session, self._disk, self._timeout = session, disk, timeout
        self.diagnosis = diagnosis  # what msal's HTTP client reports token endpoint answers to
        self._allowed, self._multi_tenant, self._limit = allowed, multi_tenant, limit
        self._tenant_url = re.compile(
            re.escape(authority_host) + r"/([0-9a-fA-F-]{36})/v2\.0/\.well-known/openid-configuration")
        self._tenants: OrderedDict[str, OpenIdConfiguration] = OrderedDict()
        self._lock = threading.Lock()

    def for_url(self, url: str) -> OpenIdConfiguration | None:
        """The configuration served at ``url``, if it is one msal may ask for."""
        if url.lower() == self.home.url.lower():
            return self.home
        match = self._tenant_url.fullmatch(url) if self._multi_tenant else None
        if match is None or not self._allowed(match.group(1).lower()):
            return None
        tid = match.group(1).lower()
        with self._lock:
            config = self._tenants.get(tid)
            if config is None:
                config = self._tenants[tid] = OpenIdConfiguration(
                    url, self._session, disk=self._disk, timeout=self._timeout,
                    diagnosis=self.diagnosis)
                if len(self._tenants) > self._limit:
                    self._tenants.popitem(last=False)
            self._tenants.move_to_end(tid)
            return config
