"""The packaging, built for real: ``pip install .`` installs the extension, ``flask_obo``,
alone (not the reference API's ``app``, a name that would collide with users' own; no dev
tenant, with its published client secret; no tests; no test tools). Its requirements cover
what it imports, ``.[server]`` adds what the reference API needs, ``.[devtenant]`` is what
the dev tenant needs, and ``.[dev]`` (what ``make run`` and ``make test`` install) covers
everything the tests, the dev tenant and ``scripts/run_local.py`` import.

The wheel is built by pip from a copy of the checkout (so no build/ or egg-info lands in
the working tree), as the Dockerfile's build stage builds it from the build context.
"""

from __future__ import annotations

import ast
import configparser
import email
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from devtenant import API_CLIENT_SECRET
from tests.deploy.conftest import ROOT

PROJECT = "flask-obo"
# What may be in the wheel: the extension alone (the reference API deploys from source).
API_PACKAGES = {"flask_obo"}
TEST_TOOLS = {"pytest", "pytest-timeout", "fakeredis", "responses", "ruff", "check-jsonschema", "pyyaml",
              "playwright"}
# Not part of a checkout's sources: the VCS, environments, caches, build output.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".devtenant", ".env",
    "results", "node_modules"
)
NETWORK_ERRORS = ("NewConnectionError", "Failed to establish", "Temporary failure in name resolution",
                  "No matching distribution found", "Could not find a version")


def _setup_cfg() -> configparser.ConfigParser:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    return setup


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in requirements}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel --no-deps .`` of a copy of the checkout."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "checkout"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    # a stale build/lib from an earlier local build must not matter either: none is copied
    assert not (source / "build").exists()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(source), "-w", str(tmp / "dist")],
        cwd=tmp, capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0 and any(e in result.stdout + result.stderr for e in NETWORK_ERRORS):
        reason = "pip could not fetch the build backend (setuptools) to build the wheel"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires it\n{result.stderr}")
        pytest.skip(reason)
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = (tmp / "dist").glob("*.whl")
    return built


def _wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(name))


def test_the_wheel_holds_the_extension_alone(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
        assert tops == API_PACKAGES, tops  # no devtenant, tests, bench, scripts, config
        assert "flask_obo/__init__.py" in names
        assert "flask_obo/py.typed" in names  # PEP 561: the type hints ship
        # the dev tenant's published client secret is nowhere in it
        for name in names:
            assert API_CLIENT_SECRET.encode() not in archive.read(name), name


def test_the_wheel_requires_no_test_tools_and_offers_the_extras(wheel: Path) -> None:
    meta = _wheel_metadata(wheel)
    requires = [Requirement(line) for line in meta.get_all("Requires-Dist") or []]
    unconditional = {canonicalize_name(r.name) for r in requires if r.marker is None}
    assert unconditional == _names(_lines(_setup_cfg()["options"]["install_requires"]))
    assert not unconditional & TEST_TOOLS
    assert set(meta.get_all("Provides-Extra") or []) >= {"azure", "dev", "devtenant", "server"}

    def extra(name: str) -> set[str]:
        return {canonicalize_name(r.name) for r in requires
                if r.marker is not None and r.marker.evaluate({"extra": name})}

    assert extra("dev") >= TEST_TOOLS
    assert PROJECT in extra("dev")  # .[dev] pulls in .[devtenant,server] (a self-reference)
    assert any(canonicalize_name(r.name) == PROJECT and r.extras == {"azure", "devtenant", "otel", "server"}
               for r in requires)
    assert extra("azure") == {"azure-core"}
    assert not extra("devtenant") & TEST_TOOLS


def test_the_installed_wheel_has_the_extension_but_no_app_nor_dev_tenant(wheel: Path, tmp_path: Path) -> None:
    """Install with ``--no-deps`` into a fresh virtualenv and look, from outside the checkout."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)], check=True, timeout=300, capture_output=True)
    probe = (
        "import importlib.util as u, importlib.metadata as m\n"
        "print(sorted(n for n in ('app', 'flask_obo', 'devtenant', 'tests') if u.find_spec(n)))\n"
        "print(sorted({str(f).split('/')[0] for f in m.files('flask-obo')}))\n"
    )
    result = subprocess.run([str(python), "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, env={"PATH": os.environ.get("PATH", "")})
    assert result.returncode == 0, result.stderr
    found, files = result.stdout.splitlines()
    assert found == str(sorted(API_PACKAGES))
    assert "devtenant" not in files and "tests" not in files


# --- the extras cover what the code imports -------------------------------------------------


def _third_party_imports(*folders: str) -> set[str]:
    return _third_party_imports_of(*(path for folder in folders for path in (ROOT / folder).rglob("*.py")))


def _third_party_imports_of(*paths: Path) -> set[str]:
    local = {p.stem for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    local |= {"scripts", "bench"}
    modules: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m not in local}


def _closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements install (markers and extras evaluated, through
    the installed distributions' metadata; ``flask-obo[x]`` expands from setup.cfg)."""
    extras = _setup_cfg()["options.extras_require"]
    names: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = list(requirements)
    while stack:
        requirement = Requirement(stack.pop())
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(name)
        if name == PROJECT:
            stack += [line for extra in requirement.extras for line in _lines(extras[extra])]
            continue
        try:
            dependencies = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in dependencies:
            marker = Requirement(line).marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in requirement.extras or {""}):
                stack.append(line)
    return names


def _unprovided(modules: set[str], requirements: list[str]) -> set[str]:
    provided = _closure(requirements)
    by_module = metadata.packages_distributions()
    return {m for m in modules if not {canonicalize_name(d) for d in by_module.get(m, [])} & provided}


def test_the_dev_extra_covers_what_the_tests_and_make_run_import() -> None:
    setup = _setup_cfg()
    requirements = [*_lines(setup["options"]["install_requires"]),
                    *_lines(setup["options.extras_require"]["dev"])]
    modules = _third_party_imports("tests", "devtenant", "scripts")
    assert {"pytest", "fakeredis", "yaml", "joserfc"} <= modules  # the scan sees them
    assert not _unprovided(modules, requirements)


#: The extension's modules for an optional extra, and that extra: flask_obo imports without it.
OPTIONAL_MODULES = {"azure_credentials.py": "azure", "tracing.py": "otel"}


def test_the_install_requires_alone_cover_what_the_extension_imports() -> None:
    """All but the modules of an optional extra (``OPTIONAL_MODULES``), which need it too."""
    setup = _setup_cfg()
    install_requires = _lines(setup["options"]["install_requires"])
    required = [path for path in (ROOT / "flask_obo").rglob("*.py") if path.name not in OPTIONAL_MODULES]
    modules = _third_party_imports_of(*required)
    assert {"flask", "msal", "redis", "authlib"} <= modules
    assert not _unprovided(modules, install_requires)
    for name, extra in OPTIONAL_MODULES.items():
        imports = _third_party_imports_of(ROOT / "flask_obo" / name)
        assert _unprovided(imports, install_requires), name  # optional indeed
        assert not _unprovided(imports, [*install_requires, *_lines(setup["options.extras_require"][extra])])


def test_the_server_extra_covers_what_the_reference_api_imports() -> None:
    """The Dockerfile's api target installs exactly these for app/, wsgi.py and config/."""
    setup = _setup_cfg()
    modules = _third_party_imports("app", "config") | _third_party_imports_of(ROOT / "wsgi.py")
    assert {"flask_cors", "gunicorn"} <= modules
    assert not _unprovided(modules, [*_lines(setup["options"]["install_requires"]),
                                     *_lines(setup["options.extras_require"]["server"])])


def test_the_devtenant_extra_alone_covers_what_the_dev_tenant_imports() -> None:
    """Whatever the API's own requirements become, ``.[devtenant]`` states the dev tenant's."""
    modules = _third_party_imports("devtenant")
    assert {"flask", "authlib", "joserfc", "cryptography"} <= modules
    assert not _unprovided(modules, _lines(_setup_cfg()["options.extras_require"]["devtenant"]))
    # negative control: the check does fail on a requirement that is missing
    assert _unprovided({"fakeredis"}, _lines(_setup_cfg()["options.extras_require"]["devtenant"]))
