"""Flask app factory and the HTTPS server process.

``create_app`` is what tests use with Flask's test client; ``serve`` runs the same app
in werkzeug's threaded HTTPS server (one process), because msal insists on https
authorities and the API, its tests and docker-compose need a real socket.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from flask import Flask
from werkzeug.serving import WSGIRequestHandler, make_server

from devtenant import TENANT_ID
from devtenant.authserver import create_authorization_server
from devtenant.runtime import Runtime
from devtenant.state import ensure_state, record_server_url

_LOOPBACK = {"", "0.0.0.0", "::", "127.0.0.1", "::1", "localhost"}  # noqa: S104


def create_app(
    state_dir: str | os.PathLike[str] | None = None,
    public_url: str | None = None,
    short_scopes: bool = False,
) -> Flask:
    """Build the dev tenant app on ``state_dir`` (created if needed).

    ``public_url`` pins the scheme://host:port used in issuers and URLs; without it
    each request's own host is used. ``short_scopes`` starts with the Graph short
    scope form in token responses (switchable at runtime via /_devtenant/config).
    """
    from devtenant import entra, federation, graph, hooks, managed_identity, signin, tasks_api

    paths = ensure_state(state_dir)
    app = Flask("devtenant")
    app.json.sort_keys = False  # keep Entra/Graph field order readable
    runtime = Runtime(paths, public_url, short_scopes)
    app.extensions["devtenant"] = runtime
    app.extensions["devtenant.authserver"] = create_authorization_server(app, runtime)
    app.register_blueprint(hooks.bp)
    app.register_blueprint(entra.bp)
    app.register_blueprint(signin.bp)
    app.register_blueprint(graph.bp)
    app.register_blueprint(tasks_api.bp)
    app.register_blueprint(federation.bp)
    app.register_blueprint(managed_identity.bp)
    return app


def public_url_for(host: str, port: int) -> str:
    """The URL to advertise: ``localhost`` for loopback/wildcard binds (it is in the SANs)."""
    shown = "localhost" if host in _LOOPBACK else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"https://{shown}:{port}"


class _KeepAliveHandler(WSGIRequestHandler):
    """HTTP/1.1, so clients keep their connections: werkzeug's default (1.0) closes each
    one, and a new TLS connection per token or Graph call costs the API tens of ms."""

    protocol_version = "HTTP/1.1"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(
    host: str = "127.0.0.1",
    port: int = 8443,
    state_dir: str | os.PathLike[str] | None = None,
    public_url: str | None = None,
    short_scopes: bool = False,
    sans: Iterable[str] = (),
    out: TextIO | None = None,
) -> None:
    """Serve over HTTPS until SIGINT/SIGTERM; prints one ready line once listening.

    ``port=0`` picks a free port; the ready line and state/server.json show the real one.
    """
    sans = list(sans)
    if public_url:
        from urllib.parse import urlsplit

        hostname = urlsplit(public_url).hostname
        if hostname:
            sans.append(hostname)
    paths = ensure_state(state_dir, extra_sans=sans)
    app = create_app(paths.root, public_url, short_scopes)
    ssl_context = (str(paths.server_cert), str(paths.server_key))
    server = make_server(host, port, app, threaded=True, ssl_context=ssl_context,
                         request_handler=_KeepAliveHandler)
    url = (public_url or public_url_for(host, server.port)).rstrip("/")
    record_server_url(paths, url)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    stream = out or sys.stdout
    print(f"devtenant ready at {url} (tenant {TENANT_ID})", file=stream, flush=True)
    server.serve_forever()  # returns on KeyboardInterrupt and closes the socket
