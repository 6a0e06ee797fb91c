"""The documentation site stays true to the code: the generated reference tables hold every
setting the code reads, every CLI command, metric and error code; the hand-written pages
name no setting the code does not know; and every page the nav lists exists.

``make test`` also builds the site with ``mkdocs build --strict``, which runs the same
generator (docs/gen_reference.py) as a hook: a disagreement stops that build too."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from flask_obo import errors, metrics
from flask_obo.cli import token_cache_cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SETTINGS_PAGE = DOCS / "reference" / "settings.md"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def settings_block(gen: ModuleType) -> str:
    match = gen.SETTINGS_BLOCK.search(SETTINGS_PAGE.read_text())
    assert match, "docs/reference/settings.md lost its <!-- settings --> table"
    return match.group(1)


def rendered_rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([^`]+)`", cells[0])
        if match:
            rows[match.group(1)] = cells[1:]
    return rows


# --- settings ----------------------------------------------------------------------------------


def test_the_recorder_sees_what_the_code_reads(gen: ModuleType) -> None:
    """Negative control: the names come from running Settings.from_env, so they include the
    credential, Redis, pattern and late-read settings (not a list written beside the code)."""
    read = gen.settings_read_by_code()
    assert {"AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "REDIS_URL", "TOKEN_CACHE_KEYS",
            "LOG_FORMAT", "DOWNSTREAM_APIS__<NAME>__BASE_URL", "DOWNSTREAM_APIS__<NAME>__SCOPES"} <= set(read)
    assert not [name for name in read if gen._SAMPLE_API in name]  # the sample name was replaced


def test_the_settings_page_lists_exactly_the_settings_the_code_reads(gen: ModuleType) -> None:
    documented = set(gen.documented_settings(settings_block(gen)))
    read = set(gen.settings_read_by_code())
    assert not read - documented, f"docs/reference/settings.md lacks {sorted(read - documented)}"
    assert not documented - read, f"docs/reference/settings.md lists unknown {sorted(documented - read)}"


def test_the_generated_table_has_every_setting_with_the_codes_default(gen: ModuleType) -> None:
    rows = rendered_rows(gen.settings_table(settings_block(gen)))
    assert set(rows) == set(gen.settings_read_by_code())
    # every plain setting's default was found in the code (pattern ones are required)
    assert {name for name in rows if "<NAME>" not in name} <= set(gen.setting_defaults())
    # Defaults are what the code uses, whatever the page says.
    assert rows["TOKEN_CACHE_TTL_SECONDS"][0] == "`7776000`"
    assert rows["REDIS_TIMEOUT_SECONDS"][0] == "`0.5`"
    assert rows["ENTRA_MAX_WAITING_THREADS"][0] == "`4`"
    assert rows["AZURE_CLIENT_CAPABILITIES"][0] == "`cp1`"
    assert rows["GRAPH_SCOPES"][0] == "`https://graph.microsoft.com/.default`"
    assert rows["LOG_FORMAT"][0] == "`text`"
    assert rows["REDIS_CLUSTER"][0] == "`false`"
    assert rows["AZURE_TENANT_ID"][0] == rows["AZURE_CLIENT_ID"][0] == "required"
    assert rows["REDIS_URL"][0] == gen.UNSET
    assert all(cells[1] for cells in rows.values())  # each has a meaning


def test_the_defaults_follow_the_code_not_the_page(gen: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    from flask_obo import settings

    monkeypatch.setattr(settings, "DEFAULT_REDIS_TIMEOUT", 0.75)
    assert gen.setting_defaults()["REDIS_TIMEOUT_SECONDS"] == "`0.75`"


@pytest.mark.parametrize("name", ["TOKEN_CACHE_KEYS", "DOWNSTREAM_APIS__<NAME>__SCOPES", "LOG_LEVEL"])
def test_removing_a_settings_row_fails(gen: ModuleType, name: str) -> None:
    block = settings_block(gen)
    row = next(line for line in block.splitlines() if line.startswith(f"| `{name}` |"))
    with pytest.raises(gen.SettingsDocError, match=re.escape(name)):
        gen.settings_table(block.replace(row + "\n", ""))


def test_a_row_for_a_setting_the_code_does_not_read_fails(gen: ModuleType) -> None:
    block = settings_block(gen) + "| `TOKEN_CACHE_COLOUR` | a setting that does not exist |\n"
    with pytest.raises(gen.SettingsDocError, match="TOKEN_CACHE_COLOUR"):
        gen.settings_table(block)


# Backticked upper-case names with our settings' prefixes are setting names.
_SETTING_PREFIXES = ("AZURE_", "API_", "GRAPH_", "DOWNSTREAM_APIS__", "REDIS_", "TOKEN_", "ENTRA_",
                     "AUTHORITY_", "CORS_", "LOG_", "GUNICORN_", "SPA_", "DEVTENANT_", "OBO_",
                     "PROMETHEUS_", "REQUESTS_")
_NAME = re.compile(r"(?<![A-Za-z0-9_])([A-Z][A-Z0-9]*(?:__<NAME>__[A-Z0-9_]+|_[A-Z0-9]+)+)(?![A-Za-z0-9_])")


_ON_PURPOSE = re.compile(r"misspel|mistyp|typo", re.I)


def names_the_code_knows(gen: ModuleType) -> set[str]:
    """Settings.from_env's names, and the upper-case string constants of the other code
    that reads the environment: gunicorn's config, make run, the compose file, the
    extension (PROMETHEUS_MULTIPROC_DIR) and the dev tenant (managed identity variables)."""
    known = set(gen.settings_read_by_code())
    sources = [ROOT / "config" / "gunicorn.conf.py", ROOT / "scripts" / "run_local.py",
               *sorted((ROOT / "flask_obo").glob("*.py")), *sorted((ROOT / "devtenant").glob("*.py"))]
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                known.update(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", node.value))
    known.update(re.findall(r"\b([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+):", (ROOT / "docker-compose.yml").read_text()))
    known.update(re.findall(r"\$\{([A-Z_]+)", (ROOT / "docker-compose.yml").read_text()))
    known.add("REQUESTS_CA_BUNDLE")  # requests' own variable, set by devtenant env and compose
    return known


def setting_names_in(markdown: str) -> set[str]:
    """The setting names in a page's code spans and blocks; a line that says it shows a
    misspelt (or mistyped) name on purpose is left out."""
    markdown = "\n".join(line for line in markdown.splitlines() if not _ON_PURPOSE.search(line))
    names = set()
    for code in re.findall(r"`([^`\n]+)`", markdown) + re.findall(r"```\w*\n(.*?)```", markdown, re.S):
        for name in _NAME.findall(code):
            if name.startswith(_SETTING_PREFIXES):
                names.add(name)
    return names


def test_the_name_scan_finds_setting_names(gen: ModuleType) -> None:
    """Negative control for the next test."""
    text = "Set `REDIS_URL` and `TOKEN_CACHE_KEYS=a,b`; see `DOWNSTREAM_APIS__<NAME>__SCOPES`.\n" \
           "```sh\nAZURE_TENANT_ID=x\n```\n`flask_obo_requests_total` and `GET /api/me` are not settings."
    assert setting_names_in(text) == {"REDIS_URL", "TOKEN_CACHE_KEYS", "DOWNSTREAM_APIS__<NAME>__SCOPES",
                                      "AZURE_TENANT_ID"}
    assert "REDIS_URL_TYPO" not in names_the_code_knows(gen)
    assert setting_names_in("a misspelt `REDIS_URLS` would be ignored") == set()


def test_the_hand_written_docs_name_only_settings_the_code_knows(gen: ModuleType) -> None:
    known = names_the_code_knows(gen)

    def is_known(name: str) -> bool:
        bare = name.removeprefix(gen.OPTIONAL_PREFIX)  # OBO_REDIS_URL is REDIS_URL
        return bool({name, bare, re.sub(r"__[A-Z0-9]+__", "__<NAME>__", bare)} & known)

    pages = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]
    unknown = {f"{page.relative_to(ROOT)}: {name}" for page in pages
               for name in setting_names_in(page.read_text()) if not is_known(name)}
    assert not unknown, f"setting names no code reads: {sorted(unknown)}"


# --- CLI, metrics, error codes -------------------------------------------------------------------


def test_the_cli_page_has_every_command_and_option(gen: ModuleType) -> None:
    from flask_obo.check import obo_cli

    page = gen.cli_reference()
    for group in (token_cache_cli, obo_cli):
        assert f"## `flask {group.name}`" in page
        for name, command in group.commands.items():
            assert f"### `{name}`" in page
            for parameter in command.params:
                for opt in getattr(parameter, "opts", []):
                    assert f"`{opt}`" in page
    assert "`--oid`" in page and "`--json`" in page  # the known ones, so an empty page cannot pass


def test_the_metrics_page_has_every_metric_and_label(gen: ModuleType) -> None:
    page = gen.metrics_reference()
    registry = metrics.Metrics().registry
    families = list(registry.collect())
    assert len(families) >= 9
    for family in families:
        name = f"{family.name}_total" if family.type == "counter" else family.name
        assert f"`{name}`" in page
    for label in ("outcome", "grant", "status", "api", "operation", "route"):
        assert f"`{label}`" in page
    for outcome in metrics.OUTCOMES:
        assert f"`{outcome}`" in page


def test_the_error_codes_page_has_every_code_by_status(gen: ModuleType) -> None:
    rows = {(int(cells[0]), cells[1].strip("`"))
            for cells in (line.strip("|").split("|") for line in gen.error_codes_reference().splitlines()[2:])
            for cells in [[cell.strip() for cell in cells]]}
    expected = {(status, code) for status, codes in errors.error_codes().items() for code in codes}
    assert rows == expected
    assert (401, "insufficient_claims") in rows and (404, "not_found") in rows


# --- the site -------------------------------------------------------------------------------------


def nav_pages(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [page for item in node for page in nav_pages(item)]
    if isinstance(node, dict):
        return [page for value in node.values() for page in nav_pages(value)]
    return []


def test_every_nav_entry_exists() -> None:
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    pages = nav_pages(config["nav"])
    assert "reference/settings.md" in pages
    assert not [page for page in pages if not (DOCS / page).is_file()]


def test_the_site_builds_offline() -> None:
    """No web fonts and no plugin that downloads at build time."""
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    assert config["theme"]["font"] == "false"
    plugins = {next(iter(p)) if isinstance(p, dict) else p for p in config["plugins"]}
    assert plugins <= {"search", "mkdocstrings"}
    # mkdocstrings downloads the object inventories it is told to import (Python's, requests')
    handlers = next((p["mkdocstrings"] for p in config["plugins"] if isinstance(p, dict)
                     and "mkdocstrings" in p), {}).get("handlers", {})
    for name, handler in handlers.items():
        assert not {"import", "inventories"} & set(handler), f"mkdocstrings' {name} handler downloads"


# --- the tutorial ---------------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["dev-tenant.md", "real-tenant.md"])
def test_each_tutorial_takes_at_most_five_steps(page: str) -> None:
    steps = re.findall(r"^## (\d+)\. ", (DOCS / "tutorial" / page).read_text(), re.M)
    assert steps == [str(n) for n in range(1, len(steps) + 1)] and 3 <= len(steps) <= 5


def test_the_tutorial_gives_the_dev_tenants_tasks_api_as_the_code_serves_it() -> None:
    """Its URL and scope were in the source only; the tutorial and the README name them."""
    from devtenant import TASKS_API_RESOURCE
    from devtenant.tasks_api import bp

    tutorial = (DOCS / "tutorial" / "dev-tenant.md").read_text()
    assert f"DOWNSTREAM_APIS__TASKS__SCOPES={TASKS_API_RESOURCE}/.default" in tutorial
    assert f"DOWNSTREAM_APIS__TASKS__BASE_URL=https://localhost:8443{bp.url_prefix}" in tutorial
    readme = (ROOT / "README.md").read_text()
    assert f"{TASKS_API_RESOURCE}/.default" in readme and bp.url_prefix in readme


def test_the_tutorial_shows_the_readmes_tested_example() -> None:
    """The tutorial includes the README's example (the one tests/e2e/test_readme_example.py
    runs) through a snippet, so there is one copy of it."""
    assert '--8<-- "README.md:example"' in (DOCS / "tutorial" / "dev-tenant.md").read_text()
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("--8<-- [start:example]"):readme.index("--8<-- [end:example]")]
    assert "obo.downstream(\"tasks\")" in section and "```python" in section
