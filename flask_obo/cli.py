"""``flask token-cache …``: the operator's commands for the shared token cache (Redis).

Registered on every application by ``FlaskOBO.init_app``; run them as
``flask --app wsgi token-cache stats|evict|rekey`` with the API's own settings (the same
``REDIS_URL``, topology and ``TOKEN_CACHE_KEYS``). They need only those: on an application
whose other settings are missing or wrong (``operator_app``), they read the Redis and
token-cache settings alone (``Settings.for_token_cache``). They work on one Redis, a Cluster (every
primary is scanned) and Sentinel alike, never run ``KEYS``, and print no token, blob or key:
partitions (SHA-256 hashes) at most. Without ``REDIS_URL`` there is no shared cache to work
on: they say so and exit 1.

* ``stats``: entries, their bytes, and bytes per entry (p50, p99).
* ``evict --oid … --tid …``: one user's sign-out, as ``DELETE /api/me/token-cache`` does it.
* ``rekey``: re-encrypt every entry with the first of ``TOKEN_CACHE_KEYS``, so an old key
  can be dropped before the TTL runs out. Each entry is rewritten only if unchanged since
  it was read, and never while a request holds the user's lock (an entry whose lock is free
  is swapped by one atomic script, 500 to a round trip; one whose lock is held waits for
  it, as requests do), keeping its remaining TTL. Interrupted, it can be run again:
  entries the first key already decrypts are skipped.
"""

from __future__ import annotations

import json
import math
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import click
from cryptography.fernet import InvalidToken
from flask import Flask, current_app
from flask.cli import with_appcontext

from .bulkhead import Deadline
from .cache_store import SCAN_BATCH, RedisTokenCacheStore
from .settings import Settings, SettingsError
from .store_errors import LockBusy, StoreUnavailable
from .token_cache import TokenCacheCodec, partition_key

#: Where ``operator_app`` keeps the settings error that kept the API from being built.
SETTINGS_ERROR_KEY = "flask-obo.settings-error"

# What ``rekey`` did with each entry, in the order it reports them.
REKEYED, CHANGED, UNDECRYPTABLE, CURRENT, GONE = (
    "rekeyed", "changed", "undecryptable", "already_current", "gone")


@click.group("token-cache")
def token_cache_cli() -> None:
    """Inspect and maintain the shared token cache (Redis)."""


@token_cache_cli.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@with_appcontext
def stats(as_json: bool) -> None:
    """Entries, their bytes, and bytes per entry (p50, p99). SCANs, never KEYS."""
    store = _cache().store
    sizes: list[int] = []
    tombstones = other = 0
    with _redis_errors():
        partitions = store.partitions()
        for batch in _batches(partitions):
            for size in store.sizes(batch):
                if size is None:
                    other += 1  # not a string: not ours to read
                elif size == 0:
                    tombstones += 1  # removed (sign-out, evict), or gone since the SCAN
                else:
                    sizes.append(size)
    sizes.sort()
    figures = {
        "entries": len(sizes),
        "bytes": sum(sizes),
        "bytes_per_entry_p50": percentile(sizes, 50),
        "bytes_per_entry_p99": percentile(sizes, 99),
        "removed": tombstones,
        "not_strings": other,
    }
    if as_json:
        click.echo(json.dumps(figures))
        return
    click.echo(f"entries          {figures['entries']}")
    click.echo(f"bytes            {figures['bytes']}")
    click.echo(f"bytes per entry  p50 {figures['bytes_per_entry_p50']}  "
               f"p99 {figures['bytes_per_entry_p99']}")
    click.echo(f"removed          {tombstones}  (signed-out users' tombstones; they expire with the TTL)")
    if other:
        click.echo(f"not strings      {other}  (keys under the cache prefix that are not ours to read)")


class NotAGuid(click.ClickException):
    """An ``--oid``/``--tid`` that is not a GUID: one line, exit status 2 (a usage error).
    The value is not echoed: an operator may have pasted a token by mistake."""

    exit_code = 2

    def __init__(self, option: str) -> None:
        super().__init__(f"{option} must be a GUID (the token's {option.lstrip('-')} claim), "
                         "e.g. 72f988bf-86f1-41af-91ab-2d7cd011db47")


def canonical_guid(value: str, option: str) -> str:
    """``value`` in the spelling tokens carry (lower case, hyphens, no braces), whichever
    spelling the operator used (``{…}``, upper case, no hyphens, ``urn:uuid:``): the
    partition is a hash of that spelling, so another one would miss the user's entry."""
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        raise NotAGuid(option) from None


@token_cache_cli.command("evict")
@click.option("--oid", required=True, help="The user's object id (the token's oid claim).")
@click.option("--tid", required=True, help="The user's tenant id (the token's tid claim).")
@with_appcontext
def evict(oid: str, tid: str) -> None:
    """Remove one user's cached tokens, as their sign-out does: every worker and instance
    drops its copy within a second, and their next call makes a new OBO. Any GUID spelling
    is accepted."""
    partition = partition_key(canonical_guid(oid, "--oid"), canonical_guid(tid, "--tid"))
    cache = _cache()
    with _redis_errors():
        removed = cache.forget(partition)
    if removed:
        click.echo(f"evicted partition {partition}")
    else:
        click.echo(f"partition {partition} had no cached tokens (now marked removed all the same)")


@token_cache_cli.command("rekey")
@with_appcontext
def rekey() -> None:
    """Re-encrypt every entry with the first TOKEN_CACHE_KEYS key, so that the others can
    be dropped before the TTL runs out. Safe to interrupt and run again."""
    cache = _cache()
    store, codec = cache.store, cache.codec
    timeout = cache.settings.token_acquisition_timeout
    counts: Counter[str] = Counter()

    def rekeyed(blob: bytes | None) -> tuple[str, bytes | None]:
        """What to do with ``blob``: re-key it (with the new blob), or why not."""
        if blob is None:
            return GONE, None  # removed, expired or not a string since the SCAN
        if codec.sealed_with_first_key(blob):
            return CURRENT, None
        try:
            return REKEYED, codec.rekeyed(blob)
        except InvalidToken:
            return UNDECRYPTABLE, None

    def under_the_lock(partition: str, blob: bytes, new_blob: bytes) -> str:
        """A request holds the user's lock: wait for it, as requests do, then compare."""
        try:
            with store.lock(partition, Deadline(timeout)) as guard:
                return REKEYED if store.replace(partition, blob, new_blob, guard) else CHANGED
        except LockBusy:  # held throughout: that request is rewriting the entry
            return CHANGED

    with _redis_errors(lambda: _report(counts, interrupted=True)):
        partitions = store.partitions()
        with click.progressbar(length=len(partitions), label="re-keying", file=sys.stderr,
                               hidden=not sys.stderr.isatty()) as bar:
            for batch in _batches(partitions):
                swaps = []
                for partition, blob in zip(batch, store.load_many(batch), strict=True):
                    outcome, new_blob = rekeyed(blob)
                    if blob is not None and new_blob is not None:
                        swaps.append((partition, blob, new_blob))
                    else:
                        counts[outcome] += 1
                # Each entry whose lock is free is swapped at once (atomically: as if its lock
                # were taken for the swap); the others wait for their lock, as requests do.
                for (partition, blob, new_blob), result in zip(swaps, store.replace_many(swaps),
                                                               strict=True):
                    if result == -1:
                        counts[under_the_lock(partition, blob, new_blob)] += 1
                    else:
                        counts[REKEYED if result == 1 else CHANGED] += 1
                bar.update(len(batch))
    _report(counts, interrupted=False)


def _report(counts: Counter[str], interrupted: bool) -> None:
    click.echo(f"re-keyed {counts[REKEYED]}, skipped because they changed {counts[CHANGED]}, "
               f"undecryptable {counts[UNDECRYPTABLE]}; already under the first key "
               f"{counts[CURRENT]}, removed or expired meanwhile {counts[GONE]}")
    if counts[UNDECRYPTABLE] and not interrupted:
        click.echo("undecryptable entries are misses for their users (no key here decrypts "
                   "them): each is replaced on its user's next request")


def percentile(ordered: list[int], p: float) -> int:
    """The nearest-rank ``p``th percentile of ``ordered`` (sorted); 0 when empty."""
    if not ordered:
        return 0
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _batches(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), SCAN_BATCH):
        yield items[start:start + SCAN_BATCH]


@dataclass(frozen=True)
class _SharedCache:
    """What the commands work on: the shared cache, its keys, and a user's sign-out."""

    settings: Settings
    store: RedisTokenCacheStore
    codec: TokenCacheCodec
    forget: Callable[[str], bool]


def _cache() -> _SharedCache:
    """The application's shared cache, or, on an ``operator_app``, one built from the
    Redis and token-cache settings alone."""
    from .extension import EXTENSION_KEY, OboServices  # the extension registers these commands

    services = current_app.extensions.get(EXTENSION_KEY)
    if isinstance(services, OboServices):
        settings = services.settings
    else:
        try:
            settings = Settings.for_token_cache()
        except SettingsError as error:
            raise click.ClickException("configuration error:\n" + str(error)) from None
    if not settings.redis_url:
        raise click.ClickException(
            "no shared token cache: REDIS_URL is not set, so each process caches tokens in "
            "its own memory and there is nothing here to work on")
    if not isinstance(services, OboServices):
        store = RedisTokenCacheStore.from_settings(settings)
        return _SharedCache(settings, store, TokenCacheCodec(settings.token_cache_keys),
                            _sign_out(store, settings.token_acquisition_timeout))
    if not isinstance(services.store, RedisTokenCacheStore):
        raise click.ClickException("the token cache store is not Redis; these commands work on Redis only")
    return _SharedCache(settings, services.store, services.codec, services.tokens.forget)


def _sign_out(store: RedisTokenCacheStore, timeout: float) -> Callable[[str], bool]:
    """A user's sign-out as the API does it, less its memory tier (this process has none)."""

    def forget(partition: str) -> bool:
        with store.lock(partition, Deadline(timeout)) as guard:
            return store.remove(partition, guard)

    return forget


def register_commands(app: Flask) -> None:
    """``flask token-cache …`` and ``flask obo …`` on ``app``."""
    from .check import obo_cli

    app.cli.add_command(token_cache_cli)
    app.cli.add_command(obo_cli)


def settings_error_lines(error: SettingsError) -> list[str]:
    """What start-up prints for ``error``: one line per bad setting, no traceback."""
    return [f"flask-obo: configuration error: {line}" for line in error.errors]


def loading_for_a_command() -> bool:
    """Is the application being loaded by the ``flask`` command to find one of its
    commands (``flask obo check``, ``flask token-cache``)? Then bad settings must not stop
    it: those commands report them, or need only some. Not for ``flask run``, ``shell``,
    ``routes``: those load the application inside their own command, and must refuse it."""
    from flask.cli import FlaskGroup

    context = click.get_current_context(silent=True)
    return context is not None and isinstance(context.command, FlaskGroup)


def operator_app(error: SettingsError, name: str = "flask-obo") -> Flask:
    """An application with only the operator's commands, for when the API's settings are
    wrong: ``flask obo check`` then reports every bad setting (and checks what it can), and
    ``flask token-cache`` works from the Redis settings alone. It serves no request."""
    app = Flask(name)
    app.extensions[SETTINGS_ERROR_KEY] = error
    register_commands(app)
    return app


@contextmanager
def _redis_errors(before_exit: Callable[[], None] | None = None) -> Iterator[None]:
    """Redis unreachable, or a user's lock held too long: say so, exit 1."""
    try:
        yield
    except StoreUnavailable:
        if before_exit:
            before_exit()
        raise click.ClickException("Redis cannot be reached (see the log above); run it again "
                                   "once it is back") from None
    except LockBusy:
        raise click.ClickException("the user's lock stayed taken (a token acquisition in flight); "
                                   "run it again") from None
