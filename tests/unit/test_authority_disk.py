"""The authority's documents on disk: a recycled worker validates tokens while Entra ID is down,
and only files this process's user alone could have written are believed."""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import responses
from joserfc.jwk import RSAKey

from flask_obo.authority import (
    AuthorityDiskCache,
    AuthorityUnavailable,
    OpenIdConfiguration,
    SigningKeys,
)
from flask_obo.protector import EntraTokenValidator
from flask_obo.settings import Settings
from tests.support.fake_entra import JWKS_URL, METADATA_URL, TENANT_ID, FakeEntra, settings_env

HOUR = 3600.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Worker:
    """One gunicorn worker's view of the authority: its own memory, the shared directory."""

    def __init__(self, directory: Path, wall: Clock) -> None:
        self.clock = Clock(5_000.0)  # monotonic: each process has its own
        session = requests.Session()
        self.disk = AuthorityDiskCache(str(directory), clock=wall)
        self.metadata = OpenIdConfiguration(METADATA_URL, session, self.clock, disk=self.disk)
        self.keys = SigningKeys(self.metadata, session, self.clock, disk=self.disk)


@pytest.fixture
def authority() -> Iterator[tuple[FakeEntra, responses.RequestsMock]]:
    fake = FakeEntra()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        fake.register(rsps)
        yield fake, rsps


@pytest.fixture
def wall() -> Clock:
    return Clock(1_750_000_000.0)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "authority"


def go_down(rsps: responses.RequestsMock) -> None:
    rsps.replace(responses.GET, METADATA_URL, status=503)
    rsps.replace(responses.GET, JWKS_URL, status=503)


def come_back(fake: FakeEntra, rsps: responses.RequestsMock) -> None:
    rsps.replace(responses.CallbackResponse(responses.GET, METADATA_URL, callback=fake._metadata))
    rsps.replace(responses.CallbackResponse(responses.GET, JWKS_URL, callback=fake._jwks))


def authority_calls(rsps: responses.RequestsMock) -> int:
    return sum(1 for call in rsps.calls if call.request.url in (METADATA_URL, JWKS_URL))


def first_worker_loads(directory: Path, wall: Clock, fake: FakeEntra) -> Worker:
    worker = Worker(directory, wall)
    assert worker.keys.get("key-1") is not None
    assert (fake.metadata_fetches, fake.jwks_fetches) == (1, 1)
    return worker


def records(directory: Path) -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in directory.iterdir()}


def stale_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "past" in r.getMessage()]


# --- a new worker, the authority down -----------------------------------------------------------------


def test_a_new_worker_validates_tokens_from_disk_without_the_network(authority, directory, wall):
    fake, rsps = authority
    first_worker_loads(directory, wall, fake)
    go_down(rsps)
    calls_before = authority_calls(rsps)
    wall.now += 3 * HOUR

    recycled = Worker(directory, wall)
    validator = EntraTokenValidator(Settings.from_env(settings_env()), recycled.keys)
    token = validator.authenticate_token(fake.api_token())

    assert token.tid == TENANT_ID
    assert recycled.metadata.document()["jwks_uri"] == JWKS_URL
    assert authority_calls(rsps) == calls_before  # not even a failed attempt


def test_a_young_disk_copy_is_refreshed_when_it_turns_24_hours_old(authority, directory, wall):
    fake, _ = authority
    first_worker_loads(directory, wall, fake)
    wall.now += 20 * HOUR
    recycled = Worker(directory, wall)
    assert recycled.keys.get(fake.key.kid) is not None
    assert fake.jwks_fetches == 1

    recycled.clock.now += 4 * HOUR - 1
    assert recycled.keys.get(fake.key.kid) is not None
    assert fake.jwks_fetches == 1
    recycled.clock.now += 1
    assert recycled.keys.get(fake.key.kid) is not None
    assert (fake.metadata_fetches, fake.jwks_fetches) == (2, 2)


def test_an_unknown_kid_after_a_disk_load_still_asks_the_authority(authority, directory, wall):
    fake, _ = authority
    first_worker_loads(directory, wall, fake)
    rolled = RSAKey.generate_key(2048, parameters={"kid": "key-2"})
    fake.published.append(rolled)

    recycled = Worker(directory, wall)

    assert recycled.keys.get("key-2") is not None  # the disk copy predates the roll-over
    assert fake.jwks_fetches == 2
    assert "key-2" in json.dumps(records(directory))  # and the disk now knows it too


def test_a_new_worker_with_nothing_on_disk_and_the_authority_down_cannot_validate(authority, directory, wall):
    _, rsps = authority
    go_down(rsps)
    with pytest.raises(AuthorityUnavailable):
        Worker(directory, wall).keys.get("key-1")


# --- stale copies --------------------------------------------------------------------------------------


def test_a_stale_copy_is_used_while_the_authority_is_down_with_one_warning(
        authority, directory, wall, caplog):
    fake, rsps = authority
    first_worker_loads(directory, wall, fake)
    go_down(rsps)
    wall.now += 26.1 * HOUR
    recycled = Worker(directory, wall)
    caplog.set_level(logging.WARNING, logger="flask_obo.authority")
    calls_before = authority_calls(rsps)

    for _ in range(5):
        assert recycled.keys.get(fake.key.kid) is not None
        recycled.clock.now += 10
    assert recycled.keys.get("rolled-over") is None  # an unknown kid: one more try, no more warning

    assert authority_calls(rsps) == calls_before + 3  # one try each (+ the kid), then a minute's rest
    warnings = stale_warnings(caplog)
    assert len(warnings) == 2, warnings
    keys_warning = "the signing keys are 26.1 h old, past their 24 h refresh time"
    assert any(w.startswith(keys_warning) for w in warnings)
    assert any(w.startswith("the openid-configuration is 26.1 h old") for w in warnings)
    assert all("unreachable" in w for w in warnings)

    recycled.clock.now += 20  # a minute after the failure: one more try, one more warning each
    assert recycled.keys.get(fake.key.kid) is not None
    assert authority_calls(rsps) == calls_before + 5
    assert len(stale_warnings(caplog)) == 4


def test_a_stale_copy_is_refetched_and_rewritten_when_the_authority_answers(
        authority, directory, wall, caplog):
    fake, _ = authority
    first_worker_loads(directory, wall, fake)
    before = records(directory)
    fake.published.append(RSAKey.generate_key(2048, parameters={"kid": "key-2"}))
    wall.now += 25 * HOUR

    recycled = Worker(directory, wall)
    assert recycled.keys.get("key-1") is not None

    assert (fake.metadata_fetches, fake.jwks_fetches) == (2, 2)
    after = records(directory)
    assert after.keys() == before.keys()
    assert all(record["fetched_at"] == wall.now for record in after.values())
    assert "key-2" in json.dumps(after) and "key-2" not in json.dumps(before)
    assert not stale_warnings(caplog)


def test_a_copy_dated_in_the_future_is_not_trusted_as_fresh(authority, directory, wall):
    fake, _ = authority
    first_worker_loads(directory, wall, fake)
    wall.now -= HOUR  # the clock stepped back, or the file lies

    assert Worker(directory, wall).keys.get("key-1") is not None
    assert (fake.metadata_fetches, fake.jwks_fetches) == (2, 2)


# --- status(): no network -----------------------------------------------------------------------------


def test_status_reports_the_disk_copy_without_the_network(authority, directory, wall):
    fake, rsps = authority
    empty = Worker(directory, wall)
    assert (empty.metadata.status(), empty.keys.status()) == ("unavailable", "unavailable")
    first_worker_loads(directory, wall, fake)
    go_down(rsps)
    calls_before = authority_calls(rsps)

    recycled = Worker(directory, wall)
    assert (recycled.metadata.status(), recycled.keys.status()) == ("ok", "ok")
    wall.now += 25 * HOUR
    later = Worker(directory, wall)
    assert (later.metadata.status(), later.keys.status()) == ("stale", "stale")
    assert later.keys.get("key-1") is not None
    assert later.keys.status() == "stale"  # the refresh failed
    recycled.clock.now += 24 * HOUR
    assert recycled.keys.status() == "stale"

    assert authority_calls(rsps) == calls_before + 2  # only later.keys.get() tried


# --- what the disk may not be trusted with ------------------------------------------------------------


def test_file_names_do_not_contain_the_urls(authority, directory, wall):
    fake, _ = authority
    first_worker_loads(directory, wall, fake)

    names = sorted(p.name for p in directory.iterdir())

    assert len(names) == 2
    for name in names:
        assert name.endswith(".json") and len(name) == 64 + len(".json")
        assert "login" not in name and TENANT_ID not in name


def test_the_directory_and_files_are_private(authority, directory, wall):
    fake, _ = authority
    first_worker_loads(directory, wall, fake)

    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.stat().st_uid == os.geteuid()


def test_the_default_directory_is_per_user_under_the_temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    disk = AuthorityDiskCache(None)

    assert disk.directory == str(tmp_path / f"flask-obo-authority-{os.geteuid()}")
    assert not os.path.exists(disk.directory)  # nothing happens before the first save
    disk.save("https://example.test/doc", "{}")
    assert stat.S_IMODE(os.stat(disk.directory).st_mode) == 0o700


def _assert_disk_ignored(directory: Path, wall: Clock, fake: FakeEntra, caplog, reason: str) -> None:
    """A new worker does not use the disk copy: it asks the authority, and says why."""
    caplog.set_level(logging.WARNING, logger="flask_obo.authority")
    fetches = (fake.metadata_fetches, fake.jwks_fetches)
    assert Worker(directory, wall).keys.get("key-1") is not None
    assert fake.metadata_fetches == fetches[0] + 1
    assert reason in caplog.text


def test_a_directory_others_can_write_is_ignored(authority, directory, wall, caplog):
    fake, _ = authority
    first_worker_loads(directory, wall, fake)
    directory.chmod(0o777)

    _assert_disk_ignored(directory, wall, fake, caplog, "writable by group or others (mode 777)")


def test_a_group_writable_file_is_ignored(authority, directory, wall, caplog):
    fake, _ = authority
    first_worker_loads(directory, wall, fake)
    for path in directory.iterdir():
        path.chmod(0o620)

    _assert_disk_ignored(directory, wall, fake, caplog, "writable by group or others (mode 620)")


def test_files_of_another_user_are_ignored(authority, directory, wall, caplog, monkeypatch):
    fake, _ = authority
    first_worker_loads(directory, wall, fake)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)  # as if another user had written them

    _assert_disk_ignored(directory, wall, fake, caplog, "not to this process's uid 4242")


def test_a_symlinked_directory_is_ignored(authority, directory, wall, caplog, tmp_path):
    fake, _ = authority
    first_worker_loads(directory, wall, fake)
    link = tmp_path / "link"
    link.symlink_to(directory)

    _assert_disk_ignored(link, wall, fake, caplog, "ignoring the authority cache directory")


@pytest.mark.parametrize(
    "damage", ["not-json", "truncated", "wrong-shape", "other-url", "bad-jwks", "oversized"])
def test_a_damaged_file_is_ignored(authority, directory, wall, caplog, damage):
    fake, _ = authority
    first_worker_loads(directory, wall, fake)
    for path in directory.iterdir():
        record = json.loads(path.read_text())
        path.write_text({
            "not-json": "\x00\xffgarbage",
            "truncated": path.read_text()[:40],
            "wrong-shape": json.dumps(["a list"]),
            "other-url": json.dumps(dict(record, url="https://evil.example/keys")),
            "bad-jwks": json.dumps(dict(record, text='{"keys": "none"}')),
            "oversized": json.dumps(dict(record, pad="x" * (1024 * 1024))),
        }[damage])

    _assert_disk_ignored(directory, wall, fake, caplog, "ignoring the")


def test_an_unusable_directory_never_crashes(authority, tmp_path, wall, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    caplog.set_level(logging.WARNING, logger="flask_obo.authority")

    worker = Worker(blocker, wall)
    assert worker.keys.get("key-1") is not None
    assert worker.metadata.status() == "ok"
    assert "cannot use the authority cache directory" in caplog.text
