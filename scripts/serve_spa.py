"""Serve the sample SPA (``spa/``) on its own origin, with a generated ``config.json``.

``make run`` starts it on http://localhost:5173 (another origin than the API's, so the
browser's CORS checks are real); the browser tests start it on a free loopback port. The
redirect URI is this server's own URL: the dev tenant accepts ``http://localhost`` and
``http://127.0.0.1`` redirect URIs on any port, as Entra ID does.

Only the SPA's own files and msal-browser's browser bundle (from ``spa/node_modules``,
``npm ci`` in ``spa/``) are served; anything else is a 404.

    python scripts/serve_spa.py --port 5173 --authority https://localhost:8443/<tenant> \\
        --api-base-url http://127.0.0.1:8000

Prints ``SPA ready at <url>`` once it listens; SIGTERM or Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
SPA_DIR = ROOT / "spa"
MSAL_BUNDLE = "node_modules/@azure/msal-browser/lib/msal-browser.min.js"
#: URL path -> file under spa/ (config.json is generated).
FILES = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js", f"/{MSAL_BUNDLE}": MSAL_BUNDLE}


def spa_config(*, authority: str, client_id: str, api_base_url: str, api_scope: str,
               redirect_uri: str) -> dict[str, Any]:
    """What ``spa/app.js`` reads from ``config.json``."""
    return {
        "authority": authority.rstrip("/"),
        # MSAL.js trusts only Microsoft's clouds unless the authority's host is listed here.
        "knownAuthorities": [urlsplit(authority).netloc],
        "clientId": client_id,
        "apiBaseUrl": api_base_url.rstrip("/"),
        "apiScope": api_scope,
        "redirectUri": redirect_uri,
    }


class SpaHandler(SimpleHTTPRequestHandler):
    config: dict[str, Any] = {}  # each server gets a subclass with its own

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/config.json":
            self._send(json.dumps(self.config).encode(), "application/json")
            return
        name = FILES.get(path)
        if name is None or not (SPA_DIR / name).is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        self.path = "/" + name  # SimpleHTTPRequestHandler serves it from spa/
        super().do_GET()

    def do_HEAD(self) -> None:
        self.do_GET()

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def _send(self, body: bytes, content_type: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: make run's terminal shows the API's log


SpaHandler.extensions_map = {**SpaHandler.extensions_map, ".js": "text/javascript"}


def make_server(host: str, port: int, config: dict[str, Any]) -> ThreadingHTTPServer:
    """Serves ``config`` as config.json: the same dict, so it may change once bound."""
    handler = type("ConfiguredSpaHandler", (SpaHandler,), {"config": config})
    server = ThreadingHTTPServer((host, port), partial(handler, directory=str(SPA_DIR)))
    server.daemon_threads = True
    return server


def bundle_missing() -> bool:
    return not (SPA_DIR / MSAL_BUNDLE).is_file()


def main(argv: list[str] | None = None) -> int:
    from devtenant import API_APP_ID_URI, API_SCOPE, SPA_CLIENT_ID

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="localhost", help="the name in the URL (and redirect URI)")
    parser.add_argument("--port", type=int, default=5173)
    parser.add_argument("--authority", required=True, help="https://<host>/<tenant id>")
    parser.add_argument("--client-id", default=SPA_CLIENT_ID, help="the SPA's app registration")
    parser.add_argument("--api-base-url", required=True, help="where the API answers, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-scope", default=f"{API_APP_ID_URI}/{API_SCOPE}")
    args = parser.parse_args(argv)
    if bundle_missing():
        print(f"spa/{MSAL_BUNDLE} is missing: run `npm ci` in spa/", file=sys.stderr)
        return 2
    bind = "127.0.0.1" if args.host == "localhost" else args.host
    config: dict[str, Any] = {}  # each server gets a subclass with its own
    server = make_server(bind, args.port, config)  # port 0: a free one, known once bound
    url = f"http://{args.host}:{server.server_address[1]}/"
    config.update(spa_config(
        authority=args.authority, client_id=args.client_id, api_base_url=args.api_base_url,
        api_scope=args.api_scope, redirect_uri=url,
    ))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"SPA ready at {url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # devtenant's constants, from a plain checkout
    sys.exit(main())
