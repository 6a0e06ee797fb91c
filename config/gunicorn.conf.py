"""gunicorn settings for flask-obo: ``gunicorn -c config/gunicorn.conf.py wsgi:app``.

Every value can be overridden with the environment variable named beside it.

gunicorn runs this file in its master, before it forks any worker, so every setting is
checked here: gunicorn's own and the API's (``Settings.from_env``). Bad ones stop
start-up with one line each, all at once, naming the variable, never its value, and exit
status 1: not a traceback from each worker in turn. Only the values are read when something else runs this
file (tests, tools), as the API's settings may then legitimately be absent.
"""

import atexit
import glob
import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path

# The project's root, where `app` and `flask_obo` are, whatever the working directory (gunicorn applies
# --chdir only after reading this file).
_root = str(Path(__file__).resolve().parents[1])
if _root not in sys.path:
    sys.path.insert(0, _root)

# Metrics: prometheus_client's multiprocess mode, so /metrics sums every worker (and every
# worker that has exited: their counts stay) whichever worker answers the scrape. Each
# worker writes its values to files in PROMETHEUS_MULTIPROC_DIR, which must be set before
# prometheus_client is first imported (by flask_obo, just below; workers inherit it from
# this master). Unset: a fresh private directory (tmpfs when there is one), removed when
# the master exits (however it does: a bad setting below, --check-config, SIGTERM). Set:
# that directory (one per gunicorn), emptied of earlier runs' files when gunicorn starts.
_METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
_METRICS_FILES = ("counter_*.db", "histogram_*.db", "gauge_*.db", "summary_*.db")


def _remove_metrics_dir(path: str, master: int) -> None:
    if os.getpid() == master:  # workers run atexit too when they exit: not theirs to remove
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__config__" and not os.environ.get(_METRICS_DIR):  # (a HUP re-reads this file: set)
    _tmpfs = "/dev/shm"  # noqa: S108 - the workers' value files are mmapped: keep them in memory
    _private = tempfile.mkdtemp(prefix=f"flask-obo-metrics-{os.getpid()}-",
                                dir=_tmpfs if os.path.isdir(_tmpfs) else None)
    os.environ[_METRICS_DIR] = _private
    atexit.register(_remove_metrics_dir, _private, os.getpid())

from app.gunicorn_logging import logging_config  # noqa: E402
from flask_obo import Env, Settings, SettingsError, settings_error_lines  # noqa: E402
from flask_obo.settings import LOG_FORMATS  # noqa: E402

_cores = multiprocessing.cpu_count()
_env = Env(os.environ, collect=True)  # every bad setting at once, one line each

# Loopback unless told otherwise: gunicorn must only be reachable through nginx. It trusts
# one hop of X-Forwarded-* (wsgi.py's ProxyFix), so a client that reaches it directly picks
# the host in redirects and the address in the logs; and its workers are no match for a
# slow client (slowloris), which nginx buffers. docker-compose.yml sets 0.0.0.0:8000 on a
# network that only nginx shares.
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
# gthread: requests mostly wait on Redis, Entra ID and Graph, so threads are cheap
# concurrency; one worker per core (at least two) uses the cores for TLS and JSON.
worker_class = "gthread"
keepalive = 5  # nginx keeps upstream connections open; reuse them
# Room for "Authorization: Bearer <token>" with a token up to the protector's 16 KiB limit
# (MAX_TOKEN_LENGTH), as nginx allows (large_client_header_buffers); gunicorn's default,
# 8190, would answer such a token 431 before the API could judge it.
limit_request_field_size = 16 * 1024 + 64
workers = _env.positive_int("GUNICORN_WORKERS", max(2, _cores), unit="workers")
threads = _env.positive_int("GUNICORN_THREADS", 4 * _cores, unit="threads")
# A request may wait on a token request (~13 s worst case) and Graph retries; a worker
# silent for longer than this is stuck and gets replaced (so 0, "never", is refused).
timeout = _env.positive_int("GUNICORN_TIMEOUT", 60)
graceful_timeout = _env.whole_number("GUNICORN_GRACEFUL_TIMEOUT", 30, unit="seconds")  # drain on SIGTERM
# Recycle slowly: bounds memory (0: never).
max_requests = _env.whole_number("GUNICORN_MAX_REQUESTS", 5000, unit="requests")
max_requests_jitter = _env.whole_number("GUNICORN_MAX_REQUESTS_JITTER", max_requests // 10,
                                        unit="requests")
loglevel = _env.log_level("LOG_LEVEL")
log_format = _env.choice("LOG_FORMAT", LOG_FORMATS)
_errors = list(_env.errors)
if __name__ == "__config__":  # gunicorn's name for this file: it is about to start the API
    try:
        Settings.from_env()
    except SettingsError as error:
        _errors += [line for line in error.errors if line not in _errors]
if _errors:
    sys.exit("\n".join(settings_error_lines(SettingsError(*_errors))))
if __name__ == "__config__":
    # gunicorn's own answers (a header or request line over its limits, a malformed request)
    # in the API's JSON error vocabulary, not an HTML page: see app/gunicorn_errors.py.
    from app import gunicorn_errors

    gunicorn_errors.install()
# Heartbeat files on tmpfs, so a slow container disk cannot make workers look dead.
_shm = "/dev/shm"  # noqa: S108 - gunicorn's documented choice for worker_tmp_dir
worker_tmp_dir = os.environ.get("GUNICORN_WORKER_TMP_DIR", _shm if os.path.isdir(_shm) else None)

# Logs go to stdout/stderr. The access log names no request header except the user agent
# and the request id: never Authorization, never a token. What the client sent (request
# id, path, user agent) cannot forge a field or a line: app/gunicorn_logging.py cleans it.
logger_class = "app.gunicorn_logging.SanitisingLogger"
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-")
errorlog = os.environ.get("GUNICORN_ERROR_LOG", "-")
# request_id: the id the API answered with (X-Request-ID of the response): the client's
# or nginx's when well formed, else one the API made.
access_log_format = (
    '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms "%(a)s" request_id=%({x-request-id}o)s pid=%(p)s'
)
if log_format == "json":  # one JSON object per line from the app and gunicorn alike
    logconfig_dict = logging_config(loglevel, log_format, accesslog, errorlog)


# --- the master, before the first fork: Entra ID's shared pace; metrics' directory (see the top) --
def on_starting(server):  # once, in the master, before the first fork (not on a HUP)
    import flask_obo

    # Workers share what they see of Entra ID and Redis (flask_obo.share_across_workers):
    # one recycled during a hang or a Redis pause starts from its siblings' knowledge.
    flask_obo.share_across_workers()
    path = os.environ.get(_METRICS_DIR)
    if path:
        os.makedirs(path, mode=0o700, exist_ok=True)
        for pattern in _METRICS_FILES:  # an earlier run's counts are not this run's
            for stale in glob.glob(os.path.join(path, pattern)):
                os.remove(stale)


def child_exit(server, worker):  # in the master, for each worker that exited (or was killed)
    if os.environ.get(_METRICS_DIR):
        from prometheus_client import multiprocess

        # Drops its live gauges only: its counters and histograms stay in the sums.
        multiprocess.mark_process_dead(worker.pid)


# --- a retiring worker waits on no one (flask_obo.retire_worker) ----------------------------
# A worker retires after max_requests, on SIGTERM (a stop, a scale-down) and on SIGHUP (the
# master replaces every worker): it stops accepting, waits for its requests in flight, and
# the master forks its replacement only once it has exited. A request waiting on a hanging
# Entra ID would hold it for the whole wait, and with every worker retiring at once nothing
# would serve. gunicorn has no hook for "this worker stops" (gthread flips worker.alive in
# the request thread that reached max_requests, or in its SIGTERM handler), so a thread
# watches that flag and tells flask-obo, which then ends its waits on Entra ID at once
# (503 + Retry-After; the client retries on a live worker). Requests served from the cache
# run to their end.
RETIREMENT_POLL_SECONDS = 0.05


def post_worker_init(worker):  # in each worker, once the app is loaded, before it accepts
    import threading
    import time

    import flask_obo

    # One PING to Redis before the first request (flask_obo.prepare_worker): a worker
    # forked while Redis hangs opens its circuit here, while its siblings serve.
    flask_obo.prepare_worker(worker.wsgi)

    def watch():
        while worker.alive:
            time.sleep(RETIREMENT_POLL_SECONDS)
        flask_obo.retire_worker()

    threading.Thread(target=watch, name="flask-obo-retirement", daemon=True).start()


def worker_int(worker):  # SIGINT / SIGQUIT: the worker exits at once; its waits end too
    import flask_obo

    flask_obo.retire_worker()


def worker_abort(worker):  # SIGABRT (the worker timed out): the same
    import flask_obo

    flask_obo.retire_worker()


# --- OpenTelemetry traces (flask_obo.tracing; off unless OTEL_EXPORTER_OTLP_*ENDPOINT is set) --
def post_fork(server, worker):  # in each worker, after the fork: its own exporter and thread
    from flask_obo import tracing

    tracing.configure()


def worker_exit(server, worker):  # in the worker as it exits: send the spans still queued
    from flask_obo import tracing

    tracing.shutdown()
