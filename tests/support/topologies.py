"""Redis topologies as real processes on loopback: a Cluster and a Sentinel group.

- :func:`redis_cluster` runs 3 primaries and 3 replicas (``--cluster-enabled yes``),
  joined by ``redis-cli --cluster create``; it yields a :class:`Cluster`.
- :func:`redis_sentinel` runs a primary, a replica (``--replicaof``) and 3 sentinels
  (``redis-server <conf> --sentinel``) watching the service ``mymaster``; it yields a
  :class:`SentinelGroup`.

Both bind 127.0.0.1 on free ports, keep configs and logs in a temp dir, wait for
readiness by polling (never a fixed sleep) within a start-up timeout, and on exit, even
on failure, stop every process they started and delete the temp dir. Node timeouts are
about a second, so a killed primary is replaced within seconds.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from tests.support.servers import require_binary

LOOPBACK = "127.0.0.1"
SLOTS = 16384
SERVICE_NAME = "mymaster"
CLUSTER_NODE_TIMEOUT_MS = 1000
SENTINEL_DOWN_AFTER_MS = 1000
SENTINEL_FAILOVER_TIMEOUT_MS = 3000
POLL_SECONDS = 0.05


# --- processes ------------------------------------------------------------------------------------


@dataclass
class RedisNode:
    """One redis-server (data node or sentinel) started by this module."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path
    password: str | None = None  # what clients send (None for sentinels)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain client of this node alone (text answers, short timeouts)."""
        options: dict[str, object] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0,
                                      "decode_responses": True, **kwargs}
        return redis.Redis(host=LOOPBACK, port=self.port, password=self.password, **options)

    def command(self, *args: str) -> Any:
        """One command on a fresh connection, its answer unparsed by redis-py (text)."""
        connection = redis.Connection(host=LOOPBACK, port=self.port, password=self.password,
                                      socket_timeout=1.0, socket_connect_timeout=1.0,
                                      decode_responses=True, protocol=2)
        try:
            connection.send_command(*args)
            return connection.read_response()
        finally:
            connection.disconnect()

    def info(self, section: str) -> dict[str, str]:
        """``INFO <section>`` as text fields (raises if the node does not answer)."""
        return _fields(self.command("INFO", section))

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last words to the others (a crash, a pulled plug)."""
        if self.alive:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def log_tail(self, chars: int = 1500) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def _fields(text: str) -> dict[str, str]:
    """``name:value`` lines (INFO, CLUSTER INFO) as a dict."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all bound at once, then released)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]


class ProcessExited(RuntimeError):
    """A process that should be running has exited: no use polling it further."""


def _poll(check: Callable[[], bool], deadline: float, what: str,
          diagnostics: Callable[[], str] = lambda: "") -> None:
    """Poll ``check`` (exceptions count as "not yet", except :class:`ProcessExited`) until
    it is true or ``deadline`` (a ``time.monotonic()`` instant) passes; then TimeoutError
    with ``diagnostics()``."""
    last_error: Exception | None = None
    while True:
        try:
            if check():
                return
        except ProcessExited as exc:
            raise ProcessExited(f"{what}: {exc}\n{diagnostics()}") from None
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"{what}: not within the time allowed{detail}\n{diagnostics()}")
        time.sleep(POLL_SECONDS)


class _Processes:
    """Starts redis-server processes in one temp dir; ``close()`` stops them all."""

    def __init__(self, prefix: str) -> None:
        self.binary = require_binary("redis-server")
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.nodes: list[RedisNode] = []

    def start(self, name: str, args: list[str], port: int, deadline: float,
              password: str | None = None) -> RedisNode:
        """Start ``redis-server <args>`` and wait until it answers PING."""
        log = self.dir / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([self.binary, *args], cwd=self.dir, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        node = RedisNode(port, process, log, password)
        self.nodes.append(node)

        def answers() -> bool:
            if not node.alive:
                raise ProcessExited(f"{name} exited with {node.process.returncode}")
            return node.command("PING") == "PONG"  # one try per poll: a bare connection never retries

        _poll(answers, deadline, f"{name} on port {port}", node.log_tail)
        return node

    def close(self) -> None:
        for node in self.nodes:
            if node.alive:
                node.process.terminate()
        for node in self.nodes:
            try:
                node.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


def _common_args(port: int, workdir: Path, password: str | None) -> list[str]:
    args = ["--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--daemonize", "no", "--logfile", "",
            "--repl-diskless-sync-delay", "0"]  # replicas sync at once, not after 5 s
    if password:
        args += ["--requirepass", password, "--masterauth", password]
    return args


# --- Redis Cluster ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterView:
    """One line of ``CLUSTER NODES``: a node as another node sees it."""

    node_id: str
    address: str
    flags: frozenset[str]
    primary_id: str | None
    slots: frozenset[int]

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool({"fail", "fail?", "handshake", "noaddr"} & self.flags)


def _parse_cluster_nodes(text: str) -> list[ClusterView]:
    views = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        slots: set[int] = set()
        for item in parts[8:]:
            if item.startswith("["):  # a slot being imported or migrated
                continue
            first, _, last = item.partition("-")
            slots.update(range(int(first), int(last or first) + 1))
        views.append(ClusterView(
            node_id=parts[0],
            address=parts[1].split("@", 1)[0],
            flags=frozenset(parts[2].split(",")),
            primary_id=None if parts[3] == "-" else parts[3],
            slots=frozenset(slots),
        ))
    return views


@dataclass
class Cluster:
    """A running Redis Cluster: its nodes and helpers to find, kill and replace primaries."""

    nodes: list[RedisNode]
    password: str | None = None
    _slots_at_kill: dict[str, frozenset[int]] = field(default_factory=dict)

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis://[:pw@]127.0.0.1:<port>/0`` of the first node still running."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.live_nodes()[0].address}/0"

    def live_nodes(self) -> list[RedisNode]:
        return [node for node in self.nodes if node.alive]

    def node(self, address: str) -> RedisNode:
        return next(node for node in self.nodes if node.address == address)

    def client(self, **kwargs: object) -> redis.RedisCluster:
        """redis-py's cluster client, started from any live node."""
        node = self.live_nodes()[0]
        options: dict[str, object] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0, **kwargs}
        return redis.RedisCluster(host=LOOPBACK, port=node.port, password=self.password, **options)

    def view(self, of: RedisNode | None = None) -> list[ClusterView]:
        """``CLUSTER NODES`` as ``of`` (default: any live node) sees the cluster."""
        node = of or self.live_nodes()[0]
        return _parse_cluster_nodes(node.command("CLUSTER", "NODES"))

    def cluster_info(self, node: RedisNode) -> dict[str, str]:
        return _fields(node.command("CLUSTER", "INFO"))

    def primaries(self) -> list[RedisNode]:
        """Live primaries that serve slots, as a live node sees them."""
        return [self.node(v.address) for v in self.view() if v.is_primary and v.slots and not v.failed]

    def primary_for_slot(self, slot: int) -> RedisNode:
        for view in self.view():
            if view.is_primary and not view.failed and slot in view.slots:
                return self.node(view.address)
        raise LookupError(f"no live primary serves slot {slot}")

    def primary_for_key(self, key: str | bytes) -> RedisNode:
        """The primary that serves ``key``'s hash slot now."""
        return self.primary_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def replica_of(self, primary: RedisNode) -> RedisNode:
        views = self.view()
        primary_id = next(v.node_id for v in views if v.address == primary.address)
        return next(self.node(v.address) for v in views if v.primary_id == primary_id and not v.failed)

    def on_replica(self, key: str) -> bool:
        """Has ``key`` reached the replica of the primary that serves it?"""
        replica = self.replica_of(self.primary_for_key(key))
        with closing(replica.client(single_connection_client=True)) as client:
            client.execute_command("READONLY")  # a replica serves reads of its primary's slots
            return bool(client.exists(key))

    def kill(self, node: RedisNode) -> None:
        """SIGKILL ``node`` (remembering the slots it served, for :meth:`wait_failover`)."""
        served = next((v.slots for v in self.view() if v.address == node.address), frozenset())
        self._slots_at_kill[node.address] = served
        node.kill()

    def wait_failover(self, old_primary: RedisNode, timeout: float = 20.0) -> RedisNode:
        """Wait until a replica took over ``old_primary``'s slots and every live node says
        ``cluster_state:ok`` and agrees on it; returns the new primary."""
        slots = self._slots_at_kill.get(old_primary.address) or next(
            v.slots for v in self.view() if v.address == old_primary.address)
        sample = min(slots)
        promoted: list[RedisNode] = []

        def failed_over() -> bool:
            owners = set()
            for node in self.live_nodes():
                if self.cluster_info(node).get("cluster_state") != "ok":
                    return False
                owner = next((v for v in self.view(node) if v.is_primary and sample in v.slots), None)
                if owner is None or owner.failed or owner.address == old_primary.address:
                    return False
                owners.add(owner.address)
            if len(owners) != 1:
                return False
            new = self.node(owners.pop())
            if not new.alive or new.info("replication").get("role") != "master":
                return False
            promoted[:] = [new]
            return True

        _poll(failed_over, time.monotonic() + timeout, f"failover of {old_primary.address}",
              lambda: self._diagnostics())
        return promoted[0]

    def wait_ready(self, deadline: float, primaries: int, replicas: int) -> None:
        """Every slot served, ``cluster_state:ok`` everywhere, each replica in sync."""

        def ready() -> bool:
            for node in self.live_nodes():
                info = self.cluster_info(node)
                if (info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS)
                        or info.get("cluster_known_nodes") != str(len(self.nodes))):
                    return False
            views = self.view()
            serving = [v for v in views if v.is_primary and v.slots]
            if len(serving) != primaries or sum(len(v.slots) for v in serving) != SLOTS:
                return False
            followers = [v for v in views if v.primary_id]
            if len(followers) != primaries * replicas:
                return False
            return all(self.node(v.address).info("replication").get("master_link_status") == "up"
                       for v in followers)

        _poll(ready, deadline, "redis cluster ready", lambda: self._diagnostics())

    def _diagnostics(self) -> str:
        lines = []
        for node in self.nodes:
            lines.append(f"--- {node.address} ({'alive' if node.alive else 'dead'}) log tail:")
            lines.append(node.log_tail(600))
        return "\n".join(lines)


@contextmanager
def redis_cluster(primaries: int = 3, replicas: int = 1, password: str | None = None,
                  start_timeout: float = 30.0) -> Iterator[Cluster]:
    """A Redis Cluster of ``primaries`` x (1 + ``replicas``) nodes on loopback."""
    deadline = time.monotonic() + start_timeout
    cli = require_binary("redis-cli")
    processes = _Processes("flask-obo-cluster-")
    try:
        count = primaries * (1 + replicas)
        ports = _free_ports(2 * count)  # a client port and a cluster bus port per node
        nodes = []
        for index in range(count):
            port, bus = ports[2 * index], ports[2 * index + 1]
            args = [*_common_args(port, processes.dir, password), "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf", "--cluster-port", str(bus),
                    "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS)]
            nodes.append(processes.start(f"node-{port}", args, port, deadline, password))
        cluster = Cluster(nodes, password)
        create = [cli, "--cluster", "create", *cluster.addresses, "--cluster-replicas", str(replicas),
                  "--cluster-yes"] + (["-a", password, "--no-auth-warning"] if password else [])
        result = subprocess.run(create, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                timeout=max(deadline - time.monotonic(), 1.0), check=False)
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{result.stdout}\n{result.stderr}")
        cluster.wait_ready(deadline, primaries, replicas)
        yield cluster
    finally:
        processes.close()


# --- Sentinel -------------------------------------------------------------------------------------------


@dataclass
class SentinelGroup:
    """A primary, its replica and the sentinels that watch them as ``service_name``."""

    master: RedisNode  # the primary at start (after a failover: see ``wait_promoted``)
    replica: RedisNode
    sentinels: list[RedisNode]
    password: str | None = None
    service_name: str = SERVICE_NAME

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(LOOPBACK, node.port) for node in self.sentinels]

    @property
    def redis_sentinels(self) -> str:
        """The value for ``REDIS_SENTINELS``: ``host:port,host:port,...``."""
        return ",".join(node.address for node in self.sentinels)

    @property
    def url(self) -> str:
        """The value for ``REDIS_URL``: ``redis://[:pw@]<service>/0``."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.service_name}/0"

    def sentinel(self, **kwargs: object) -> redis.Sentinel:
        """redis-py's Sentinel over these sentinels (the password is the data nodes')."""
        options: dict[str, object] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0, **kwargs}
        return redis.Sentinel(self.sentinel_addresses, password=self.password, **options)

    def master_client(self, **kwargs: object) -> redis.Redis:
        return self.sentinel(**kwargs).master_for(self.service_name)

    def reported_masters(self) -> dict[str, str | None]:
        """What each live sentinel names as the master's address (None: no answer)."""
        reported: dict[str, str | None] = {}
        for node in self.sentinels:
            if not node.alive:
                continue
            try:
                host, port = node.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
                reported[node.address] = f"{host}:{port}"
            except (redis.RedisError, TypeError, ValueError):
                reported[node.address] = None
        return reported

    def on_replica(self, key: str) -> bool:
        """Has ``key`` reached the replica?"""
        with closing(self.replica.client()) as client:
            return bool(client.exists(key))

    def kill_master(self) -> None:
        """SIGKILL the primary."""
        self.master.kill()

    def wait_promoted(self, timeout: float = 30.0) -> RedisNode:
        """Wait until every sentinel reports the replica as master and it says
        ``role:master``; returns it."""

        def promoted() -> bool:
            reported = set(self.reported_masters().values())
            return (reported == {self.replica.address}
                    and self.replica.info("replication").get("role") == "master")

        _poll(promoted, time.monotonic() + timeout, f"promotion of {self.replica.address}",
              self._diagnostics)
        return self.replica

    def wait_ready(self, deadline: float) -> None:
        """The replica in sync, and every sentinel knows the master, the replica and the
        other sentinels, with quorum and failover authorisation reachable."""

        def ready() -> bool:
            if self.replica.info("replication").get("master_link_status") != "up":
                return False
            for node in self.sentinels:
                quorum = node.command("SENTINEL", "CKQUORUM", self.service_name)
                if not str(quorum).startswith(f"OK {len(self.sentinels)} usable"):
                    return False
                replicas = node.command("SENTINEL", "REPLICAS", self.service_name)
                known = [dict(zip(r[::2], r[1::2], strict=True)) for r in replicas]
                if not any(f"{r.get('ip')}:{r.get('port')}" == self.replica.address
                           and r.get("flags") == "slave" for r in known):
                    return False
            return set(self.reported_masters().values()) == {self.master.address}

        _poll(ready, deadline, "redis sentinel ready", self._diagnostics)

    def _diagnostics(self) -> str:
        lines = [f"sentinels report: {self.reported_masters()}"]
        for node in [self.master, self.replica, *self.sentinels]:
            lines.append(f"--- {node.address} ({'alive' if node.alive else 'dead'}) log tail:")
            lines.append(node.log_tail(600))
        return "\n".join(lines)


def _sentinel_conf(port: int, workdir: Path, master_port: int, password: str | None) -> str:
    lines = [
        f"port {port}",
        f"bind {LOOPBACK}",
        "daemonize no",
        'logfile ""',
        f"dir {workdir}",
        f"sentinel monitor {SERVICE_NAME} {LOOPBACK} {master_port} 2",
        f"sentinel down-after-milliseconds {SERVICE_NAME} {SENTINEL_DOWN_AFTER_MS}",
        f"sentinel failover-timeout {SERVICE_NAME} {SENTINEL_FAILOVER_TIMEOUT_MS}",
        f"sentinel parallel-syncs {SERVICE_NAME} 1",
    ]
    if password:
        lines.append(f"sentinel auth-pass {SERVICE_NAME} {password}")
    return "\n".join(lines) + "\n"


@contextmanager
def redis_sentinel(password: str | None = None, sentinels: int = 3,
                   start_timeout: float = 30.0) -> Iterator[SentinelGroup]:
    """A primary, a replica and ``sentinels`` sentinels (quorum 2) on loopback."""
    deadline = time.monotonic() + start_timeout
    processes = _Processes("flask-obo-sentinel-")
    try:
        master_port, replica_port, *sentinel_ports = _free_ports(2 + sentinels)
        master = processes.start("master", _common_args(master_port, processes.dir, password),
                                 master_port, deadline, password)
        replica_args = [*_common_args(replica_port, processes.dir, password),
                        "--replicaof", LOOPBACK, str(master_port)]
        replica = processes.start("replica", replica_args, replica_port, deadline, password)
        watchers = []
        for port in sentinel_ports:
            conf = processes.dir / f"sentinel-{port}.conf"  # sentinels rewrite it: a file of their own
            conf.write_text(_sentinel_conf(port, processes.dir, master_port, password))
            watchers.append(processes.start(f"sentinel-{port}", [str(conf), "--sentinel"], port, deadline))
        group = SentinelGroup(master, replica, watchers, password)
        group.wait_ready(deadline)
        yield group
    finally:
        processes.close()

