"""The serving benchmark's dev tenant (bench/devtenant_users.py) still gets its synthetic
users as the dev tenant evolves: ``make bench`` is not part of the suite, so this is
where a change to how the dev tenant loads its directory shows up."""

from __future__ import annotations

from bench import devtenant_users
from devtenant import DevTenant
from devtenant import directory as directory_module
from devtenant.directory import Directory


def test_install_adds_synthetic_users_that_get_tokens(monkeypatch, tmp_path):
    monkeypatch.setattr(directory_module, "_read_json", directory_module._read_json)  # restored after
    monkeypatch.setattr(Directory, "user", Directory.user)
    devtenant_users.install(3)

    home = Directory.load_all()[0]
    user = home.user("bench0002")
    assert user is not None and user.oid == devtenant_users.synthetic_user(2)["id"]
    assert home.user("adele") is not None  # the shipped users are still there
    token = DevTenant(tmp_path, "https://localhost:8443").api_token(devtenant_users.short_name(1))
    assert token.count(".") == 2
