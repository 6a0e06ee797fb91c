"""``python -m devtenant <command>``: serve, token, federated-token, revoke, rotate-keys, env, init.

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
    token.add_argument("--v1", action="store_true", help="v1 token (iss <host>/sts/<tid>/, aud api://...)")
    token.add_argument("--tenant", help="the user's tenant (GUID or domain; default: found by user)")
    token.add_argument("--authority-host", help=host_help)

    fed = sub.add_parser(
        "federated-token", parents=[common],
        help="write (or print) a federated service account token, as AKS projects it",
    )  # fmt: skip
    fed.add_argument("--out", help="file to write atomically (AZURE_FEDERATED_TOKEN_FILE); default: print")
    fed.add_argument("--lifetime", type=int, default=3600, help="seconds")
    fed.add_argument("--expired", action="store_true", help="mint an already expired token")
    fed.add_argument("--subject", default="system:serviceaccount:default:flask-obo")
    fed.add_argument("--audience", default="api://AzureADTokenExchange")
    fed.add_argument("--issuer", default="aks", help="federation issuer name (<host>/federation/<name>)")
    fed.add_argument("--authority-host", help=host_help)

    revoke = sub.add_parser("revoke", parents=[common], help="revoke a user's sessions (CAE)")
    revoke.add_argument("user", nargs="?", help="short name, UPN or object id")
    revoke.add_argument(
        "--require-sign-in", action="store_true",
        help="also refuse OBO assertions issued before now (interaction_required + claims)",
    )  # fmt: skip
    revoke.add_argument("--require-mfa", action="store_true", help="--require-sign-in, and MFA again")
    revoke.add_argument("--clear", action="store_true", help="forget the user's (or all) revocations")

    sub.add_parser("rotate-keys", parents=[common], help="add a new active signing key")

    env = sub.add_parser("env", parents=[common], help="print KEY=VALUE lines for the API")
    env.add_argument("--authority-host", help=host_help)
    env.add_argument("--certificate", action="store_true", help="certificate instead of secret")
    env.add_argument(
        "--federated", action="store_true",
        help="federated token file instead of secret (writes <state>/federated-token, valid 1 h)",
    )  # fmt: skip
    env.add_argument("--managed-identity", action="store_true", help="App Service managed identity")
    env.add_argument("--user-assigned", action="store_true", help="the user-assigned managed identity")

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
        values = tenant.env(
            certificate=args.certificate,
            federated=args.federated,
            managed_identity=args.managed_identity,
            user_assigned=args.user_assigned,
        )
        for key, value in values.items():
            print(f"{key}={value}")
    elif args.command == "federated-token":
        try:
            options = {
                "subject": args.subject, "audience": args.audience, "lifetime": args.lifetime,
                "expired": args.expired, "issuer": args.issuer,
            }  # fmt: skip
            if args.out:
                print(tenant.write_federated_token(args.out, **options))
            else:
                print(tenant.federated_token(**options))  # type: ignore[arg-type]
        except KeyError as exc:
            print(f"devtenant: {exc.args[0]}", file=sys.stderr)
            return 2
    elif args.command == "revoke":
        try:
            if args.clear:
                tenant.clear_revocation(args.user)
                print(f"cleared {args.user or 'all'}")
            elif not args.user:
                raise KeyError("a user is required (e.g. adele), unless --clear")
            else:
                record = tenant.revoke(args.user, args.require_sign_in, args.require_mfa)
                print(f"revoked at {record.at}; claims {record.claims()}")
        except KeyError as exc:
            print(f"devtenant: {exc.args[0]}", file=sys.stderr)
            return 2
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
                        v1=args.v1,
                        tenant=args.tenant,
                    )
                )
        except (KeyError, ValueError) as exc:
            print(f"devtenant: {exc.args[0] if exc.args else exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
