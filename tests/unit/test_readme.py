"""What the README and the documentation tell a newcomer stays true: every error code the
API can answer is in the reference API's error table (docs/reference/reference-api.md), a
``.env`` copied from ``config/example.env`` keeps ``make run`` on the dev tenant, ``make``
alone lists the targets, and the README stays short with its two commands."""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
ERROR_TABLE_PAGE = ROOT / "docs" / "reference" / "reference-api.md"
EXAMPLE_ENV = ROOT / "config" / "example.env"
# The API's code: the reference API and the extension.
API_PACKAGES = [ROOT / "app", ROOT / "flask_obo"]

# --- the error table -----------------------------------------------------------------------


def _constant_str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _target_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def error_codes_in(source: str) -> set[str]:
    """The ``error`` codes a module can answer with: ``error = "..."`` (class attributes,
    assignments), ``error="..."`` (keyword arguments: ApiError(...), bearer_challenge(...),
    jsonify(...)), ``{"error": "..."}``, and the values of a ``*_ERRORS`` mapping."""
    codes: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg == "error":
            codes.add(_constant_str(node.value))
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {_target_name(target) for target in targets}
            if "error" in names:
                codes.add(_constant_str(node.value))
            if any(name and name.upper().endswith("_ERRORS") for name in names) and isinstance(
                node.value, ast.Dict
            ):
                codes.update(_constant_str(value) for value in node.value.values)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if _constant_str(key) == "error":
                    codes.add(_constant_str(value))
    codes.discard(None)
    return codes  # type: ignore[return-value]


def api_error_codes() -> set[str]:
    return {code for package in API_PACKAGES for path in sorted(package.rglob("*.py"))
            for code in error_codes_in(path.read_text())}


def readme_error_table() -> set[str]:
    """The codes in the second column of the ``| status | `error` | when |`` table of the
    reference API's page."""
    lines = ERROR_TABLE_PAGE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\|\s*status\s*\|\s*`error`\s*\|", line))
    codes: set[str] = set()
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        codes.update(re.findall(r"`([a-z_]+)`", line.split("|")[2]))
    return codes


def test_the_scan_finds_every_kind_of_error_code() -> None:
    """Negative control: each form the API uses is seen (so an empty scan cannot pass)."""
    source = '''
class Missing(ApiError):
    error = "from_class_attribute"
raise ApiError("x", status=401, error="from_keyword")
challenge = bearer_challenge(error="from_challenge")
body = {"error": "from_dict", "error_description": "..."}
_HTTP_ERRORS = {404: "from_mapping"}
if error == "not_a_code":
    pass
'''
    assert error_codes_in(source) == {
        "from_class_attribute", "from_keyword", "from_challenge", "from_dict", "from_mapping"
    }
    codes = api_error_codes()
    # one of each form in app/: class attribute, keyword, HTTP mapping
    assert {"consent_required", "interaction_required", "not_found", "missing_token"} <= codes


def test_readme_error_table_lists_every_error_the_api_returns() -> None:
    codes = api_error_codes()
    missing = codes - readme_error_table()
    assert not missing, f"the reference API's error table lacks {sorted(missing)}"


def test_readme_error_table_lists_only_errors_the_api_returns() -> None:
    stale = readme_error_table() - api_error_codes()
    assert not stale, f"the reference API's error table lists codes the API never answers: {sorted(stale)}"


def test_the_readme_is_short_and_keeps_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert "make run" in text and "make test" in text
    # its links into the documentation lead to pages that exist
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert links and not [link for link in links if not (ROOT / link).is_file()]


# --- make run with a .env copied from config/example.env ---------------------------------------


@pytest.fixture(scope="module")
def run_local() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_local", ROOT / "scripts" / "run_local.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_env_as_copied_runs_the_dev_tenant(run_local: ModuleType) -> None:
    """``cp config/example.env .env`` (the compose instructions), then ``make run``."""
    settings = run_local.merged_settings(dotenv_values(EXAMPLE_ENV), {})
    assert not run_local.uses_real_tenant(settings)


def test_example_env_with_its_placeholders_uncommented_runs_the_dev_tenant(
    run_local: ModuleType, tmp_path: Path
) -> None:
    text = re.sub(r"(?m)^# (AZURE_[A-Z_]+=)", r"\1", EXAMPLE_ENV.read_text())
    env_file = tmp_path / ".env"
    env_file.write_text(text)
    dotenv = dotenv_values(env_file)
    assert {"AZURE_TENANT_ID", "AZURE_CLIENT_ID"} <= set(dotenv)  # the uncommenting happened
    settings = run_local.merged_settings(dotenv, {})
    assert not run_local.uses_real_tenant(settings)
    # blanked, so the API (which reads .env itself) sees them as unset too
    assert settings["AZURE_TENANT_ID"] == settings["AZURE_CLIENT_ID"] == ""


@pytest.mark.parametrize(
    "value",
    ["", "   ", "00000000-0000-0000-0000-000000000000", "<tenant id (GUID)>", "<your-tenant-id>"],
)
def test_placeholders_are_not_settings(run_local: ModuleType, value: str) -> None:
    """The all-zero ids of the old example.env, empty values and ``<...>`` are unset."""
    dotenv = {"AZURE_TENANT_ID": value, "AZURE_CLIENT_ID": value}
    assert not run_local.uses_real_tenant(run_local.merged_settings(dotenv, {}))


def test_a_real_id_in_env_or_dotenv_selects_the_real_tenant(run_local: ModuleType) -> None:
    tenant = "7f3c2a91-5b6e-4d8a-9e1f-0c4b8a2d6e35"
    assert run_local.uses_real_tenant(run_local.merged_settings({"AZURE_TENANT_ID": tenant}, {}))
    assert run_local.uses_real_tenant(run_local.merged_settings({}, {"AZURE_CLIENT_ID": tenant}))
    # the environment wins over .env, as the API's own settings do
    settings = run_local.merged_settings(
        {"AZURE_TENANT_ID": "00000000-0000-0000-0000-000000000000"}, {"AZURE_TENANT_ID": tenant}
    )
    assert run_local.uses_real_tenant(settings)


# --- make ----------------------------------------------------------------------------------


def test_make_alone_lists_the_targets() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    result = subprocess.run([make, "--no-print-directory"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    listed = dict(re.findall(r"^\s*make (\S+)\s+(.+)$", result.stdout, re.M))
    documented = re.findall(r"^## .+\n([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M)
    assert {"run", "test", "bench", "help"} <= set(documented)
    assert set(listed) == set(documented)
    assert all(listed.values())
    dry_run = subprocess.run([make, "-n", "--no-print-directory"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert "pip" not in dry_run.stdout  # listing the targets installs nothing
