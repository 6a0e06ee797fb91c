"""The packaging, built for real: ``pip install .`` installs the extension, ``flask_obo``,
alone (not the reference API's ``app``, a name that would collide with users' own; no dev
tenant, with its published client secret; no tests; no test tools). Its requirements cover
what it imports, ``.[server]`` adds what the reference API needs, and ``.[dev]`` (what ``make
run`` and ``make test`` install) covers everything the tests, the dev tenant and
``scripts/run_local.py`` import. The dev tenant's requirements are flask-obo-devtenant's
(``devtenant-dist/pyproject.toml``): flask-obo has no ``devtenant`` extra.

The release, as ``make dist`` makes it: ``python -m build`` of a copy of the checkout (so no
build/ or egg-info lands in the working tree) gives flask-obo's sdist and wheel and
flask-obo-devtenant's; ``twine check --strict`` accepts all four; the version is
``flask_obo.__version__`` and CHANGELOG.md's top entry. A fresh virtualenv with the wheels
(and ``[server]``), away from the checkout, runs the README's own-API example against the dev
tenant, and an adopter's documented test with the dev tenant's pytest plugin.
"""

from __future__ import annotations

import ast
import configparser
import email
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import flask_obo
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
def distributions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``make dist``'s builds, of a copy of the checkout: ``python -m build`` of flask-obo
    (sdist and wheel, the wheel built from the sdist) and of flask-obo-devtenant.

    Built without build isolation (the virtualenv's setuptools, no network), so the test
    takes seconds; ``make dist`` builds with isolation."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "checkout"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    # a stale build/lib from an earlier local build must not matter either: none is copied
    assert not (source / "build").exists()
    built: dict[str, Path] = {}
    for project, out in ((source, tmp / "dist"), (source / "devtenant-dist", tmp / "devtenant-dist")):
        result = subprocess.run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(project)],
            cwd=tmp, capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        for path in out.iterdir():
            name = path.name.split("-")[0].replace("_", "-")
            built[f"{name} {'wheel' if path.suffix == '.whl' else 'sdist'}"] = path
    assert sorted(built) == ["flask-obo sdist", "flask-obo wheel",
                             "flask-obo-devtenant sdist", "flask-obo-devtenant wheel"], built
    return built


@pytest.fixture(scope="module")
def wheel(distributions: dict[str, Path]) -> Path:
    return distributions["flask-obo wheel"]


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
    extras = set(meta.get_all("Provides-Extra") or [])
    assert extras >= {"azure", "dev", "otel", "server"}
    assert "devtenant" not in extras  # the dev tenant is flask-obo-devtenant, with its own requirements

    def extra(name: str) -> set[str]:
        return {canonicalize_name(r.name) for r in requires
                if r.marker is not None and r.marker.evaluate({"extra": name})}

    assert extra("dev") >= TEST_TOOLS
    assert PROJECT in extra("dev")  # .[dev] pulls in .[server,otel,azure] (a self-reference)
    assert any(canonicalize_name(r.name) == PROJECT and r.extras == {"azure", "otel", "server"}
               for r in requires)
    assert extra("azure") == {"azure-core"}


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


def test_flask_obo_devtenant_alone_covers_what_the_dev_tenant_imports() -> None:
    """Whatever flask-obo's own requirements become, flask-obo-devtenant's state what the
    dev tenant's server and its pytest plugin import (the Dockerfile's devtenant target
    and adopters install it alone)."""
    project = tomllib.loads((ROOT / "devtenant-dist" / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"]
    modules = _third_party_imports_of(*(ROOT / "devtenant").glob("*.py")) - {"devtenant"}
    assert {"flask", "authlib", "joserfc", "cryptography", "pytest"} <= modules
    assert not _unprovided(modules, requirements)
    # negative control: the check does fail on a requirement that is missing
    assert _unprovided({"fakeredis"}, requirements)


# --- the release: make dist, twine, the version, a clean install -------------------------


def _changelog_versions() -> list[str]:
    """The released versions of CHANGELOG.md's entries, newest first (not [Unreleased])."""
    return re.findall(r"^## \[(\d[^\]]*)\] - \d{4}-\d{2}-\d{2}$", (ROOT / "CHANGELOG.md").read_text(), re.M)


def test_the_version_is_single_sourced_and_the_changelogs_top_entry() -> None:
    assert _setup_cfg()["metadata"]["version"].strip() == "attr: flask_obo.__version__"
    assert _changelog_versions()[0] == flask_obo.__version__
    assert metadata.version(PROJECT) == flask_obo.__version__  # this checkout's install says the same
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()  # Keep a Changelog's shape


def test_make_dist_builds_distributions_that_twine_accepts(distributions: dict[str, Path]) -> None:
    assert distributions["flask-obo wheel"].name == f"flask_obo-{flask_obo.__version__}-py3-none-any.whl"
    assert distributions["flask-obo sdist"].name == f"flask_obo-{flask_obo.__version__}.tar.gz"
    result = _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, distributions.values())],
                  timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 4
    meta = _wheel_metadata(distributions["flask-obo wheel"])
    assert meta["Version"] == flask_obo.__version__
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().lstrip().startswith("# flask-obo")  # the README is the description


def test_make_dist_is_what_the_makefile_runs() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\ndist:"):].split("\n\n")[0]
    assert "-m build --outdir dist ." in recipe
    assert "-m build --outdir devtenant-dist/dist devtenant-dist" in recipe
    assert "twine check --strict dist/* devtenant-dist/dist/*" in recipe


def test_the_sdist_holds_the_package_and_its_documents(distributions: dict[str, Path]) -> None:
    with tarfile.open(distributions["flask-obo sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    tops = {name.split("/")[0] for name in names}
    assert tops == {"flask_obo", "flask_obo.egg-info", "CHANGELOG.md", "LICENSE", "MANIFEST.in", "PKG-INFO",
                    "README.md", "pyproject.toml", "setup.cfg"}, tops
    assert "flask_obo/py.typed" in names


def test_the_devtenant_distribution_holds_the_dev_tenant_and_its_plugin(distributions: dict[str, Path]
                                                                        ) -> None:
    with zipfile.ZipFile(distributions["flask-obo-devtenant wheel"]) as archive:
        names = archive.namelist()
        tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
        assert tops == {"devtenant"}
        shipped = {name.split("/", 1)[1] for name in names if name.startswith("devtenant/")}
        assert shipped == {p.name for p in (ROOT / "devtenant").iterdir() if p.suffix in {".py", ".json"}}
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "[pytest11]\ndevtenant = devtenant.pytest_plugin" in archive.read(entry_points).decode()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [Requirement(line) for line in
                    email.message_from_bytes(archive.read(meta)).get_all("Requires-Dist") or []]
    # What every module of the dev tenant imports, its plugin's included, is required.
    modules = _third_party_imports("devtenant")
    assert {"flask", "authlib", "pytest", "requests"} <= modules
    assert not _unprovided(modules, [str(r) for r in requires])


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def clean_install(distributions: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with flask-obo's wheel and its ``server`` extra, and
    flask-obo-devtenant's wheel, installed as an adopter would (dependencies from the
    index, through pip's cache); returns its python."""
    env_dir = tmp_path_factory.mktemp("clean") / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    wheels = [f"{distributions['flask-obo wheel']}[server]", str(distributions["flask-obo-devtenant wheel"])]
    result = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", *wheels],
                  timeout=900, cwd=env_dir)
    if result.returncode != 0 and any(e in result.stdout + result.stderr for e in NETWORK_ERRORS):
        reason = "pip could not fetch the wheels' dependencies from the package index"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires it\n{result.stderr[-3000:]}")
        pytest.skip(reason)
    assert result.returncode == 0, result.stderr[-3000:]
    return python


@pytest.mark.e2e
def test_the_installed_wheel_runs_the_readme_example_against_the_dev_tenant(clean_install: Path, devtenant,
                                                                          tmp_path: Path) -> None:
    """From the clean install alone (no checkout on the path): the README's own-API example,
    under ``flask run``, against the dev tenant, Graph and the second API as the user."""
    from tests.e2e.test_readme_example import example_api

    code = "import flask_obo; print(flask_obo.__version__, flask_obo.__file__)"
    probe = _run([str(clean_install), "-I", "-c", code], cwd=tmp_path, timeout=60)
    version, location = probe.stdout.split()
    assert version == flask_obo.__version__ and location.startswith(str(clean_install.parents[1])), probe
    adele = devtenant.user_token("adele")
    with example_api(devtenant, tmp_path / "example", python=str(clean_install)) as api:
        assert api.get("/api/profile").status_code == 401
        profile = api.get("/api/profile", adele)
        assert profile.status_code == 200, profile.text
        assert profile.json()["name"] == "Adele Vance"
        tasks = api.get("/api/tasks", adele)
        assert tasks.status_code == 200, tasks.text
        assert tasks.json()["owner"] == profile.json()["oid"]
        assert devtenant.token_calls() == {"on_behalf_of": 1, "refresh_token": 1}
    assert str(ROOT) not in api.log.read_text()  # nothing ran from the checkout


@pytest.mark.e2e
def test_the_installed_plugin_runs_the_adopters_documented_test(clean_install: Path, tmp_path: Path) -> None:
    """An adopter's project: the documented test file alone, pytest from the clean install,
    the dev tenant and its fixtures from flask-obo-devtenant's wheel."""
    shutil.copy(ROOT / "tests/adopter/test_adopter_example.py", tmp_path / "test_my_api.py")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    result = _run([str(clean_install), "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_api.py"],
                  cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout
