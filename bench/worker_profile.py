"""Where gunicorn workers spend their CPU under the serving benchmark's load, by py-spy:

    python bench/worker_profile.py              CPU ms per request and py-spy's top functions
                                                for bare, obo 50, obo 4000, healthz, whoami

bench/serving_bench.py's parts (redis-server, the dev tenant, the shipped gunicorn config,
its keep-alive load clients), fewer series: the bare app and flask-obo with ``--users``
users. Each series runs ``--rounds`` rounds of ``--requests``, interleaved, with the API
workers' CPU per request from /proc; then, once more per series, py-spy samples every
worker for the length of a round (``--nonblocking``, idle threads left out: CPU, not
waiting) and the functions that were on CPU most (self and total) are printed, so the
series can be compared function by function. Needs redis-server and py-spy
(``pip install py-spy``; it reads other processes' memory: root, or ptrace allowed).

Knobs: --users (4000), --requests (a round, 4000), --rounds (3), --top (30), --rate
(py-spy samples a second, 200), --series (repeatable; default all), --keep DIR (py-spy's
raw stacks, collapsed format, one file per series and worker).
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from cryptography.fernet import Fernet

from bench import devtenant_users
from bench import serving_bench as sb
from tests.support.servers import redis_server

FEW_USERS = 50


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("worker_profile needs py-spy: pip install py-spy")
    return found


def record(pids: list[int], seconds: float, rate: int, out_dir: Path, name: str) -> list[Path]:
    """py-spy's collapsed stacks of each of ``pids`` for ``seconds``, sampled ``rate``/s."""
    outs = []
    procs = []
    for pid in pids:
        out = out_dir / f"{name.replace(' ', '_')}-{pid}.txt"
        outs.append(out)
        procs.append(subprocess.Popen(
            [py_spy(), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
             "--rate", str(rate), "--format", "raw", "--nonblocking", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for proc in procs:
        proc.wait(timeout=seconds + 60)
    return outs


def summarise(files: list[Path], requests: int, top: int) -> str:
    """Samples per request by function, self and total (each stack counts a function once)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for path in files:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():  # a frame's name that spans lines (a repr)
                continue
            n = int(count)
            frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
            samples += n
            if frames:
                own[_short(frames[-1])] += n
            for frame in {_short(f) for f in frames}:
                total[frame] += n
    lines = [f"  {samples} samples"]
    lines.append(f"  {'self':>6} {'total':>6}  function (share of all samples)")
    for frame, n in own.most_common(top):
        lines.append(f"  {n / samples:6.1%} {total[frame] / samples:6.1%}  {frame}")
    lines.append("  -- by total --")
    for frame, n in total.most_common(top):
        lines.append(f"  {own[frame] / samples:6.1%} {n / samples:6.1%}  {frame}")
    return "\n".join(lines)


def syscalls(pids: list[int], run: Callable[[], sb.Round], top: int) -> str:
    """The system calls ``pids`` (every thread) make while ``run`` runs one round, per request."""
    tracers = [subprocess.Popen(["strace", "-c", "-f", "-p", str(pid)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for pid in pids]
    time.sleep(1.0)  # attached (strace says so on stderr only after the fact)
    done = run().requests
    counts: collections.Counter[str] = collections.Counter()
    for tracer in tracers:
        tracer.send_signal(signal.SIGINT)
        _, err = tracer.communicate(timeout=60)
        for line in err.splitlines():
            cols = line.split()
            if len(cols) >= 5 and cols[0].replace(".", "").isdigit() and cols[-1] != "total":
                counts[cols[-1]] += int(cols[3])
    lines = [f"  {sum(counts.values()) / done:7.2f}  all ({done} requests)"]
    lines += [f"  {n / done:7.2f}  {name}" for name, n in counts.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """``function (path:line)`` as ``function (package/module.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "python3.11/", "perf-warm2/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--series", action="append", default=[])
    parser.add_argument("--keep", type=Path)
    parser.add_argument("--no-spy", action="store_true", help="CPU per request only")
    parser.add_argument("--timeline", type=float, default=0,
                        help="minutes of obo 50 / obo N rounds after warming, each printed with the "
                             "time since the warm-up (what changes as the warm-up ages)")
    parser.add_argument("--strace", action="store_true",
                        help="also count each series' system calls per request (strace -c -f)")
    args = parser.parse_args()
    users = max(args.users, FEW_USERS)
    config = sb.runpy.run_path(str(sb.ROOT / "config/gunicorn.conf.py"))
    workers = int(config["workers"])
    devtenant_users.install(users)
    fork = multiprocessing.get_context("fork")
    scratch = Path(tempfile.mkdtemp(prefix="flask-obo-worker-profile-"))
    out_dir = args.keep or scratch / "spy"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with redis_server() as redis_url, sb.dev_tenant(scratch, users) as (tenant, tenant_pids):
            with fork.Pool(sb.CLIENTS) as minting:
                tokens = minting.starmap(sb._mint, [(i, str(scratch), tenant.authority_host)
                                                    for i in range(users)])
            graph_token = sb.obo_graph_token(tenant, tokens[0])
            base_env = {k: v for k, v in os.environ.items()
                        if not k.startswith(("AZURE_", "GRAPH_", "TOKEN_CACHE", "TOKEN_MEMORY", "REDIS_",
                                             "GUNICORN_"))}
            base_env.update(tenant.env(), LOG_LEVEL="warning")
            obo_env = {**base_env, "REDIS_URL": redis_url,
                       "TOKEN_CACHE_KEYS": Fernet.generate_key().decode(),
                       "AUTHORITY_CACHE_DIR": str(scratch / "authority")}
            bare_env = {**base_env, "BENCH_GRAPH_TOKEN": graph_token}
            r = redis.Redis.from_url(redis_url)
            start = fork.Barrier(sb.CLIENTS + 1)
            with sb.gunicorn("wsgi:app", obo_env, workers) as obo, \
                    sb.gunicorn("bench.bare_app:app", bare_env, workers) as bare, \
                    fork.Pool(sb.CLIENTS, initializer=sb._client_init, initargs=(tokens, start)) as pool:
                few, many = list(range(FEW_USERS)), list(range(users))
                print(f"warming: {sb.warm_passes(obo, tokens, range(users), r)[0]}", flush=True)
                series = {
                    "bare": (bare, few, "/api/me"),
                    "obo 50": (obo, few, "/api/me"),
                    f"obo {users}": (obo, many, "/api/me"),
                    "healthz": (obo, few, "/healthz"),
                    "whoami": (obo, few, "/api/whoami"),
                }
                if args.series:
                    series = {k: v for k, v in series.items() if k in args.series}

                def load(name: str, seed: int) -> sb.Round:
                    server, who, path = series[name]
                    watched = {"API": server.workers, "dev tenant": tenant_pids}
                    return sb.load_round(pool, start, server, who, args.requests, watched, seed, path)

                warmed_at = time.monotonic()
                for name in series:  # settle
                    load(name, -1)
                k = 0
                while time.monotonic() - warmed_at < args.timeline * 60:
                    for name in ("obo 50", f"obo {users}"):
                        x = load(name, k)
                        print(f"  {(time.monotonic() - warmed_at) / 60:5.1f} min after warming  {name:<10}"
                              f"{x.cpu_ms['API']:7.3f} ms API CPU a request", flush=True)
                    k += 1
                rounds: dict[str, list[sb.Round]] = {name: [] for name in series}
                names = list(series)
                for k in range(args.rounds):
                    for name in names[k % len(names):] + names[:k % len(names)]:
                        rounds[name].append(load(name, k))
                print(f"\nAPI CPU ms per request through gunicorn (median of {args.rounds} rounds of "
                      f"{args.requests}; each round's), req/s median")
                for name, rs in rounds.items():
                    cpu = [x.cpu_ms["API"] for x in rs]
                    print(f"  {name:<10}{statistics.median(cpu):>7.3f}  [{' '.join(f'{c:.3f}' for c in cpu)}]"
                          f"  {statistics.median(x.rps for x in rs):>6.0f} req/s", flush=True)
                if args.strace:
                    for name in series:
                        print(f"\n--- strace: {name}, system calls per request ---")
                        print(syscalls(series[name][0].workers, lambda n=name: load(n, 98), args.top),
                              flush=True)
                if args.no_spy:
                    return 0
                for name in series:
                    server = series[name][0]
                    # A round in a thread, py-spy on every worker meanwhile; then what it saw.
                    box: list[sb.Round] = []
                    runner = threading.Thread(target=lambda n=name, b=box: b.append(load(n, 99)))
                    runner.start()
                    time.sleep(0.5)  # the clients connect; sampling then covers the load
                    seconds = statistics.median(x.seconds for x in rounds[name]) * 0.8
                    files = record(server.workers, seconds, args.rate, out_dir, name)
                    runner.join()
                    print(f"\n--- py-spy: {name}, {seconds:.1f} s of a round of {args.requests} ---")
                    print(summarise(files, args.requests, args.top), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
