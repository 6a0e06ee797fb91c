"""Acquiring downstream API tokens on behalf of the signed-in user (msal's OBO grant).

msal binds a token cache to a ``ConfidentialClientApplication`` at construction, and
``acquire_token_on_behalf_of`` never reads the cache. So each user gets, per process, a
``UserSession`` (see ``flask_obo.memory_tier``): their sealed cache and hot tokens, and,
while a request holds it and needs msal, a pooled application around a cache object
loaded with their tokens alone.

A request goes:

1. **Memory, then Redis, offline.** If the user's session is current, msal's silent
   lookup runs on it with no I/O at all (or not even that: the session remembers msal's
   last answer while msal would repeat it); otherwise the blob is re-read from the store
   first. Nothing here waits on Entra ID, nor on a leader that does: while a leader of
   this user holds the session, the request joins its flight (step 2). While Redis is
   unreachable the session is used as it is, and after one failed Redis call a request
   makes no other (``StoreBudget``): it never waits for a Redis timeout twice.
2. **Entra ID, bounded and single-flight.** On a miss the request starts the user's
   exchange, or joins the one in flight, and waits for it in the worker's waiting room
   (``flask_obo.bulkhead``: no seat while the exchange is on time for Entra ID's observed
   pace, a seat or 503 once it is overdue, 503 at once when the worker retires). The
   exchange, in a thread of its own, takes the user's Redis lock (so one call is made
   whichever worker or instance serves the burst), re-reads, tries the refresh token,
   else runs OBO, and writes back while it still holds the lock. Everything waits at most
   until the deadline of the request that started it. With Redis down the exchange goes
   on without the lock and writes the entry once Redis is back.

A background job acts for a ``CachedUser``: the user a background handle names, with no
assertion to exchange. It goes the same way, except that only the cache and its refresh
token can serve it, and only while the user's entry is the one the handle was taken
from (its generation: a sign-out ends it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from typing import Any, NamedTuple

import msal
import requests

from .authority import AuthorityUnavailable, TenantConfigurations
from .bulkhead import Deadline, SingleFlight, WaitingRoom, WorkerRetirement
from .cache_store import (
    Guard,
    StoreBudget,
    StoredEntry,
    TokenCacheStore,
    entry_under_lock,
    save_and_unlock,
)
from .credentials import CREDENTIAL_ERROR_CODES, ClientCredential
from .errors import (
    AssertionRejected,
    BackgroundHandleRevoked,
    CacheUnavailable,
    ConsentRequired,
    IdentityProviderUnavailable,
    InsufficientClaims,
    InteractionRequired,
    RefreshTokenExpired,
    TokenAcquisitionBusy,
    TokenAcquisitionFailed,
)
from .memory_tier import HotToken, MemoryTier, UserSession, WriteBack
from .metrics import CACHE_HIT, FAILED, MEMORY_HIT, OBO, REFRESH, Metrics
from .msal_http import EntraUnavailable, MsalHttpClient, NetworkNeeded, offline, within
from .protector import EntraAccessToken
from .settings import Settings
from .store_errors import LockBusy, StoreUnavailable
from .token_cache import TokenCacheCodec, partition_key
from .tracing import acquisition
from .worker_state import entra_pace

log = logging.getLogger(__name__)

SESSION_BUSY_SECONDS = 0.05  # longer than any offline lookup; a leader holds it far longer
# msal's silent lookup treats an access token this close to its expiry as expired.
MSAL_EXPIRY_MARGIN_SECONDS = 5 * 60


class ReadMark(NamedTuple):
    """Where a session stood when an entry was read for it: the invalidations it had seen,
    the invalidation channel's epoch (None: down) and the store's losses. A read is
    trusted as current only if none of them moved since (``UserSession.read``)."""

    changes: int
    epoch: int | None
    losses: int


class CachedUser(EntraAccessToken):
    """A user known by their cache entry alone (a background job's, from a handle): the
    ``oid`` and ``tid`` of the entry and its ``generation``, and no assertion (``raw`` is
    empty), so there is nothing to exchange and only the refresh token can renew a token."""

    def __init__(self, oid: str, tid: str, generation: str) -> None:
        super().__init__({"oid": oid, "tid": tid}, raw="")
        self.generation = generation


class OnBehalfOfTokenProvider:
    """Access tokens for downstream APIs on behalf of the caller of a request.

    Every downstream API of a user is served from that user's one session and cache
    entry: msal files each token under its resource, so Graph and another API's token
    sit side by side in the one sealed blob."""

    def __init__(
        self,
        settings: Settings,
        store: TokenCacheStore,
        codec: TokenCacheCodec,
        session: requests.Session,
        metadata: TenantConfigurations,
        credential: ClientCredential,
        metrics: Metrics | None = None,
        retirement: WorkerRetirement | None = None,
    ) -> None:
        self._settings = settings
        self._credential = credential
        self._store, self._codec = store, codec
        self._metrics = metrics or Metrics()
        timeout = settings.entra_timeout
        self.memory = MemoryTier(
            settings.memory_cache_users, lambda: MsalHttpClient(session, metadata, timeout, self._metrics),
            self._metrics, open_blob=codec.open)
        self._write_back = WriteBack(self.memory, store)
        self.waiting_room = WaitingRoom(settings.entra_max_waiting_threads, entra_pace(),
                                        retirement=retirement)
        # A job's own failures (its handle revoked, no refresh token) are not a request's.
        self._flights: SingleFlight[tuple[str, str]] = SingleFlight(
            self.waiting_room,
            private_errors=(AssertionRejected, BackgroundHandleRevoked, RefreshTokenExpired))
        store.watch(self)

    def acquire_token(self, user: EntraAccessToken, scopes: Sequence[str],
                      claims_challenge: str | None = None) -> str:
        """A token for ``scopes`` (one resource) on behalf of ``user``; with
        ``claims_challenge``, always a fresh one.

        Each call counts once in ``flask_obo_token_acquisitions_total``, by how it was
        served (``flask_obo.metrics.OUTCOMES``)."""
        try:
            token, outcome = self._acquire(user, scopes, claims_challenge)
        except BaseException:
            self._metrics.acquisition(FAILED)
            raise
        self._metrics.acquisition(outcome)
        return token

    @acquisition  # the flask_obo.token.acquire span, with the outcome as its source
    def _acquire(self, user: EntraAccessToken, scopes: Sequence[str],
                 claims_challenge: str | None) -> tuple[str, str]:
        deadline = Deadline(self._settings.token_acquisition_timeout)
        budget = StoreBudget(self._settings.redis_timeout)  # shared with the exchange it starts
        partition = partition_key(user.oid, user.tid)
        scopes = list(scopes)
        if claims_challenge is None:
            served = self._from_cache(partition, user, scopes, deadline, budget)
            if served is not None:
                return served
        # A job shares flights only with jobs of its entry's generation: a request's token
        # must not reach a handle that a sign-out revoked, nor the reverse.
        (token, outcome), started = self._flights.run(
            (partition, " ".join(scopes), claims_challenge, _generation(user)),
            lambda: self._from_entra(partition, user, scopes, claims_challenge, deadline, budget),
            deadline)
        # A request that joined another's exchange was handed its token in-process.
        return token, outcome if started else MEMORY_HIT

    def _from_cache(self, partition: str, user: EntraAccessToken, scopes: list[str],
                    deadline: Deadline, budget: StoreBudget) -> tuple[str, str] | None:
        """The token from memory or Redis, never waiting on Entra ID: None on a miss, and
        also while an exchange of this user holds the session to talk to Entra ID (then the
        request joins that flight, in the waiting room, rather than wait out here)."""
        while (session := self.memory.hold(partition, SESSION_BUSY_SECONDS)) is None:
            if self._flights.running(partition):  # an exchange (claims challenge or not) holds it
                return None
            if deadline.expired:
                raise TokenAcquisitionBusy()
        outcome = MEMORY_HIT
        try:
            # While Redis is known to be down, a session that holds a token is served as it
            # is: even if Redis reported a change, that was most likely another worker's
            # newer token, and ours is valid. Such a request is never the breaker's probe
            # (the listener, /readyz and users with nothing in memory find out instead).
            if not session.is_current(self._store.coherence()) and (
                    self._store.healthy or session.blob is None):
                with suppress(StoreUnavailable):
                    self._reload(session, partition, user, budget)
                    outcome = CACHE_HIT
            token = self._offline_token(session, user, scopes)
        finally:
            self.memory.release(session)
        return (token, outcome) if token else None

    def _offline_token(self, session: UserSession, user: EntraAccessToken,
                       scopes: list[str]) -> str | None:
        """msal's offline silent lookup, remembered on the session (``HotToken``).

        msal answers from the cache alone with an access token that is more than five
        minutes from expiry and not past its ``refresh_on``; its answer depends on nothing
        but the cache and the clock. So while the session's cache is still the one the
        answer came from (the same ``blob`` object: every load, acquisition or reset of
        the cache replaces or clears it) and the clock has not reached the earlier of
        those two limits, the answer is the same and msal is not asked. Past them, msal
        decides as before (an aging token goes to Entra ID, which may refresh it)."""
        generation = _generation(user)  # (a request's user has none: msal's cache not needed)
        if generation is not None and generation != session.cache.generation:
            return None  # not this job's entry, as far as memory knows: the leader decides
        key = tuple(scopes)
        hot = session.hot.get(key)
        if hot is not None and hot.blob is session.blob and time.time() < hot.good_until:
            return hot.access_token
        session.hot.pop(key, None)
        asked_at = time.time()  # before msal's own "now": the limits below err early
        result = self._silent(session, user, scopes, offline_only=True)
        if not result:
            return None
        return self._remember(session, key, result, asked_at)

    @staticmethod
    def _remember(session: UserSession, key: tuple[str, ...], result: dict[str, Any],
                  asked_at: float) -> str:
        """Keep ``result``'s token as the session's ``HotToken`` for ``key``, until msal
        would stop answering it from this cache: 5 minutes before it expires, or its
        ``refresh_on`` (``refresh_in`` in an answer from Entra ID), whichever is first.
        Only while the session holds a sealed blob: the memo is tied to that object."""
        token = str(result["access_token"])
        expires_in = result.get("expires_in")
        if session.blob is not None and isinstance(expires_in, int):
            good_until = asked_at + expires_in - MSAL_EXPIRY_MARGIN_SECONDS
            refresh_on = result.get("refresh_on")
            if isinstance(refresh_on, int | float):
                good_until = min(good_until, refresh_on)
            refresh_in = result.get("refresh_in")
            if isinstance(refresh_in, int | float):
                good_until = min(good_until, asked_at + refresh_in)
            session.hot[key] = HotToken(session.blob, key, token, good_until)
        return token

    def _from_entra(self, partition: str, user: EntraAccessToken, scopes: list[str],
                    claims_challenge: str | None, deadline: Deadline, budget: StoreBudget) -> tuple[str, str]:
        """The token and how it was served (``flask_obo.metrics``' outcomes)."""
        with self.memory.held(partition, deadline.remaining()) as session:
            session.hot.clear()  # whatever happens here, the old memo is not the answer
            if claims_challenge is None and session.is_current(self._store.coherence()):
                # The leader that held the session may have just filled it.
                result = self._silent(session, user, scopes, offline_only=True)
                if result:
                    return str(result["access_token"]), MEMORY_HIT
            mark = self._mark(session)  # before the lock, which reads the entry as it is taken
            with self._user_lock(partition, deadline, budget) as guard, within(deadline), \
                    _entra_unavailable_is_503():
                outcome = MEMORY_HIT
                if guard is not None:
                    with suppress(StoreUnavailable):  # another worker may have filled it
                        self._reload(session, partition, user, budget, (guard, mark))
                        outcome = CACHE_HIT
                generation = _generation(user)
                if generation is not None and generation != session.cache.generation and outcome != CACHE_HIT:
                    raise CacheUnavailable()  # a job's entry cannot be checked until Redis is back
                asked_at = time.time()
                # With no assertion (a job), the refresh token answers a claims challenge too.
                result = None if claims_challenge and user.raw else self._silent(
                    session, user, scopes, claims_challenge=claims_challenge)
                if result and result.get("token_source") == "identity_provider":
                    outcome = REFRESH  # msal redeemed the refresh token
                if not result and not user.raw:
                    log.warning("no usable refresh token for a background job of partition %s",
                                partition)
                    raise RefreshTokenExpired()
                if not result:
                    outcome = OBO
                    result = self._on_behalf_of(session, partition, user, scopes, claims_challenge)
                self._save_if_changed(session, partition, guard, budget)
                if isinstance(result.get("access_token"), str):  # the next request needs no msal
                    self._remember(session, tuple(scopes), result, asked_at)
        return _access_token_or_raise(result, partition), outcome

    def _on_behalf_of(self, session: UserSession, partition: str, user: EntraAccessToken,
                      scopes: list[str], claims_challenge: str | None) -> dict[str, Any]:
        """The OBO exchange; if Entra refuses the API's own credential (a rotated
        certificate, an expired assertion), read the credential again and retry once."""
        log.info("on-behalf-of exchange for partition %s", partition)
        result: dict[str, Any] = self._app(session, user).acquire_token_on_behalf_of(
            user.raw, scopes, claims_challenge=claims_challenge)
        codes = set(result.get("error_codes") or ())
        if codes & CREDENTIAL_ERROR_CODES and (
                self._credential.reload() or session.bench.credential_version != self._credential.version):
            log.warning("Entra ID refused the API's credential (%s); retrying with the reloaded one",
                        sorted(codes & CREDENTIAL_ERROR_CODES))
            result = self._app(session, user).acquire_token_on_behalf_of(
                user.raw, scopes, claims_challenge=claims_challenge)
        return result

    def forget(self, partition: str) -> bool:
        """Remove the user's cached tokens (sign-out): from the store, under the user's lock
        (after any acquisition in flight, so none writes them back), then from this
        worker's memory at once. Other workers drop their copies when the store reports
        the change. Was there an entry in the store?

        Raises the store's signals, for its caller to answer (``FlaskOBO.forget_user``: 503)
        or report (the token-cache CLI): ``StoreUnavailable`` when the store cannot be
        reached (nothing is removed then, here either) and ``LockBusy`` when the user's
        lock (this worker's session, or the store's) stays taken.
        """
        deadline = Deadline(self._settings.token_acquisition_timeout)
        session = self.memory.hold(partition, deadline.remaining())  # as a leader: session, then store
        if session is None:
            raise LockBusy()
        try:
            with self._store.lock(partition, deadline) as guard:
                removed = self._store.remove(partition, guard)
            session.forget()
        finally:
            self.memory.release(session)
        log.info("token cache removed for partition %s", partition)
        return removed

    def generation(self, user: EntraAccessToken) -> str:
        """The generation of ``user``'s cache entry, which a background handle names; an
        entry written before generations existed gets one now (saved under the user's
        lock). Call right after acquiring a token for the user, so that the entry exists.

        Raises ``RefreshTokenExpired`` when the user has no cached account (nothing a job
        could renew), ``TokenAcquisitionBusy`` when the user's session stays taken."""
        deadline = Deadline(self._settings.token_acquisition_timeout)
        budget = StoreBudget(self._settings.redis_timeout)
        partition = partition_key(user.oid, user.tid)
        with self.memory.held(partition, deadline.remaining()) as session:
            if not session.is_current(self._store.coherence()) and self._store.healthy:
                with suppress(StoreUnavailable):
                    self._reload(session, partition, user, budget)
            if session.cache.account_of(user.oid, user.tid) is None:
                raise RefreshTokenExpired()
            current = session.cache.generation
            if current is not None:
                return current
            mark = self._mark(session)
            with self._user_lock(partition, deadline, budget) as guard:
                if guard is not None:
                    with suppress(StoreUnavailable):
                        self._reload(session, partition, user, budget, (guard, mark))
                if session.cache.account_of(user.oid, user.tid) is None:  # signed out meanwhile
                    raise RefreshTokenExpired()
                generation = session.cache.stamp_generation()
                self._save_if_changed(session, partition, guard, budget)
            return generation

    @contextmanager
    def _user_lock(self, partition: str, deadline: Deadline, budget: StoreBudget) -> Iterator[Guard | None]:
        """The user's store lock; None (single flight per process only) while Redis is down,
        or once this request found it so (``budget``). A lock that stays taken until the
        deadline is the request's answer: ``TokenAcquisitionBusy`` (503)."""
        with ExitStack() as stack:
            started = time.perf_counter()
            try:
                with budget.call(timed=False):  # waiting for another holder is not waiting on Redis
                    guard: Guard | None = stack.enter_context(self._store.lock(partition, deadline))
            except LockBusy:  # waited until the deadline
                self._metrics.lock_wait(time.perf_counter() - started)
                raise TokenAcquisitionBusy() from None
            except StoreUnavailable:
                log.warning("acquiring for partition %s without the shared lock: the store is down",
                            partition)
                guard = None
            else:
                self._metrics.lock_wait(time.perf_counter() - started)
            yield guard

    def _silent(self, session: UserSession, user: EntraAccessToken, scopes: list[str],
                offline_only: bool = False, claims_challenge: str | None = None) -> dict[str, Any] | None:
        _admit(session, user)
        app = self._app(session, user)
        account = session.cache.account_of(user.oid, user.tid)
        if account is None:
            return None
        try:
            with offline() if offline_only else nullcontext():
                result: dict[str, Any] | None = app.acquire_token_silent(
                    scopes, account, claims_challenge=claims_challenge)
                return result
        except NetworkNeeded:  # expired or aging: renew with Entra ID
            return None
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            # is_msal_cache() admits only what msal reads; this catches what a future msal
            # might read differently, so such an entry is a miss, not a 500 that sticks.
            log.warning("msal could not read the token cache for a user (%s); it will be replaced",
                        type(exc).__name__)
            session.cache.load(None)
            session.cleared()
            return None

    def _app(self, session: UserSession, user: EntraAccessToken) -> msal.ConfidentialClientApplication:
        """The user's msal application, built again when the API's credential changed. A
        multi-tenant API exchanges tokens in the user's own tenant."""
        version = self._credential.version  # before for_msal(), which may find a rotated file:
        # then the next call builds again, never too few. A certificate's assertion is the
        # process's, for the token endpoint msal found for the application being built.
        built: list[msal.ConfidentialClientApplication] = []
        credential = self._credential.for_msal(lambda: str(built[0].authority.token_endpoint))
        bench, authority = session.bench, self._settings.authority_for(user.tid)
        if bench.app is None or bench.credential_version != self._credential.version \
                or bench.authority != authority:  # benches are lent to any user of any tenant
            try:
                bench.app = app = msal.ConfidentialClientApplication(
                    self._settings.client_id,
                    client_credential=credential,
                    authority=authority,
                    token_cache=bench.cache,
                    http_client=bench.http,
                    http_cache=bench.http_cache,
                    instance_discovery=False,
                    client_capabilities=list(self._settings.client_capabilities) or None,
                )
            except AuthorityUnavailable:
                raise IdentityProviderUnavailable() from None
            built.append(app)
            bench.credential_version, bench.authority = version, authority
        return bench.app

    def _mark(self, session: UserSession) -> ReadMark:
        coherence = self._store.coherence()
        return ReadMark(session.changes, coherence.epoch if coherence.connected else None,
                        self._store.losses)

    def _reload(self, session: UserSession, partition: str, user: EntraAccessToken,
                budget: StoreBudget, locked: tuple[Guard, ReadMark] | None = None) -> None:
        """Make ``session`` hold what the store holds (a no-op if the blob is unchanged).

        ``locked``: the user's lock, just taken, and where the session stood before taking
        it. The Redis store read the entry as it took the lock (``entry_under_lock``); that
        read is used, saving a round trip, if the session saw no invalidation, reconnection
        or loss since the mark; otherwise the entry is read again now.

        An entry that is not a usable msal cache of this user, whatever the reason, is a
        miss; the next acquisition replaces it. Raises ``StoreUnavailable``.
        """
        mark = self._mark(session)
        changes, epoch, losses = mark
        expired = session.expires_at is not None and time.monotonic() >= session.expires_at
        with budget.call():
            if locked is not None and locked[1] == mark:
                entry = entry_under_lock(self._store, partition, locked[0])
            else:
                entry = self._store.load(partition)
        current, held_blob = (entry.blob if entry else None), session.blob
        put_back = held_blob is not None and (
            (session.unsaved and current == session.stored)  # acquired while Redis was away
            or (current is None and losses > session.losses_seen  # Redis lost it: not a delete
                and not (session.changed_in_store or expired))
        )
        if put_back and held_blob:
            with budget.call():
                if self._store.save_unless_changed(partition, held_blob, current):
                    entry = StoredEntry(held_blob, None)
        blob = session.blob
        if entry is None or entry.blob != blob:
            usable = entry is not None and self._open(session, partition, user, entry.blob)
            if not usable:
                session.blank_cache().load(None)
            blob = entry.blob if entry and usable else None
        session.read(entry, blob, losses, changes, epoch)

    def _open(self, session: UserSession, partition: str, user: EntraAccessToken, blob: bytes) -> bool:
        serialized = self._codec.open(partition, blob)
        if serialized is None:
            return False  # the codec logged why
        if not session.blank_cache().load(serialized):  # replaces what the session held
            log.warning("token cache for partition %s is not an msal cache; it will be replaced",
                        partition)
            return False
        if not session.cache.belongs_to(user.oid, user.tid):
            log.warning("token cache for partition %s holds another account; it will be replaced",
                        partition)
            session.cache.load(None)
            return False
        return True

    def _save_if_changed(self, session: UserSession, partition: str, guard: Guard | None,
                         budget: StoreBudget) -> None:
        """Seal and store the session's cache if it changed: as the last write under the
        user's lock (``guard``), which it releases too (``save_and_unlock``); without the
        lock, only over the entry the session started from."""
        if not session.cache.has_state_changed:
            return
        blob = self._codec.seal(partition, session.cache.serialize())
        session.acquired(blob)
        try:
            with budget.call():
                if guard is None:  # acquired without the lock: Redis may be back by now
                    written = self._store.save_unless_changed(partition, blob, session.stored)
                else:
                    written = save_and_unlock(self._store, partition, blob, guard)
        except StoreUnavailable:
            written, lost = False, False
        else:
            lost = guard is not None and not written
        if written:
            session.saved(blob)
        elif lost:  # the lock expired and someone else's write won: reload before the next use
            session.outdated()
        else:  # unreachable, or (without the lock) another entry came meanwhile: the
            session.not_saved()  # write-back or the user's next reload decides
            self._write_back.wake()

    # --- the store's watcher ---------------------------------------------------------------------
    def invalidate(self, partitions: list[str] | None) -> None:
        self.memory.invalidate(partitions)

    def resync(self) -> None:
        """The store answers again: write back what was acquired while it was away (see
        ``MemoryTier.write_back``), off this thread."""
        self._write_back.wake()


def _generation(user: EntraAccessToken) -> str | None:
    return user.generation if isinstance(user, CachedUser) else None


def _admit(session: UserSession, user: EntraAccessToken) -> None:
    """A job's user is served only from the entry generation its handle names (callers
    make sure the session reflects the store, or Redis is down and it is what we have)."""
    generation = _generation(user)
    if generation is not None and generation != session.cache.generation:
        raise BackgroundHandleRevoked()


@contextmanager
def _entra_unavailable_is_503() -> Iterator[None]:
    try:
        yield
    except EntraUnavailable as exc:
        raise IdentityProviderUnavailable(retry_after=exc.retry_after) from None


def _access_token_or_raise(result: dict[str, Any], partition: str) -> str:
    if isinstance(result.get("access_token"), str):
        return str(result["access_token"])
    error = str(result.get("error", ""))
    codes = [c for c in result.get("error_codes") or [] if isinstance(c, int)]
    log.warning(
        "token request for partition %s failed: %s %s (correlation id %s)",
        partition, error, codes, result.get("correlation_id"),
    )
    claims = result.get("claims")
    if (error in ("interaction_required", "invalid_grant") and isinstance(claims, str)
            and InsufficientClaims.is_claims_json(claims)):
        raise InsufficientClaims(claims)
    if 65001 in codes or "consent_required" in (error, result.get("suberror")):
        raise ConsentRequired()
    if error == "interaction_required":
        raise InteractionRequired()
    if error == "invalid_grant":
        raise AssertionRejected()
    if error == "temporarily_unavailable":
        raise IdentityProviderUnavailable()
    raise TokenAcquisitionFailed()

