"""Metrics benchmark: what counting costs a warm request, in µs of one thread.

    python bench/metrics_bench.py

A warm Graph request (``GET /api/me`` served from the memory tier) does this metric work:
the request hooks (``before_request`` timer; ``after_request``: one counter and one
histogram), one ``token_acquisitions`` increment, and one downstream counter and
histogram. Measured in both of prometheus_client's modes: one process (values behind a
mutex) and multiprocess (values in mmapped files, as under gunicorn with
``config/gunicorn.conf.py``), each in a fresh interpreter since the mode is chosen when
prometheus_client is first imported. CPU time of the measuring thread, best of several
rounds, so a busy machine inflates the figures less than wall-clock time would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CALLS, ROUNDS = 20_000, 7


def measure() -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from flask import Flask, Response

    from flask_obo import FlaskOBO
    from flask_obo.extension import _request_hooks, services_of
    from tests.support.fake_entra import settings_env

    app = Flask(__name__)
    FlaskOBO(app, settings=settings_env())
    app.add_url_rule("/api/me", "me", lambda: "")
    metrics = services_of(app).metrics
    response = Response("{}", status=200)
    start_timer, count_request = _request_hooks(metrics)  # the pair init_app registered

    def hooks() -> None:
        start_timer()
        count_request(response)

    def acquisition() -> None:
        metrics.acquisition("memory_hit")

    def downstream() -> None:
        metrics.downstream("graph", 200, time.perf_counter())

    def warm_request() -> None:
        hooks()
        acquisition()
        downstream()

    series = {"request hooks": hooks, "acquisition": acquisition, "downstream": downstream,
              "warm request, all": warm_request}
    best = dict.fromkeys(series, float("inf"))
    with app.test_request_context("/api/me"):
        for _ in range(ROUNDS):
            for name, fn in series.items():
                started = time.thread_time()  # CPU time: other processes on the machine do not count
                for _ in range(CALLS):
                    fn()
                best[name] = min(best[name], (time.thread_time() - started) / CALLS * 1e6)
    return best


def main() -> int:
    if "--child" in sys.argv:
        for name, us in measure().items():
            print(f"{name}\t{us:.2f}")
        return 0
    results: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="flask-obo-metrics-bench-") as directory:
        for mode, extra in (("one process", {}), ("multiprocess", {"PROMETHEUS_MULTIPROC_DIR": directory})):
            env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | extra
            out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True,
                                 text=True, check=True, cwd=ROOT).stdout
            results[mode] = dict(line.split("\t") for line in out.splitlines())
    print("| metric work | one process (µs) | multiprocess (µs) |")
    print("|---|---|---|")
    for name in results["one process"]:
        print(f"| {name} | {results['one process'][name]} | {results['multiprocess'][name]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
