"""The Redis topologies the token cache runs on, from the settings:

* ``REDIS_URL`` alone: one Redis (``redis://`` or ``rediss://``; a private CA with
  redis-py's own ``?ssl_ca_certs=/path``).
* ``REDIS_CLUSTER=true``: ``REDIS_URL`` names any node of a Redis Cluster.
* ``REDIS_SENTINELS=host:port,…``: Sentinel; the host part of ``REDIS_URL`` names the
  master service (``redis://:password@mymaster/0``) and its password, database and scheme
  apply to the master, as in django-redis.

Also here: where invalidation listeners connect. One Redis or Sentinel's master needs
one; a cluster needs one per primary, since each primary reports only its own keys.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import AbstractConnection, ConnectionPool, SSLConnection, parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel

from .invalidation import InvalidateKeys, InvalidationListener, ThreadPerProcess
from .settings import Settings

log = logging.getLogger(__name__)

RedisClient = redis.Redis | RedisCluster
CLUSTER_RECHECK_SECONDS = 1.0


def redis_client(settings: Settings) -> RedisClient:
    assert settings.redis_url is not None
    timeouts: dict[str, Any] = {
        "socket_timeout": settings.redis_timeout,
        "socket_connect_timeout": settings.redis_timeout,
        "protocol": 2,
    }
    if settings.redis_cluster:
        # One retry (a MOVED after a failover), no backoff: the breaker, not the client,
        # decides how long to keep trying; redis-py's default is ten with backoff.
        return RedisCluster.from_url(settings.redis_url, retry=Retry(NoBackoff(), 1), **timeouts)
    if settings.redis_sentinels:
        return _sentinel_master(settings, timeouts)
    return redis.Redis.from_url(settings.redis_url, health_check_interval=30, **timeouts)


def _sentinel_master(settings: Settings, timeouts: dict[str, Any]) -> redis.Redis:
    assert settings.redis_url is not None
    master = parse_url(settings.redis_url)
    service = master.pop("host")
    master.pop("port", None)
    if master.pop("connection_class", None) is SSLConnection:
        master["ssl"] = True
    sentinel_kwargs = {**timeouts}
    if settings.redis_sentinel_password:
        sentinel_kwargs["password"] = settings.redis_sentinel_password
    sentinel = Sentinel(list(settings.redis_sentinels), sentinel_kwargs=sentinel_kwargs, **timeouts)
    master_client: redis.Redis = sentinel.master_for(service, **master)
    return master_client


def listener_connection(pool: ConnectionPool) -> AbstractConnection:
    """A fresh connection like the pool's, for a subscriber: RESP2 (for the redirect), and
    no health checks, since redis-py's check expects a ``PONG`` a subscribed connection
    never sends (the listener pings on its own)."""
    kwargs = {**pool.connection_kwargs, "protocol": 2, "health_check_interval": 0}
    return pool.connection_class(**kwargs)  # type: ignore[no-any-return]


def invalidation_for(client: RedisClient, prefix: str, on_keys: InvalidateKeys,
                     on_resync: Callable[[], None], on_lost_data: Callable[[], None],
                     on_unreachable: Callable[[], None], on_alive: Callable[[], None],
                     pong_timeout: float) -> Any:
    """An object with ``connected``, ``epoch`` and ``ensure_running()`` for ``client``."""
    callbacks = (on_keys, on_resync, on_lost_data, on_unreachable, on_alive)
    if isinstance(client, RedisCluster):
        return ClusterInvalidation(client, prefix, callbacks, pong_timeout)
    return InvalidationListener(lambda: listener_connection(client.connection_pool), prefix,
                                *callbacks, pong_timeout)


class ClusterInvalidation:
    """A listener per primary of a cluster. Copies are trusted only while every one of
    them is connected; ``epoch`` moves whenever any of them reconnects or the set of
    primaries changes (a failover), so nothing verified before such a moment stays so.

    A supervisor thread (started lazily, like the listeners, and again after a fork)
    re-reads the cluster's primaries once a second while a listener is down, off the
    request path.
    """

    def __init__(self, cluster: RedisCluster, prefix: str, callbacks: tuple[Any, ...],
                 pong_timeout: float) -> None:
        self._cluster = cluster
        self._on_lost_data = callbacks[2]
        self._args = (prefix, *callbacks, pong_timeout)
        self._listeners: dict[str, InvalidationListener] = {}
        self._generation = 0
        self._stopped = threading.Event()
        self._thread = ThreadPerProcess(self._supervise, "flask-obo-cluster-invalidation")

    @property
    def connected(self) -> bool:
        listeners = list(self._listeners.values())
        return bool(listeners) and all(listener.connected for listener in listeners)

    @property
    def epoch(self) -> int:
        return self._generation + sum(listener.epoch for listener in list(self._listeners.values()))

    def ensure_running(self) -> None:
        self._thread.ensure_running()  # the supervisor starts the listeners

    def stop(self) -> None:
        """End the supervisor and every listener (their threads exit within a second)."""
        self._stopped.set()
        for listener in list(self._listeners.values()):
            listener.stop()

    def _supervise(self) -> None:
        self._listeners = {}  # in a forked child, the parent's listeners have no threads
        refresh = False
        while not self._stopped.is_set():
            try:
                self._reconcile(refresh)
            except Exception as exc:  # the thread must outlive any failure
                log.warning("token cache invalidation: cannot read the cluster's primaries: %s",
                            type(exc).__name__)
            if self._stopped.wait(CLUSTER_RECHECK_SECONDS):
                break
            refresh = not self.connected
        for listener in list(self._listeners.values()):
            listener.stop()

    def _reconcile(self, refresh: bool) -> None:
        """Listen to exactly the current primaries."""
        if refresh:
            self._cluster.nodes_manager.initialize()
        primaries = {node.name: node for node in self._cluster.get_primaries()}
        gone = [name for name in self._listeners if name not in primaries]
        new = [name for name in primaries if name not in self._listeners]
        if not gone and not new:
            return
        if gone and self._listeners:
            self._on_lost_data()  # a failover: what the old primary had not replicated is lost
        listeners = dict(self._listeners)
        for name in gone:
            listeners.pop(name).stop()
        for name in new:
            pool = primaries[name].redis_connection.connection_pool
            listeners[name] = InvalidationListener(partial(listener_connection, pool), *self._args)
            listeners[name].ensure_running()
        self._generation += 1 + sum(listener.epoch for listener in self._listeners.values())
        self._listeners = listeners
        log.info("token cache invalidation: listening to %d cluster primaries", len(listeners))
