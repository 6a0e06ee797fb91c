"""The reference pages' tables, generated from the code that defines them (a mkdocs hook).

mkdocs runs ``on_page_markdown`` (``hooks:`` in mkdocs.yml) for every page; a page that
holds one of the markers below gets it replaced by a table built from the code, so the
settings, CLI commands, metrics and error codes in the documentation cannot drift from
what the code reads, registers, counts and answers:

* ``<!-- settings -->`` ... ``<!-- /settings -->``: the page's own two-column table
  (``| variable | meaning |``: the meanings are written by people) becomes
  ``| variable | default | meaning |``. The names are the ones ``Settings.from_env``
  actually reads (recorded, not parsed), the defaults what ``Env`` returns when the
  variable is unset. A setting the code reads that the table lacks, or a row for a name the
  code does not read, stops the build (``SettingsDocError``); tests/unit/test_docs.py
  checks the same without mkdocs.
* ``<!-- cli -->``: every command of the ``flask token-cache`` and ``flask obo`` groups, its help
  and options.
* ``<!-- metrics -->``: every metric a ``Metrics`` registers, its type, labels and help,
  and the acquisition outcomes.
* ``<!-- error-codes -->``: every ``flask_obo.errors.ApiError`` class and generic HTTP
  error, by status.

Plain Python with no mkdocs import, so the tests import it as a module.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_SOURCE = ROOT / "flask_obo" / "settings.py"
SETTINGS_BLOCK = re.compile(r"<!-- settings -->\n(.*?)<!-- /settings -->", re.S)
# How a pattern setting is written: DOWNSTREAM_APIS__<NAME>__BASE_URL.
NAME_PLACEHOLDER = "<NAME>"
_SAMPLE_API = "DOCSAMPLE"
_SAMPLE_GUID = "00000000-0000-4000-8000-000000000001"
UNSET = "—"
OPTIONAL_PREFIX = "OBO_"  # the settings' optional namespace in app.config (issue 19)


class SettingsDocError(ValueError):
    """The settings page and the code disagree; the message names the settings."""


# --- settings ---------------------------------------------------------------------------------
class _RecordingEnviron(Mapping[str, str]):
    """An environment that remembers every name looked up in it."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self.read: list[str] = []

    def __getitem__(self, name: str) -> str:
        self.read.append(name)
        return self._values[name]

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read.append(name)
        return self._values.get(name, default)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str):
            self.read.append(name)
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def settings_read_by_code() -> list[str]:
    """Every variable ``Settings.from_env`` reads, in the order it reads them: the settings
    of a minimal valid environment with one extra downstream API, whose name becomes
    ``<NAME>``."""
    from flask_obo.settings import DOWNSTREAM_PREFIX, Settings

    sample = f"{DOWNSTREAM_PREFIX}{_SAMPLE_API}__"
    environ = _RecordingEnviron({
        "AZURE_TENANT_ID": _SAMPLE_GUID,
        "AZURE_CLIENT_ID": _SAMPLE_GUID,
        "AZURE_CLIENT_SECRET": "sample",
        f"{sample}BASE_URL": "https://api.example.com",
        f"{sample}SCOPES": "api://sample/.default",
    })
    Settings.from_env(environ)
    names: list[str] = []
    for name in environ.read:
        name = name.replace(sample, f"{DOWNSTREAM_PREFIX}{NAME_PLACEHOLDER}__")
        if name not in names:
            names.append(name)
    # A prefixed spelling of a setting (OBO_REDIS_URL for REDIS_URL) is that setting.
    return [name for name in names
            if not (name.startswith(OPTIONAL_PREFIX) and name[len(OPTIONAL_PREFIX):] in names)]


def _accessor_calls() -> dict[str, tuple[str, list[ast.expr]]]:
    """``NAME -> (accessor, positional arguments)`` for each ``env.<accessor>("NAME", ...)``
    (or ``self.<accessor>(...)``) call in settings.py."""
    calls: dict[str, tuple[str, list[ast.expr]]] = {}
    for node in ast.walk(ast.parse(SETTINGS_SOURCE.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id in {"env", "self"}
                and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            calls.setdefault(node.args[0].value, (node.func.attr, node.args[1:]))
    return calls


def setting_defaults() -> dict[str, str]:
    """What the code uses for each setting left unset, as the docs show it: the value
    ``Env``'s accessor returns for an empty environment (``required`` if it refuses)."""
    from flask_obo import settings as module

    defaults: dict[str, str] = {}
    for name, (accessor, arguments) in _accessor_calls().items():
        try:
            values = [_argument_value(argument, vars(module)) for argument in arguments]
        except LookupError:  # an argument built from other settings (API_REQUIRED_SCOPE's api=)
            values = [argument.value for argument in arguments if isinstance(argument, ast.Constant)]
        method = getattr(module.Env({}), accessor)
        parameters = list(inspect.signature(method).parameters.values())[1:]
        values += [None] * sum(1 for p in parameters[len(values):] if p.default is inspect.Parameter.empty)
        try:
            value = method(name, *values)
        except module.SettingsError:
            defaults[name] = "required"
            continue
        defaults[name] = _shown(value)
    return defaults


def _argument_value(argument: ast.expr, namespace: Mapping[str, Any]) -> Any:
    """A default as written in the call: a literal, or a module-level constant."""
    if isinstance(argument, ast.Name) and argument.id in namespace:
        return namespace[argument.id]
    try:
        return ast.literal_eval(argument)
    except ValueError:
        raise LookupError(ast.unparse(argument)) from None


def _shown(value: object) -> str:
    if value is None or value in ((), "", {}):
        return UNSET
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`{','.join(str(item) for item in value)}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


_ROW = re.compile(r"^\|\s*`([A-Z][A-Z0-9_<>]*)`\s*\|(.*)\|\s*$")


def documented_settings(block: str) -> dict[str, str]:
    """``NAME -> meaning`` from the rows of a ``| variable | meaning |`` table."""
    rows: dict[str, str] = {}
    for line in block.splitlines():
        match = _ROW.match(line.strip())
        if match:
            rows[match.group(1)] = match.group(2).strip()
    return rows


def settings_table(block: str) -> str:
    """The settings page's table with its defaults, checked against the code."""
    documented = documented_settings(block)
    read = settings_read_by_code()
    missing = [name for name in read if name not in documented]
    unknown = [name for name in documented if name not in read]
    problems = []
    if missing:
        problems.append(f"settings the code reads but the table lacks: {', '.join(missing)}")
    if unknown:
        problems.append(f"rows for names the code does not read: {', '.join(unknown)}")
    if problems:
        raise SettingsDocError("docs/reference/settings.md: " + "; ".join(problems))
    defaults = setting_defaults()
    unfound = [name for name in read if name not in defaults and NAME_PLACEHOLDER not in name]
    if unfound:  # read through a call this generator does not parse: say so, show no guess
        raise SettingsDocError(f"{SETTINGS_SOURCE.name}: no env.<accessor>(\"NAME\", ...) call "
                               f"found for {', '.join(unfound)}, so their defaults are unknown")
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name in documented:  # in the page's order, which groups them by concern
        default = defaults.get(name) or _per_api_default(name)
        lines.append(f"| `{name}` | {default} | {documented[name]} |")
    return "\n".join(lines) + "\n"


def _per_api_default(name: str) -> str:
    """The default of a ``DOWNSTREAM_APIS__<NAME>__<FIELD>`` (settings.DOWNSTREAM_FIELDS)."""
    from flask_obo.settings import DOWNSTREAM_FIELDS

    if NAME_PLACEHOLDER not in name:
        return UNSET
    default = DOWNSTREAM_FIELDS.get(name.rpartition("__")[2])
    return "required" if default is None else _shown(default)


# --- CLI --------------------------------------------------------------------------------------
def cli_reference() -> str:
    """The ``flask token-cache`` and ``flask obo`` groups: each command's usage, help and options."""
    import click

    from flask_obo.check import obo_cli
    from flask_obo.cli import token_cache_cli

    lines: list[str] = []
    for group in (token_cache_cli, obo_cli):
        group_context = click.Context(group, info_name=f"flask {group.name}")
        lines += [f"## `flask {group.name}`", "", f"{group.help}", ""]
        for name in group.list_commands(group_context):
            command = group.get_command(group_context, name)
            assert command is not None
            context = click.Context(command, info_name=name, parent=group_context)
            usage = " ".join(command.collect_usage_pieces(context))
            lines += [f"### `{name}`", "", "```text", f"flask {group.name} {name} {usage}".rstrip(), "```",
                      "", inspect.cleandoc(command.help or ""), ""]
            options = [p for p in command.params if isinstance(p, click.Option)]
            if options:
                lines += ["| option | required | meaning |", "|---|---|---|"]
                for option in options:
                    flag = ", ".join(f"`{o}`" for o in option.opts)
                    lines.append(f"| {flag} | {'yes' if option.required else 'no'} | {option.help or ''} |")
                lines.append("")
    return "\n".join(lines)


# --- metrics ----------------------------------------------------------------------------------
def metrics_reference() -> str:
    """Every metric of a fresh ``Metrics``: name as scraped, type, labels, help."""
    from flask_obo import metrics as module

    metrics = module.Metrics()
    lines = ["| metric | type | labels | what it counts |", "|---|---|---|---|"]
    for family in metrics.registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = sorted({label for sample in family.samples for label in sample.labels} - {"le"})
        collector = next(c for c in vars(metrics).values() if getattr(c, "_name", None) == family.name)
        labels = list(getattr(collector, "_labelnames", labels))
        shown = ", ".join(f"`{label}`" for label in labels) or UNSET
        lines.append(f"| `{name}` | {family.type} | {shown} | {family.documentation} |")
    lines += ["", "`outcome` of `flask_obo_token_acquisitions_total` is one of "
              + ", ".join(f"`{outcome}`" for outcome in module.OUTCOMES) + "; "
              f"`route` of `flask_obo_requests_total` is the URL rule, or `{module.UNMATCHED_ROUTE}`; "
              f"`status` is the HTTP status, or `{module.NO_ANSWER}` when no answer came.", ""]
    return "\n".join(lines)


# --- error codes ------------------------------------------------------------------------------
def error_codes_reference() -> str:
    """Every ``ApiError`` class of ``flask_obo.errors`` and the generic HTTP errors."""
    from flask_obo import errors as module

    rows: list[tuple[int, str, str, str]] = []
    for name, value in vars(module).items():
        if isinstance(value, type) and issubclass(value, module.ApiError):
            doc = inspect.getdoc(value) if value.__doc__ else ""
            meaning = " ".join((doc or "").split())
            rows.append((value.status, value.error, f"`{name}`", meaning or value.description))
    for status, code in module.error_codes().items():
        for error in sorted(code):
            if not any(row[0] == status and row[1] == error for row in rows):
                rows.append((status, error, "generic HTTP error", module.http_error(status).description))
    lines = ["| status | `error` | raised as | meaning |", "|---|---|---|---|"]
    for status, error, raised_as, meaning in sorted(rows, key=lambda row: (row[0], row[1], row[2])):
        lines.append(f"| {status} | `{error}` | {raised_as} | {meaning} |")
    return "\n".join(lines) + "\n"


# --- the hook ---------------------------------------------------------------------------------
def render(markdown: str) -> str:
    """A page's Markdown with every marker replaced by its generated table."""
    markdown = SETTINGS_BLOCK.sub(lambda match: settings_table(match.group(1)), markdown)
    generators = {"cli": cli_reference, "metrics": metrics_reference, "error-codes": error_codes_reference}
    for marker, generate in generators.items():
        if f"<!-- {marker} -->" in markdown:
            markdown = markdown.replace(f"<!-- {marker} -->", generate())
    return markdown


def on_page_markdown(markdown: str, **_: Any) -> str:
    """mkdocs' hook: the generated tables; a disagreement with the code stops the build."""
    return render(markdown)
