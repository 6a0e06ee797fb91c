"""Dev-tenant-only endpoints for tests: counters, runtime switches, health.

They live under ``/_devtenant/`` (and ``/healthz``) so they can never be confused with
an Entra or Graph URL. Tests use the counters to prove caching (e.g. "the second API
call did not hit the token endpoint", or which downstream API, Graph or the Tasks API,
was called, or which client certificate signed the API's assertions), the switch to
exercise both scope forms, the one that moves MFA from sign-in to the OBO (an SPA's claims
challenge), and certificate (un)registration to rotate the API's certificate.
"""

from __future__ import annotations

from dataclasses import asdict

from flask import Blueprint, Response, jsonify, request

from devtenant import pki
from devtenant.runtime import current

bp = Blueprint("hooks", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    runtime = current()
    return jsonify({"status": "ok", "tenant": runtime.directory.tenant_id, "kid": runtime.keys.active_kid})


@bp.get("/_devtenant/counters")
def counters() -> Response:
    return jsonify(current().counters.snapshot())


@bp.post("/_devtenant/counters/reset")
def reset_counters() -> Response:
    runtime = current()
    runtime.counters.reset()
    return jsonify(runtime.counters.snapshot())


@bp.route("/_devtenant/config", methods=["GET", "POST"])
def config() -> Response | tuple[Response, int]:
    """``{"short_scopes": bool}`` switches the form of the returned ``scope``;
    ``{"access_token_lifetime": seconds | null}`` how long issued access tokens live
    (null: Entra's randomised 60-90 minutes). Either key, or both."""
    runtime = current()
    if request.method == "POST":
        data = request.get_json(silent=True)
        expected = 'expected JSON {"short_scopes": true|false, "access_token_lifetime": seconds|null}'
        if not isinstance(data, dict) or not data.keys() & {"short_scopes", "access_token_lifetime"}:
            return jsonify({"error": expected}), 400
        lifetime = data.get("access_token_lifetime")
        if ("short_scopes" in data and not isinstance(data["short_scopes"], bool)) or (
                lifetime is not None and (type(lifetime) is not int or not 60 <= lifetime <= 86400)):
            return jsonify({"error": expected}), 400
        if "short_scopes" in data:
            runtime.short_scopes = data["short_scopes"]
        if "access_token_lifetime" in data:
            runtime.access_token_lifetime = lifetime
    return jsonify({"short_scopes": runtime.short_scopes,
                    "access_token_lifetime": runtime.access_token_lifetime})


@bp.route("/_devtenant/app-tokens", methods=["GET", "POST"])
def app_tokens() -> Response | tuple[Response, int]:
    """``{"lifetime": <seconds> | null, "delay": <seconds>}``: client-credentials tokens live
    ``lifetime`` seconds (null: Entra's 60-90 minutes), e.g. 240 for a token already four
    minutes from its expiry, and each takes ``delay`` seconds (at most 30) to be issued."""
    runtime = current()
    if request.method == "POST":
        data = request.get_json(silent=True)
        lifetime, delay = (data.get("lifetime"), data.get("delay", 0)) if isinstance(data, dict) else (0, -1)
        if not (lifetime is None or (isinstance(lifetime, int) and 0 < lifetime <= 86400)) or not (
                isinstance(delay, int | float) and 0 <= delay <= 30):
            return jsonify({"error": 'expected JSON {"lifetime": 1..86400 | null, "delay": 0..30}'}), 400
        runtime.app_token_lifetime, runtime.app_token_delay = lifetime, float(delay)
    return jsonify({"lifetime": runtime.app_token_lifetime, "delay": runtime.app_token_delay})


@bp.route("/_devtenant/revoke", methods=["POST", "DELETE"])
def revoke() -> Response | tuple[Response, int]:
    """POST ``{"user": "adele", "require_sign_in": false, "require_mfa": false}`` revokes
    the user's sessions (as ``python -m devtenant revoke``); DELETE ``{"user": ...}``
    (or no body: everyone) forgets revocations."""
    from devtenant import revocation

    runtime = current()
    data = request.get_json(silent=True) or {}
    if not isinstance(data, dict):
        return jsonify({"error": 'expected JSON {"user": "<short name, UPN or object id>"}'}), 400
    ref = data.get("user")
    user = next((d.user(ref) for d in runtime.directories if isinstance(ref, str) and d.user(ref)), None)
    if request.method == "DELETE":
        if ref is not None and user is None:
            return jsonify({"error": f"unknown user {ref!r}"}), 404
        revocation.clear(runtime.paths, user.oid if user else None)
        return jsonify({"cleared": user.upn if user else "all"})
    if user is None:
        return jsonify({"error": f"unknown user {ref!r}"}), 404
    flags = {k: data.get(k, False) for k in ("require_sign_in", "require_mfa")}
    if not all(isinstance(v, bool) for v in flags.values()):
        return jsonify({"error": "require_sign_in and require_mfa are booleans"}), 400
    record = revocation.revoke(runtime.paths, user.oid, **flags)
    return jsonify({"user": user.upn, "oid": user.oid, **asdict(record), "claims": record.claims()})


@bp.route("/_devtenant/mfa", methods=["GET", "POST"])
def mfa() -> Response | tuple[Response, int]:
    """``{"at_sign_in": bool}``: do flagged users (alex) do MFA when they sign in (the
    default), or only when a claims challenge asks (Conditional Access on Graph alone, as
    the API's OBO meets it)?"""
    runtime = current()
    if request.method == "POST":
        data = request.get_json(silent=True)
        if not isinstance(data, dict) or not isinstance(data.get("at_sign_in"), bool):
            return jsonify({"error": 'expected JSON {"at_sign_in": true|false}'}), 400
        runtime.mfa_at_sign_in = data["at_sign_in"]
    return jsonify({"at_sign_in": runtime.mfa_at_sign_in})


@bp.post("/_devtenant/apps/<client_id>/certificates")
def add_certificate(client_id: str) -> Response | tuple[Response, int]:
    """Register one more certificate on an app (body: the PEM certificate, as uploaded to
    an app registration); the app's certificates from ``certificate_file`` stay. Entra
    accepts an assertion signed with any registered certificate, which is how a
    certificate is rotated without downtime: register the new one, roll it out,
    un-register the old one (DELETE). Answers the SHA-256 thumbprint (base64url)."""
    try:
        certificates = pki.load_pem_certs(request.get_data())
    except ValueError:
        certificates = []
    if len(certificates) != 1:
        return jsonify({"error": "expected one PEM certificate as the body"}), 400
    if not current().add_certificate(client_id.lower(), certificates[0]):
        return jsonify({"error": f"unknown app {client_id!r}"}), 404
    return jsonify({"thumbprint": pki.thumbprint(certificates[0], "sha256")}), 201


@bp.delete("/_devtenant/apps/<client_id>/certificates/<thumbprint>")
def remove_certificate(client_id: str, thumbprint: str) -> Response | tuple[Response, int]:
    """Un-register the certificate with this thumbprint (SHA-256 or SHA-1, base64url)."""
    if not current().remove_certificate(client_id.lower(), thumbprint.rstrip("=")):
        return jsonify({"error": "no such certificate on that app"}), 404
    return jsonify({"removed": thumbprint.rstrip("=")})
