"""Helpers for the deployment tests: config/nginx.conf rendered for loopback, and run.

The shipped nginx.conf names the compose services (``api-1:8000``), container ports
(8080, 8443, each with a default server for unknown hosts and the API's server) and
container paths (TLS files, the SPA's mount). ``render_nginx_conf`` rewrites exactly
those lines and fails if any of them is missing or appears more often than expected, so
the tests always run the shipped file and notice when it drifts. Host names
(``server_name``) are not rewritten: the tests reach nginx as ``127.0.0.1`` and
``localhost``, which the shipped file lists.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.support.servers import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "config" / "nginx.conf"
#: Where compose mounts spa/ in the nginx container (config/nginx.conf's SPA locations).
SPA_MOUNT = "/usr/share/nginx/spa"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def _sub(pattern: str, repl, text: str, expected: int, what: str) -> str:
    new, count = re.subn(pattern, repl, text, flags=re.MULTILINE)
    if count != expected:
        raise AssertionError(f"config/nginx.conf: expected {expected} {what}, found {count}")
    return new


def _expect(pattern: str, text: str, expected: int, what: str) -> None:
    _sub(pattern, "", text, expected, what)


def render_nginx_conf(
    text: str,
    *,
    upstreams: Sequence[str],
    http_port: int,
    tls_port: int,
    cert: Path,
    key: Path,
    run_dir: Path,
    log_dir: Path,
    spa_dir: Path,
) -> str:
    """The shipped config with loopback upstreams/ports, the given certificate, files in
    tmp, and the sample SPA served from ``spa_dir`` (see ``stage_spa``)."""
    servers = iter(upstreams)
    text = _sub(r"^(\s*server\s+)api-\d+:8000\b", lambda m: m.group(1) + next(servers), text,
                len(upstreams), "upstream 'server api-N:8000' lines")
    # Each port has two listeners: the default server (unknown hosts) and the API's.
    text = _sub(r"^(\s*listen\s+)8080( default_server)?;", rf"\g<1>127.0.0.1:{http_port}\g<2>;", text, 2,
                "'listen 8080[ default_server];' lines")
    text = _sub(r"^(\s*listen\s+)8443(\s+ssl\b[^;]*);", rf"\g<1>127.0.0.1:{tls_port}\g<2>;", text, 2,
                "'listen 8443 ssl ...;' lines")
    _expect(r"^\s*listen\s+\S+.*\bdefault_server;", text, 2, "'listen ... default_server;' lines")
    text = _sub(r"^(\s*ssl_certificate\s+)\S+;", rf"\g<1>{cert};", text, 1, "ssl_certificate lines")
    text = _sub(r"^(\s*ssl_certificate_key\s+)\S+;", rf"\g<1>{key};", text, 1, "ssl_certificate_key lines")
    # The sample SPA's files (root twice, alias once).
    text = _sub(rf"(?<=\s){re.escape(SPA_MOUNT)}(?=[/;])", str(spa_dir), text, 3, f"'{SPA_MOUNT}' paths")
    text = _sub(r"^(\s*pid\s+)\S+;", rf"\g<1>{run_dir / 'nginx.pid'};", text, 1, "pid lines")
    text = _sub(r"^(\s*error_log\s+)\S+", rf"\g<1>{log_dir / 'nginx-error.log'}", text, 1, "error_log lines")
    text = _sub(r"^(\s*access_log\s+)(?!off\b)\S+", rf"\g<1>{log_dir / 'nginx-access.log'}", text, 1,
                "access_log lines (other than 'off')")
    # Distributions compile absolute temp paths (/var/lib/nginx/...): keep them in run_dir.
    temp = "".join(f"    {name}_temp_path {run_dir / name};\n" for name in TEMP_PATHS)
    return _sub(r"^http \{\n", lambda m: m.group(0) + temp, text, 1, "'http {' blocks")


def world_traversable_dir(prefix: str) -> Path:
    """A fresh dir under the system temp dir that nginx's workers (``nobody``) can enter.

    pytest's tmp_path lives under a 0700 directory; nginx's master (root) opens the logs,
    certificates and config there, but workers need their temp paths themselves.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


#: What of spa/ the tests' nginx gets: the files it serves and some it must not.
SPA_FILES = ("*.html", "*.js", "*.json", "node_modules/@azure/msal-browser/lib/msal-browser.min.js",
             "node_modules/@azure/msal-common/package.json")


def stage_spa(run_dir: Path) -> Path:
    """A world-readable copy of the checkout's sample SPA under ``run_dir``.

    nginx's workers run as another user (``nobody``, ``www-data``) when the tests run as
    root, and cannot read a checkout in a private (0700) directory: they read this copy,
    as compose's read-only mount gives them theirs. Files nginx must refuse (package.json,
    another package's files) are copied too, so that a 404 for them still tests nginx."""
    staged = run_dir / "spa"
    source = ROOT / "spa"
    for pattern in SPA_FILES:
        for path in source.glob(pattern):
            target = staged / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            target.chmod(0o644)
    for directory in [staged, *(d for d in staged.rglob("*") if d.is_dir())]:
        directory.chmod(0o755)
    return staged


@dataclass
class NginxProcess:
    http_url: str
    https_url: str
    access_log: Path
    error_log: Path
    conf: Path
    process: subprocess.Popen[bytes]

    def access_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []


@contextmanager
def run_nginx(
    binary: str, tmp_path: Path, upstreams: Sequence[str], cert: Path, key: Path
) -> Iterator[NginxProcess]:
    """The shipped nginx.conf on free loopback ports in the foreground; stopped with SIGQUIT."""
    run_dir = world_traversable_dir("flask-obo-nginx-")
    http_port, tls_port = free_port(), free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf(
        NGINX_CONF.read_text(), upstreams=upstreams, http_port=http_port, tls_port=tls_port,
        cert=cert, key=key, run_dir=run_dir, log_dir=tmp_path, spa_dir=stage_spa(run_dir),
    ))
    error_log = tmp_path / "nginx-error.log"
    process = subprocess.Popen(
        [binary, "-p", f"{run_dir}/", "-c", str(conf), "-e", str(error_log), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    # TLS by name: a client sends SNI only for a host name, and without a listed one the
    # default server refuses the handshake.
    nginx = NginxProcess(f"http://127.0.0.1:{http_port}", f"https://localhost:{tls_port}",
                         tmp_path / "nginx-access.log", error_log, conf, process)
    try:
        wait_until(lambda: process.poll() is not None
                   or requests.get(f"{nginx.http_url}/nginx-healthz", timeout=1).ok, what="nginx")
        assert process.poll() is None, f"nginx exited: {_tail(error_log)}"
        yield nginx
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT)  # graceful: finish requests, close keepalives
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        shutil.rmtree(run_dir, ignore_errors=True)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text()[-chars:] if path.exists() else f"({path} missing)"


def nginx_test_config(binary: str, conf: Path, run_dir: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on a rendered config."""
    return subprocess.run(
        [binary, "-t", "-p", f"{run_dir}/", "-c", str(conf), "-e", str(conf.parent / "nginx-t.log"),
         "-g", "daemon off;"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "LC_ALL": "C"},
    )
