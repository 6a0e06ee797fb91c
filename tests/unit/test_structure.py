"""The shape the design review asked for stays: the reference API uses flask_obo's public
API alone, errors are one vocabulary, services are found through one typed object, and
the validated token is read through Authlib's public proxy."""

from __future__ import annotations

import ast
from pathlib import Path

import flask_obo

ROOT = Path(__file__).resolve().parents[2]
PUBLIC_MODULES = {"flask_obo", "flask_obo.errors"}


def _modules(package: str) -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text()) for path in sorted((ROOT / package).rglob("*.py"))}


def test_the_reference_api_imports_only_the_public_api():
    wsgi = ROOT / "wsgi.py"
    for path, tree in {**_modules("app"), wsgi: ast.parse(wsgi.read_text())}.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flask_obo"):
                assert node.module in PUBLIC_MODULES, f"{path.name} imports {node.module}"
                if node.module == "flask_obo":
                    assert {alias.name for alias in node.names} <= set(flask_obo.__all__), path.name
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("flask_obo.") for a in node.names), path.name


def test_every_api_error_is_defined_in_flask_obo_errors():
    error_names = {"ApiError", "ServiceUnavailable"}
    for path, tree in _modules("flask_obo").items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and path.name != "errors.py":
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                assert not bases & error_names, f"{path.name} defines the error {node.name}"


def test_no_service_is_looked_up_by_a_string_key():
    """One typed ``OboServices`` under ``EXTENSION_KEY``; no ``app.extensions["..."]``."""
    for package in ("flask_obo", "app"):
        for path, tree in _modules(package).items():
            for node in ast.walk(tree):
                if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                        and node.value.attr == "extensions":
                    assert isinstance(node.slice, ast.Name), f"{path.name}: extensions[<string>]"


def test_the_token_is_read_through_authlibs_public_proxy_not_its_g_key():
    source = "".join(path.read_text() for path in (ROOT / "flask_obo").rglob("*.py"))
    assert "authlib_server_oauth2_token" not in source


def test_docstrings_no_longer_describe_the_old_design():
    source = "".join(path.read_text() for package in ("flask_obo", "app")
                     for path in (ROOT / package).rglob("*.py"))
    for stale in ("an msal application per request", "a throttling store shared by all users"):
        assert stale not in source
