"""gunicorn settings for flask-obo: ``gunicorn -c config/gunicorn.conf.py wsgi:app``.

Every value can be overridden with the environment variable named beside it.
"""

import multiprocessing
import os

_cores = multiprocessing.cpu_count()

# Loopback unless told otherwise: gunicorn must only be reachable through nginx. It trusts
# one hop of X-Forwarded-* (wsgi.py's ProxyFix), so a client that reaches it directly picks
# the host in redirects and the address in the logs; and its workers are no match for a
# slow client (slowloris), which nginx buffers. docker-compose.yml sets 0.0.0.0:8000 on a
# network that only nginx shares.
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
# gthread: requests mostly wait on Redis, Entra ID and Graph, so threads are cheap
# concurrency; one worker per core (at least two) uses the cores for TLS and JSON.
worker_class = "gthread"
workers = int(os.environ.get("GUNICORN_WORKERS", max(2, _cores)))
threads = int(os.environ.get("GUNICORN_THREADS", 4 * _cores))
# A request may wait on a token request (~13 s worst case) and Graph retries; a worker
# silent for longer than this is stuck and gets replaced.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", 60))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", 30))  # drain on SIGTERM
keepalive = 5  # nginx keeps upstream connections open; reuse them
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", 5000))  # recycle slowly: bounds memory
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", max_requests // 10))
# Heartbeat files on tmpfs, so a slow container disk cannot make workers look dead.
_shm = "/dev/shm"  # noqa: S108 - gunicorn's documented choice for worker_tmp_dir
worker_tmp_dir = os.environ.get("GUNICORN_WORKER_TMP_DIR", _shm if os.path.isdir(_shm) else None)

# Logs go to stdout/stderr. The access log names no request header except the user agent
# and the request id: never Authorization, never a token. What the client sent (request
# id, path, user agent) cannot forge a field or a line: app/gunicorn_logging.py cleans it.
logger_class = "app.gunicorn_logging.SanitisingLogger"
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-")
errorlog = os.environ.get("GUNICORN_ERROR_LOG", "-")
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
access_log_format = (
    '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms "%(a)s" request_id=%({x-request-id}i)s pid=%(p)s'
)
