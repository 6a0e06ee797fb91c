"""``make run``: the API under gunicorn on http://127.0.0.1:8000, ready to call.

* No Azure settings (environment or ``.env``): starts the dev tenant (a local Entra ID
  and Graph over HTTPS), points the API at it, and prints a ``curl`` with a freshly
  minted token for a signed-in user. Tokens are cached in the process unless
  ``REDIS_URL`` is set.
* ``AZURE_TENANT_ID``/``AZURE_CLIENT_ID`` set: runs against that tenant; no dev tenant.
  A template's placeholder (empty, the all-zero GUID, ``<...>``) is not a setting: a
  ``.env`` copied from ``config/example.env`` still runs the dev tenant.

The sample SPA (``spa/``) is served on its own origin, http://localhost:5173, with the
API's CORS allowing that origin (added to ``CORS_ALLOWED_ORIGINS``): open the printed
``SPA:`` URL and sign in. Its npm packages are installed on first use (``npm ci`` in
``spa/``); without node/npm, ``make run`` says how to install them and runs the API alone.
Against a real tenant, the SPA needs ``SPA_CLIENT_ID`` (its app registration).

``API_PORT`` (8000), ``SPA_PORT`` (5173, or a free one if taken: the dev tenant accepts
loopback redirect URIs on any port), ``DEVTENANT_PORT`` (8443, or a free one if taken) and
``DEVTENANT_STATE_DIR`` (``.devtenant``: the dev tenant's keys, CA and log) change where
it runs.

Ctrl-C stops everything it started.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
API_HOST = "127.0.0.1"
API_PORT = int(os.environ.get("API_PORT", "8000"))
DEVTENANT_PORT = int(os.environ.get("DEVTENANT_PORT", "8443"))
SPA_PORT = int(os.environ.get("SPA_PORT", "5173"))
SPA_DIR = ROOT / "spa"
MSAL_BUNDLE = SPA_DIR / "node_modules/@azure/msal-browser/lib/msal-browser.min.js"
NODE_HINT = ("install Node.js 20 and npm (sudo apt-get install nodejs npm, or https://nodejs.org), "
             "then run `npm ci` in spa/")
STATE_DIR = Path(os.environ.get("DEVTENANT_STATE_DIR", ROOT / ".devtenant"))
TENANT_SETTINGS = ("AZURE_TENANT_ID", "AZURE_CLIENT_ID")
# A template's value, not a setting: the all-zero GUID, or "<what to put here>".
_PLACEHOLDER = re.compile(r"0{8}-0{4}-0{4}-0{4}-0{12}|.*<[^<>]*>.*")


def is_placeholder(value: str | None) -> bool:
    """Empty, the all-zero GUID or a ``<...>`` value: what a template holds, not a setting."""
    return value is None or not value.strip() or _PLACEHOLDER.fullmatch(value.strip()) is not None


def merged_settings(dotenv: Mapping[str, str | None], environ: Mapping[str, str]) -> dict[str, str]:
    """``.env`` overlaid by the environment. A placeholder from ``.env`` becomes ``""``:
    the API reads ``.env`` too, and an empty variable in its environment overrides it."""
    from_file = {key: "" if is_placeholder(value) else value for key, value in dotenv.items()}
    return {**from_file, **environ}


def uses_real_tenant(settings: Mapping[str, str]) -> bool:
    """Run against Entra ID when a tenant or client id is set; else start the dev tenant."""
    return any(not is_placeholder(settings.get(name)) for name in TENANT_SETTINGS)


def main() -> int:
    sys.path.insert(0, str(ROOT))  # the dev tenant, when run from a plain checkout
    from dotenv import dotenv_values

    env = merged_settings(dotenv_values(ROOT / ".env"), os.environ)
    children: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        tenant = None
        if uses_real_tenant(env):
            print("Azure settings found: running against Entra ID, dev tenant not started.")
            api_env = dict(env)
        else:
            tenant = start_devtenant(children)
            api_env = {**env, **tenant.env()}
        spa = spa_settings(env, tenant)
        if spa is not None:
            spa["port"] = SPA_PORT if port_is_free(SPA_PORT) else free_port()
            origin = f"http://localhost:{spa['port']}"
            allowed = [o for o in (api_env.get("CORS_ALLOWED_ORIGINS") or "").split(",") if o.strip()]
            api_env["CORS_ALLOWED_ORIGINS"] = ",".join([*allowed, origin])
        if not api_env.get("REDIS_URL"):
            api_env["GUNICORN_WORKERS"] = "1"  # an in-process cache is per worker: keep one
        elif not api_env.get("TOKEN_CACHE_KEYS"):
            from cryptography.fernet import Fernet

            api_env["TOKEN_CACHE_KEYS"] = Fernet.generate_key().decode()
            print("TOKEN_CACHE_KEYS is not set: using a throw-away key for this run.")
        children.append(subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", str(ROOT / "config/gunicorn.conf.py"),
             "--bind", f"{API_HOST}:{API_PORT}", "wsgi:app"],
            cwd=ROOT, env=api_env,
        ))
        wait_for(f"http://{API_HOST}:{API_PORT}/healthz", children)
        spa_url = start_spa(children, spa) if spa is not None else None
        print_usage(tenant, spa_url)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        print("a process exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()


def start_devtenant(children: list[subprocess.Popen[bytes]]):  # -> devtenant.DevTenant
    from devtenant import DevTenant

    port = DEVTENANT_PORT if port_is_free(DEVTENANT_PORT) else 0
    STATE_DIR.mkdir(exist_ok=True)
    log = open(STATE_DIR / "serve.log", "ab")  # noqa: SIM115 - lives as long as the child
    children.append(subprocess.Popen(
        [sys.executable, "-m", "devtenant", "serve", "--port", str(port),
         "--state-dir", str(STATE_DIR)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log,
    ))
    ready = children[-1].stdout.readline().decode().strip()  # "devtenant ready at https://..."
    if "ready at" not in ready:
        raise SystemExit(f"the dev tenant did not start; see {log.name}")
    print(ready)
    return DevTenant(STATE_DIR, ready.split("ready at ")[1].split()[0])


def spa_settings(env: Mapping[str, str], tenant) -> dict | None:  # tenant: devtenant.DevTenant | None
    """What the SPA's config.json needs (None: no SPA this run, and why is printed)."""
    from devtenant import API_APP_ID_URI, API_SCOPE, SPA_CLIENT_ID

    if not ensure_spa_packages():
        return None
    if tenant is not None:
        return {"authority": tenant.authority, "client_id": SPA_CLIENT_ID,
                "api_scope": f"{API_APP_ID_URI}/{API_SCOPE}"}
    if is_placeholder(env.get("SPA_CLIENT_ID")):
        print("SPA: not started (set SPA_CLIENT_ID to your SPA's app registration to serve it)")
        return None
    host = (env.get("AZURE_AUTHORITY_HOST") or "https://login.microsoftonline.com").rstrip("/")
    return {"authority": f"{host}/{env.get('AZURE_TENANT_ID') or 'organizations'}",
            "client_id": env["SPA_CLIENT_ID"],
            "api_scope": f"api://{env.get('AZURE_CLIENT_ID')}/user_impersonation"}


def ensure_spa_packages() -> bool:
    """msal-browser in spa/node_modules, installed from the lockfile (npm ci) if missing."""
    if MSAL_BUNDLE.is_file():
        return True
    if not (SPA_DIR / "package-lock.json").is_file():
        print("SPA: not started (no spa/ in this checkout)")
        return False
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        print(f"SPA: not started: node/npm are missing; {NODE_HINT}. The API runs without it.")
        return False
    print("SPA: installing its npm packages (npm ci in spa/)...")
    result = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=SPA_DIR,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0 or not MSAL_BUNDLE.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        print("SPA: not started: `npm ci` in spa/ failed:\n  " + "\n  ".join(tail) +
              f"\n{NODE_HINT}. The API runs without it.")
        return False
    return True


def start_spa(children: list[subprocess.Popen[bytes]], spa: dict) -> str | None:
    """scripts/serve_spa.py on http://localhost:<port>; its URL, or None if it did not start."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts/serve_spa.py"), "--host", "localhost",
         "--port", str(spa["port"]), "--authority", spa["authority"], "--client-id", spa["client_id"],
         "--api-base-url", f"http://{API_HOST}:{API_PORT}", "--api-scope", spa["api_scope"]],
        cwd=ROOT, stdout=subprocess.PIPE,
    )
    ready = process.stdout.readline().decode().strip()  # "SPA ready at http://localhost:5173/"
    if "ready at" not in ready:
        process.wait(timeout=10)
        print("SPA: not started (scripts/serve_spa.py failed; see above). The API runs without it.")
        return None
    children.append(process)
    return ready.split("ready at ")[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def wait_for(url: str, children: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            raise SystemExit("a process exited during start-up; see its output above")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - our own loopback URL
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout:.0f}s")


def print_usage(tenant, spa_url: str | None) -> None:  # tenant: devtenant.DevTenant | None
    base = f"http://{API_HOST}:{API_PORT}"
    print(f"\nflask-obo is running at {base} (Ctrl-C stops it)")
    if tenant is None:
        print(f'Call it with a token your SPA got for the API:\n'
              f'  curl -H "Authorization: Bearer $TOKEN" {base}/api/me')
        if spa_url:
            print(f"SPA: {spa_url}")
        return
    token = tenant.api_token("adele")
    print("Signed in as Adele Vance (dev tenant). Her manager, via Graph on her behalf:\n")
    print(f'curl -s -H "Authorization: Bearer {token}" {base}/api/me/manager\n')
    if spa_url:
        print(f"SPA: {spa_url}")
        print(f"  (sign in as any user; your browser must trust the dev tenant's CA, {tenant.paths.ca_cert}: "
              "see docs/how-to/sample-spa.md)\n")
    print("Tokens for other users: .venv/bin/python -m devtenant token "
          f"nestor|patti|alex|lynne|megan --state-dir {STATE_DIR}")

if __name__ == "__main__":
    sys.exit(main())
