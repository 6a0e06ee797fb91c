"""Signing-key rotation: new kid signs, old kids stay published, hot reload in the app."""

from __future__ import annotations

from pathlib import Path

from devtenant import TENANT_ID
from devtenant.api import DevTenant
from devtenant.keys import KEEP_KEYS
from devtenant.server import create_app
from tests.devtenant.conftest import BASE, TokenEndpoint, header_of


def test_rotation_is_picked_up_without_restart(tmp_path: Path) -> None:
    tenant = DevTenant(tmp_path, BASE)
    app = create_app(tmp_path)  # created before the rotation, as a running server would be
    endpoint = TokenEndpoint(app.test_client(), tenant)
    jwks_url = f"/{TENANT_ID}/discovery/v2.0/keys"

    old_kid = tenant.active_kid()
    before = endpoint.obo_for("adele").get_json()["access_token"]
    assert header_of(before)["kid"] == old_kid

    new_kid = tenant.rotate_keys()
    assert new_kid != old_kid and tenant.active_kid() == new_kid
    after = endpoint.obo_for("adele").get_json()["access_token"]
    assert header_of(after)["kid"] == new_kid
    assert header_of(tenant.api_token("adele"))["kid"] == new_kid

    kids = [k["kid"] for k in endpoint.client.get(jwks_url, base_url=BASE).get_json()["keys"]]
    assert kids[:2] == [new_kid, old_kid]
    # Tokens signed with the previous key keep working until they expire.
    me = endpoint.client.get("/v1.0/me", base_url=BASE, headers={"Authorization": f"Bearer {before}"})
    assert me.status_code == 200

    for _ in range(KEEP_KEYS):
        tenant.rotate_keys()
    kids = [k["kid"] for k in endpoint.client.get(jwks_url, base_url=BASE).get_json()["keys"]]
    assert len(kids) == KEEP_KEYS and old_kid not in kids
    me = endpoint.client.get("/v1.0/me", base_url=BASE, headers={"Authorization": f"Bearer {before}"})
    assert me.status_code == 401  # its key is no longer published
