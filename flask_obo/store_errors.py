"""What a token cache store says when it cannot do what it was asked: plain exceptions.

They are the store's side of the ``TokenCacheStore`` protocol (``flask_obo.cache_store``),
raised by the stores here and by any other store, and they are not HTTP answers: the
callers decide what each means. A provider goes on without the store where it can (a
token acquired while Redis is down), and answers ``flask_obo.errors.CacheUnavailable`` or
``TokenAcquisitionBusy`` (503) only where a request cannot go on (a sign-out, a
background job's entry it cannot check); the token-cache CLI says so and exits 1.
"""

from __future__ import annotations


class StoreUnavailable(Exception):
    """The store cannot be reached: down, too slow, its circuit open, or this request's
    time for it spent (``StoreBudget``). Nothing was read or written."""


class LockBusy(Exception):
    """A partition's lock stayed taken until the caller's deadline (another process is
    acquiring that user's tokens), or was lost (it expired) before a write that needs it."""
