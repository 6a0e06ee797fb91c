"""``python -m devtenant <command>``: serve, token, rotate-keys, env, init.

Every command first makes sure the state folder exists (idempotent), so any of them
can be the first one run on a fresh checkout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from devtenant import DEFAULT_AUTHORITY_HOST, STATE_DIR_ENV


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        help=f"state folder (default: ${STATE_DIR_ENV} or ./.devtenant)",
    )
    host_help = (
        "scheme://host:port tokens/URLs name (default: URL recorded by the last `serve`, "
        f"else {DEFAULT_AUTHORITY_HOST})"
    )
    parser = argparse.ArgumentParser(
        prog="python -m devtenant", description="Local Entra ID + Microsoft Graph for flask-obo."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the HTTPS server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8443, help="0 picks a free port")
    serve.add_argument("--public-url", help="fixed scheme://host:port for issuers and URLs")
    serve.add_argument("--short-scopes", action="store_true", help="return Graph short scopes")
    serve.add_argument("--san", action="append", default=[], help="extra TLS SAN (repeatable)")

    token = sub.add_parser("token", parents=[common], help="print an access token for the API")
    token.add_argument("user", nargs="?", help="short name (adele) or UPN")
    token.add_argument("--scopes", default="user_impersonation", help="space-separated API scopes")
    token.add_argument("--lifetime", type=int, default=3600, help="seconds")
    token.add_argument("--expired", action="store_true", help="mint an already expired token")
    token.add_argument("--mfa", action="store_true", help='add amr ["pwd", "mfa"]')
    token.add_argument("--app-only", action="store_true", help="app-only token (roles, no scp)")
    token.add_argument("--authority-host", help=host_help)

    sub.add_parser("rotate-keys", parents=[common], help="add a new active signing key")

    env = sub.add_parser("env", parents=[common], help="print KEY=VALUE lines for the API")
    env.add_argument("--authority-host", help=host_help)
    env.add_argument("--certificate", action="store_true", help="certificate instead of secret")

    init = sub.add_parser("init", parents=[common], help="create the state folder")
    init.add_argument("--san", action="append", default=[], help="extra TLS SAN (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from devtenant.api import DevTenant

    if args.command == "serve":
        from devtenant.server import serve

        try:
            serve(
                host=args.host,
                port=args.port,
                state_dir=args.state_dir,
                public_url=args.public_url,
                short_scopes=args.short_scopes,
                sans=args.san,
            )
        except OSError as exc:  # typically: port already in use
            print(f"devtenant: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
        return 0
    tenant = DevTenant(args.state_dir, getattr(args, "authority_host", None))
    if args.command == "init":
        paths = tenant.ensure_state(args.san)
        print(paths.root)
    elif args.command == "rotate-keys":
        print(tenant.rotate_keys())
    elif args.command == "env":
        for key, value in tenant.env(certificate=args.certificate).items():
            print(f"{key}={value}")
    elif args.command == "token":
        try:
            if args.app_only:
                print(tenant.app_only_token(lifetime=args.lifetime))
            elif not args.user:
                raise ValueError("a user is required (e.g. adele), unless --app-only")
            else:
                print(
                    tenant.api_token(
                        args.user,
                        scopes=args.scopes.split(),
                        lifetime=args.lifetime,
                        expired=args.expired,
                        mfa=args.mfa,
                    )
                )
        except (KeyError, ValueError) as exc:
            print(f"devtenant: {exc.args[0] if exc.args else exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
