"""A login wave against a healthy but unhurried Entra ID, at full size (not in ``make bench``).

``python bench/entra_pace.py [--users 4000] [--clients 16] [--token-seconds 0.1 0.3]``

Real processes on loopback, as in ``tests/faults``: redis-server, the dev tenant with
``--users`` synthetic users whose token endpoint answers in ``--token-seconds`` (a random
time between the two), and the API under the shipped gunicorn config (2 workers x 8
threads, ENTRA_MAX_WAITING_THREADS=4). Each user sends one first request to ``/api/me``
from one of ``--clients`` concurrent clients. Prints the statuses, the latencies and the
token-endpoint calls; exits 1 unless every request got 200. Bounded: ``--timeout`` in all.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtenant.directory import load_user_name, write_load_users  # noqa: E402
from tests.support.faults import Call, Sample, summary  # noqa: E402
from tests.support.servers import redis_server  # noqa: E402
from tests.support.stack import api_env, devtenant, gunicorn  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--token-seconds", type=float, nargs=2, default=(0.1, 0.3))
    parser.add_argument("--timeout", type=float, default=1800.0, help="the whole wave's bound (s)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="entra-pace-") as tmp:
        state = Path(tmp) / "devtenant"
        state.mkdir()
        write_load_users(state, args.users)
        with redis_server() as redis_url, devtenant(state) as tenant:
            tenant.request("POST", "/_devtenant/latency",
                           json={"token_seconds": list(args.token_seconds)}).raise_for_status()
            env = api_env(tenant, redis_url, ENTRA_MAX_WAITING_THREADS="4")
            with gunicorn(env, workers=2, threads=8) as api:
                print(f"minting {args.users} users' API tokens...", flush=True)
                minter = tenant.tenant  # one: each .tenant reads the directory anew
                calls = [Call("first", "/api/me", minter.api_token(load_user_name(n)))
                         for n in range(1, args.users + 1)]
                tenant.reset_counters()
                started = time.monotonic()
                samples = wave(api.url, calls, args.clients, started + args.timeout)
                took = time.monotonic() - started
                token_calls = sum(n for kind, n in tenant.counters()["token"].items() if kind != "errors")
    statuses = Counter(s.status or s.error for s in samples)
    reasons = Counter(why for s in samples if s.status != 200 for why in [s.headers.get("reason", "?")])
    print(f"{len(samples)} users' first requests from {args.clients} clients, token endpoint "
          f"{args.token_seconds[0]}-{args.token_seconds[1]} s: {took:.0f} s")
    print(f"statuses {dict(statuses)} ({100 * statuses[200] / max(1, len(calls)):.1f} % 200); "
          f"{summary(samples)}; token endpoint calls {token_calls}")
    if reasons:
        print(f"why not 200: {dict(reasons)}")
    return 0 if statuses == Counter({200: len(calls)}) else 1


def wave(base_url: str, calls: list[Call], clients: int, give_up_at: float) -> list[Sample]:
    def client(share: list[Call]) -> list[Sample]:
        with requests.Session() as session:
            session.headers["Connection"] = "close"
            return [first_request(session, base_url, call)
                    for call in share if time.monotonic() < give_up_at]

    with ThreadPoolExecutor(clients) as pool:
        return [s for share in pool.map(client, [calls[n::clients] for n in range(clients)]) for s in share]


def first_request(session: requests.Session, base_url: str, call: Call) -> Sample:
    """One GET, as ``request_sample`` describes it, keeping an error answer's
    ``error_description`` (as the sample's header "reason")."""
    start = time.monotonic()
    try:
        response = session.get(base_url + call.path, headers={"Authorization": f"Bearer {call.token}"},
                               timeout=30)
    except requests.RequestException as exc:
        return Sample(call.tag, start, time.monotonic() - start, 0, error=type(exc).__name__)
    reason = {} if response.ok else {"reason": str(response.json().get("error_description"))}
    return Sample(call.tag, start, time.monotonic() - start, response.status_code, reason)


if __name__ == "__main__":
    sys.exit(main())
