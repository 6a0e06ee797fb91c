"""What the worker processes of one server share of their dependencies.

A recycled worker (gunicorn's ``max_requests``, a crash, a reload) starts with nothing: it
has not seen Entra ID answer, so it gives its first exchanges ``PATIENCE_PRIOR`` before
their waiters need seats, and it has not seen Redis fail, so its first requests each wait
a Redis timeout when Redis hangs. Its siblings know better. ``share_across_workers()``,
called in the server's master before it forks, puts Entra ID's observed pace
(``EntraPace``) and Redis's health (``Health``) in memory every worker maps
(``flask_obo.shared_memory``); each ``FlaskOBO`` application a worker creates afterwards
reads and writes them there.
"""

from __future__ import annotations

from .breaker import Health
from .bulkhead import EntraPace

_pace: EntraPace | None = None
_redis_health: Health | None = None


def share_across_workers() -> None:
    """Let the worker processes this process forks from now on share what they observe of
    Entra ID (its pace, its last answer) and of Redis (its last failure, answer and
    circuit opening).

    Call it in a server's master before it forks its workers (gunicorn: the
    ``on_starting`` hook, as ``config/gunicorn.conf.py`` does). A worker forked while
    Entra ID hangs then holds its threads no longer than its siblings' patience (at most
    ``PATIENCE_CAP``), and one forked while Redis hangs goes on without Redis at once,
    its circuit open, rather than wait a timeout for each first request; a running
    worker's circuit opens as soon as a sibling's does. Without it each
    worker learns on its own. Idempotent.

    What is shared is one Entra ID and one Redis per server: every ``FlaskOBO``
    application of the workers uses them. A server whose applications use different
    Redis servers for their token caches should not call it (one Redis's outage would
    open the others' circuits in new workers, until their first probe).
    """
    global _pace, _redis_health
    if _pace is None:
        _pace = EntraPace(shared=True)
    if _redis_health is None:
        _redis_health = Health(shared=True)


def entra_pace() -> EntraPace:
    """The pace a new waiting room follows: the shared one, or a new one of its own."""
    return _pace if _pace is not None else EntraPace()


def redis_health() -> Health:
    """The health a new Redis store's breaker records: the shared one, or its own."""
    return _redis_health if _redis_health is not None else Health()
