"""Static checks of the shipped deployment files: docker-compose.yml, Dockerfile,
config/gunicorn.conf.py and config/nginx.conf (``nginx -t`` when nginx is installed).

Nothing here needs Docker: the compose file is validated against the Compose
Specification schema that check-jsonschema vendors, and the files are cross-checked
against each other (service names, ports, paths, secrets).
"""

from __future__ import annotations

import base64
import configparser
import fnmatch
import json
import multiprocessing
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from devtenant.api import DevTenant
from flask_obo import worker_state
from tests.deploy.conftest import (
    NGINX_CONF,
    ROOT,
    SPA_MOUNT,
    nginx_test_config,
    render_nginx_conf,
    stage_spa,
    world_traversable_dir,
)
from tests.support.servers import require_binary

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
GUNICORN_CONF = ROOT / "config" / "gunicorn.conf.py"
API_SERVICES = ("api-1", "api-2")
# A Fernet key is 32 bytes in url-safe base64: 43 characters and one '='.
FERNET_KEY = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}=")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", "", DOCKERFILE.read_text())
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def _all(dockerfile: list[tuple[str, str]], name: str) -> list[str]:
    return [args for word, args in dockerfile if word == name]


# --- docker-compose.yml ----------------------------------------------------------------


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )


def test_compose_file_validates_against_the_compose_specification() -> None:
    result = _check_compose(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("    image: redis:7-alpine\n", "    imagee: redis:7-alpine\n"),  # unknown key
        ('      - "8000:8080"\n      - "8444:8443"\n', "      12\n"),  # ports: 12 (wrong type)
    ],
    ids=["unknown-key", "ports-wrong-type"],
)
def test_compose_schema_check_rejects_a_broken_copy(tmp_path: Path, old: str, new: str) -> None:
    """Negative control: the validation above can fail."""
    text = COMPOSE_FILE.read_text()
    assert text.count(old) == 1, f"docker-compose.yml changed: {old!r} not found once"
    text = text.replace(old, new).replace("    ports:\n      12\n", "    ports: 12\n")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text)
    assert yaml.safe_load(text)  # still YAML: the schema, not the parser, rejects it
    result = _check_compose(broken)
    assert result.returncode != 0, result.stdout + result.stderr


def test_compose_has_the_whole_stack(compose: dict) -> None:
    assert {"redis", *API_SERVICES, "nginx", "devtenant"} <= set(compose["services"])


def test_redis_requires_the_password_from_the_environment(compose: dict) -> None:
    command = compose["services"]["redis"]["command"]
    assert "--requirepass" in command
    password = command[command.index("--requirepass") + 1]
    assert re.fullmatch(r"\$\{REDIS_PASSWORD(:\?[^}]*)?\}", password), password
    # the healthcheck's redis-cli must authenticate too
    assert compose["services"]["redis"]["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD")


@pytest.mark.parametrize("service", API_SERVICES)
def test_api_service_environment(compose: dict, service: str) -> None:
    api = compose["services"][service]
    env = api["environment"]
    redis_url = env["REDIS_URL"]
    assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD(:\?[^}]*)?\}@redis:6379/\d+", redis_url), redis_url
    # the key comes from the environment (.env), never from the file
    keys = env["TOKEN_CACHE_KEYS"]
    assert re.fullmatch(r"\$\{TOKEN_CACHE_KEYS(:\?[^}]*)?\}", keys), keys
    # it runs the image's CMD (gunicorn with the shipped config) unless it says otherwise
    command = api.get("command")
    if command is not None:
        words = command if isinstance(command, list) else shlex.split(command)
        assert words[0] == "gunicorn" and "config/gunicorn.conf.py" in words, words
    # the dev tenant it talks to is the one compose runs, and its CA is mounted where REQUESTS_CA_BUNDLE says
    devtenant = compose["services"]["devtenant"]["command"]
    public_url = devtenant[devtenant.index("--public-url") + 1]
    assert env["AZURE_AUTHORITY_HOST"] == public_url
    assert env["GRAPH_BASE_URL"] == f"{public_url}/v1.0"
    state_dir = devtenant[devtenant.index("--state-dir") + 1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in api["volumes"]}
    assert env["REQUESTS_CA_BUNDLE"] == f"{state_dir}/ca-bundle.pem"
    assert mounts[state_dir] in {v.split(":")[0] for v in compose["services"]["devtenant"]["volumes"]}


@pytest.mark.parametrize(
    ("service", "target"), [*((s, "api") for s in API_SERVICES), ("devtenant", "devtenant")]
)
def test_compose_builds_each_service_from_its_dockerfile_target(
    compose: dict, stages: dict[str, Stage], service: str, target: str
) -> None:
    """The API containers are the production image (no dev tenant, no test tools)."""
    build = compose["services"][service]["build"]
    assert isinstance(build, dict), f"{service}: `build: .` builds the Dockerfile's last stage"
    assert build["target"] == target and target in stages
    assert (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def test_devtenant_service_names_its_state_dir_for_every_command(compose: dict) -> None:
    """``docker compose exec devtenant python -m devtenant token adele`` must read the state
    ``serve`` writes; without DEVTENANT_STATE_DIR it would create a new tenant in its cwd."""
    service = compose["services"]["devtenant"]
    command = service["command"]
    state_dir = command[command.index("--state-dir") + 1]
    assert service["environment"]["DEVTENANT_STATE_DIR"] == state_dir
    assert state_dir in {v.split(":")[1] for v in service["volumes"]}


def _documented_compose_commands() -> list[str]:
    """The ``docker compose ...`` lines of docker-compose.yml's header and of the compose
    guide (docs/how-to/compose.md)."""
    header = [line.lstrip("# ") for line in COMPOSE_FILE.read_text().splitlines() if line.startswith("#")]
    guide = (ROOT / "docs" / "how-to" / "compose.md").read_text().splitlines()
    return [line.strip() for line in header + guide if "docker compose " in line and "`" not in line]


def test_documented_exec_commands_capture_without_a_terminal(compose: dict) -> None:
    """``$(docker compose exec ...)`` without -T gets a terminal, and the token a trailing CR."""
    captured = [m for line in _documented_compose_commands()
                for m in re.findall(r"\$\((docker compose exec [^)]*)\)", line)]
    assert captured, "the compose instructions no longer show how to get a token"
    for command in captured:
        words = shlex.split(command)
        assert "-T" in words[3:words.index("python")], command
        service = next(w for w in words[3:] if not w.startswith("-"))
        assert service in compose["services"], command


def test_documented_token_commands_use_the_served_tenant(compose: dict, tmp_path: Path) -> None:
    """Run each documented ``docker compose exec -T devtenant python -m devtenant token ...``
    as the container would (the service's environment, the volume at a local path, a
    working directory that is not the state dir): the token is signed by the key of the
    tenant ``serve`` runs, for the issuer the API trusts, and no second tenant appears."""
    from devtenant.state import ensure_state, record_server_url

    documented = sorted({m for line in _documented_compose_commands()
                         for m in re.findall(r"\$\((docker compose exec [^)]*devtenant token[^)]*)\)", line)})
    assert documented, "the compose instructions no longer show how to get a token"
    service = compose["services"]["devtenant"]
    serve = service["command"]
    container_state = serve[serve.index("--state-dir") + 1]
    public_url = serve[serve.index("--public-url") + 1]
    volume = tmp_path / "volume"  # what the devtenant-state volume holds after `serve`
    record_server_url(ensure_state(volume), public_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVTENANT_")}
    for key, value in service.get("environment", {}).items():
        env[key] = str(value).replace(container_state, str(volume))
    env["PYTHONPATH"] = str(ROOT)  # the image's WORKDIR holds devtenant/
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    api_env = compose["services"][API_SERVICES[0]]["environment"]
    trusted_issuer = f"{api_env['AZURE_AUTHORITY_HOST']}/{api_env['AZURE_TENANT_ID']}/v2.0"

    def token(argv: list[str], environ: dict[str, str]) -> tuple[dict, dict]:
        assert argv[:3] == ["python", "-m", "devtenant"], argv
        result = subprocess.run([sys.executable, *argv[1:]], cwd=workdir, env=environ,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        header, claims = (base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
                          for part in result.stdout.strip().split(".")[:2])
        return json.loads(header), json.loads(claims)

    for line in documented:
        words = shlex.split(line)
        argv = [w.replace(container_state, str(volume)) for w in words[words.index("python"):]]
        header, claims = token(argv, env)
        assert claims["iss"] == trusted_issuer, line
        assert header["kid"] == DevTenant(volume).active_kid(), line
        assert not (workdir / ".devtenant").exists(), line
    # negative control: without DEVTENANT_STATE_DIR, `token adele` makes a new tenant
    del env["DEVTENANT_STATE_DIR"]
    header, claims = token(["python", "-m", "devtenant", "token", "adele"], env)
    assert (workdir / ".devtenant").is_dir()
    assert header["kid"] != DevTenant(volume).active_kid()
    assert claims["iss"] != trusted_issuer


def test_compose_file_holds_no_fernet_key() -> None:
    text = COMPOSE_FILE.read_text()
    assert not FERNET_KEY.findall(text)
    # positive control for the pattern
    from cryptography.fernet import Fernet

    assert FERNET_KEY.findall(f"TOKEN_CACHE_KEYS: {Fernet.generate_key().decode()}")


def test_nginx_service_mounts_the_shipped_config_and_the_certificates(compose: dict) -> None:
    nginx = compose["services"]["nginx"]
    volumes = [v.split(":") for v in nginx["volumes"]]
    assert ["./config/nginx.conf", "/etc/nginx/nginx.conf", "ro"] in volumes
    conf = NGINX_CONF.read_text()
    tls_dirs = {str(Path(p).parent) for p in re.findall(r"^\s*ssl_certificate(?:_key)?\s+(\S+);", conf, re.M)}
    assert len(tls_dirs) == 1
    (tls_dir,) = tls_dirs
    source = next(v[0] for v in volumes if v[1] == tls_dir)
    assert source in {v.split(":")[0] for v in compose["services"]["devtenant"]["volumes"]}
    # the files nginx names are the ones the dev tenant writes into its state folder
    paths = DevTenant("/state").paths
    names = set(re.findall(r"^\s*ssl_certificate(?:_key)?\s+\S+/([^/;]+);", conf, re.M))
    assert names == {paths.server_cert.name, paths.server_key.name}


def test_nginx_serves_the_sample_spa_from_its_mount(compose: dict) -> None:
    """compose mounts spa/ where nginx.conf's SPA locations look, and those locations name
    files that spa/ has: the page, its script, the compose config and the msal-browser
    bundle the page loads (from node_modules: `npm ci` in spa/, with the lockfile's version)."""
    volumes = [v.split(":") for v in compose["services"]["nginx"]["volumes"]]
    assert ["./spa", SPA_MOUNT, "ro"] in volumes
    conf = NGINX_CONF.read_text()
    assert set(re.findall(r"^\s*root\s+(\S+);", conf, re.M)) == {SPA_MOUNT}
    (alias,) = re.findall(r"^\s*alias\s+(\S+);", conf, re.M)
    assert alias.startswith(f"{SPA_MOUNT}/")
    assert (ROOT / "spa" / alias.removeprefix(f"{SPA_MOUNT}/")).is_file()
    assert re.search(r"try_files /index\.html =404;", conf) and (ROOT / "spa" / "index.html").is_file()
    (scripts,) = re.findall(r"location ~ \^/\((app.*)\)\$ \{", conf)
    served = {name.replace("\\.", ".") for name in scripts.split("|")}
    page = (ROOT / "spa" / "index.html").read_text()
    loaded = set(re.findall(r'<script[^>]* src="([^"]+)"', page))
    assert served == loaded, "nginx serves exactly the scripts the page loads"
    assert (ROOT / "spa" / "app.js").is_file()
    lock = json.loads((ROOT / "spa" / "package-lock.json").read_text())
    assert "node_modules/@azure/msal-browser" in lock["packages"]


def test_the_compose_spa_config_matches_the_stack(compose: dict) -> None:
    """spa/config.compose.json: the dev tenant as compose names it (its --public-url), the
    SPA's client id and a redirect URI the dev tenant has registered for it, on nginx's
    published TLS port, where the API answers too (same origin)."""
    from devtenant import API_APP_ID_URI, API_SCOPE, SPA_CLIENT_ID, TENANT_ID

    config = json.loads((ROOT / "spa" / "config.compose.json").read_text())
    command = compose["services"]["devtenant"]["command"]
    public_url = command[command.index("--public-url") + 1]
    assert config["authority"] == f"{public_url}/{TENANT_ID}"
    assert config["knownAuthorities"] == [public_url.removeprefix("https://")]
    assert config["clientId"] == SPA_CLIENT_ID
    assert config["apiScope"] == f"{API_APP_ID_URI}/{API_SCOPE}"
    published = {str(p).split(":")[-1]: str(p).split(":")[-2] for p in compose["services"]["nginx"]["ports"]}
    assert config["redirectUri"] == f"https://localhost:{published['8443']}/"
    assert config["apiBaseUrl"] == config["redirectUri"].rstrip("/")
    directory = json.loads((ROOT / "devtenant" / "directory.json").read_text())
    spa_app = next(app for app in directory["applications"] if app["app_id"] == SPA_CLIENT_ID)
    assert config["redirectUri"] in spa_app["spa"]["redirectUris"]


def test_nginx_upstreams_and_ports_match_compose(compose: dict) -> None:
    conf = NGINX_CONF.read_text()
    upstream = re.search(r"upstream\s+\w+\s*\{(.*?)\}", conf, re.S)
    assert upstream
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", upstream.group(1), re.M)
    assert servers, "the upstream names no server"
    gunicorn_port = runpy.run_path(str(GUNICORN_CONF))["bind"].rsplit(":", 1)[1]
    for host, port in servers:
        assert host in compose["services"], f"nginx upstream {host} is not a compose service"
        assert port == gunicorn_port
        assert port in [str(p) for p in compose["services"][host].get("expose", [])]
    assert {host for host, _ in servers} == set(API_SERVICES)
    listens = set(re.findall(r"^\s*listen\s+(\d+)", conf, re.M))
    published = {str(p).rsplit(":", 1)[1] for p in compose["services"]["nginx"]["ports"]}
    assert published == listens


def _networks(service: dict) -> set[str]:
    """A service's networks; compose attaches one that names none to ``default``."""
    return set(service.get("networks") or ["default"])


def _members(compose: dict, network: str) -> set[str]:
    return {name for name, service in compose["services"].items() if network in _networks(service)}


@pytest.mark.parametrize("service", API_SERVICES)
def test_api_service_is_reachable_only_through_nginx(compose: dict, service: str) -> None:
    """gunicorn trusts the X-Forwarded-* headers and leaves slow clients to nginx: it binds
    all interfaces in its container, but nothing is published and its networks hold no
    client-facing service but nginx, on an internal one."""
    api = compose["services"][service]
    port = runpy.run_path(str(GUNICORN_CONF))["bind"].rsplit(":", 1)[1]
    assert "ports" not in api, api.get("ports")
    assert [str(p) for p in api["expose"]] == [port]
    assert api["environment"]["GUNICORN_BIND"] == f"0.0.0.0:{port}"
    networks = compose.get("networks") or {}
    proxy = [n for n in _networks(api) if (networks.get(n) or {}).get("internal") is True
             and _members(compose, n) == {*API_SERVICES, "nginx"}]
    assert proxy, "the API shares no internal network with nginx alone"
    for network in _networks(api) - set(proxy):  # the others: only the API's own backends
        assert _members(compose, network) - set(API_SERVICES) <= {"redis", "devtenant"}, network
    # what the API needs is on one of its networks
    for backend in ("redis", "devtenant"):
        assert _networks(api) & _networks(compose["services"][backend]), backend


def test_only_nginx_and_the_dev_tenant_publish_ports(compose: dict) -> None:
    published = {name for name, service in compose["services"].items() if service.get("ports")}
    assert published == {"nginx", "devtenant"}
    assert all(str(p).startswith("127.0.0.1:") for p in compose["services"]["devtenant"]["ports"])
    # nginx publishes through a network that is not internal (internal ones cannot)
    networks = compose.get("networks") or {}
    assert any(not (networks.get(n) or {}).get("internal") for n in _networks(compose["services"]["nginx"]))


@pytest.mark.parametrize("service", API_SERVICES)
def test_compose_lets_gunicorn_drain(compose: dict, service: str) -> None:
    """``docker compose stop`` sends SIGTERM, then SIGKILL after stop_grace_period (10 s by
    default); gunicorn drains for graceful_timeout, so the grace period must be longer."""
    graceful = runpy.run_path(str(GUNICORN_CONF))["graceful_timeout"]
    grace = compose["services"][service].get("stop_grace_period", "10s")
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(grace))
    assert match, grace
    seconds = int(match.group(1) or 0) * 60 + int(match.group(2) or 0)
    assert seconds > graceful


# --- Dockerfile --------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str  # an image, or the name of an earlier stage
    instructions: list[tuple[str, str]]


@pytest.fixture(scope="module")
def stages(dockerfile: list[tuple[str, str]]) -> dict[str, Stage]:
    """The Dockerfile's stages by name, in order (``FROM <image|stage> AS <name>``)."""
    result: dict[str, Stage] = {}
    for word, args in dockerfile:
        if word == "FROM":
            words = args.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"unnamed stage: FROM {args}"
            result[words[2]] = Stage(words[2], words[0], [])
        else:
            assert result, f"{word} before the first FROM"
            next(reversed(result.values())).instructions.append((word, args))
    return result


def _chain(stages: dict[str, Stage], name: str) -> list[tuple[str, str]]:
    """What a target's image is made of: its base stages' instructions, then its own."""
    stage = stages[name]
    inherited = _chain(stages, stage.base) if stage.base in stages else []
    return inherited + stage.instructions


def _copies(instructions: list[tuple[str, str]]) -> list[tuple[str | None, list[str]]]:
    """(--from stage or None, sources) of each COPY."""
    result = []
    for args in _all(instructions, "COPY"):
        words = json.loads(args) if args.startswith("[") else args.split()
        flags = [w for w in words if w.startswith("--")]
        origin = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        result.append((origin, [w for w in words if not w.startswith("--")][:-1]))
    return result


def test_dockerfile_uses_a_slim_python_base(stages: dict[str, Stage]) -> None:
    images = {stage.base for stage in stages.values() if stage.base not in stages}
    assert len(images) == 1, images  # every target from one base image
    (image,) = images
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", image), image
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["options"]["python_requires"].strip() == ">=3.11"


def test_dockerfile_has_an_api_and_a_devtenant_target(stages: dict[str, Stage]) -> None:
    assert {"api", "devtenant"} <= set(stages)
    # a plain `docker build .` builds the last stage: the production image
    assert list(stages)[-1] == "api"


@pytest.mark.parametrize("target", ["api", "devtenant"])
def test_dockerfile_targets_run_as_a_non_root_user(stages: dict[str, Stage], target: str) -> None:
    chain = _chain(stages, target)
    users = _all(chain, "USER")
    assert users, f"{target}: no USER, the container runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    # the numeric user is the one created
    assert any(f"--uid {user} " in args for args in _all(chain, "RUN")), "USER is not created"
    # and it is the last USER before CMD
    words = [w for w, _ in chain]
    assert words.index("CMD") > len(words) - 1 - words[::-1].index("USER")


def _extract_requirements(run: str, tmp_path: Path) -> set[str]:
    """Run a RUN's ``python -c ... > file && pip install -r file`` extraction on setup.cfg."""
    extract, _, rest = run.partition(" > ")
    requirements_file, _, install = rest.partition(" && ")
    assert f"pip install -r {requirements_file.strip()}" in install
    words = shlex.split(extract)
    assert words[:2] == ["python", "-c"]
    (tmp_path / "setup.cfg").write_text((ROOT / "setup.cfg").read_text())
    result = subprocess.run([sys.executable, "-c", words[2]], cwd=tmp_path, capture_output=True, text=True,
                            timeout=30, check=True)
    return {Requirement(line).name.lower() for line in result.stdout.splitlines() if line.strip()}


def _declared(section: str, key: str) -> set[str]:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    return {Requirement(line).name.lower() for line in setup[section][key].splitlines() if line.strip()}


@pytest.mark.parametrize(
    ("target", "section", "key"),
    [("api", "options", "install_requires"), ("api", "options.extras_require", "server"),
     ("devtenant", "options", "install_requires")],
)
def test_dockerfile_installs_the_dependencies_of_setup_cfg(
    stages: dict[str, Stage], tmp_path: Path, target: str, section: str, key: str
) -> None:
    """Run the Dockerfile's own requirement extraction on setup.cfg and compare."""
    runs = [args for args in _all(_chain(stages, target), "RUN") if f"['{key}']" in args]
    assert len(runs) == 1, f"{target}: no single RUN installing {section}/{key}"
    declared = _declared(section, key)
    assert declared and _extract_requirements(runs[0], tmp_path) == declared
    if key == "install_requires":
        assert {"flask", "msal", "redis"} <= declared
    if key == "server":
        assert {"gunicorn", "flask-cors"} <= declared


def test_api_image_holds_neither_the_dev_tenant_nor_the_test_tools(stages: dict[str, Stage]) -> None:
    """The production target copies no devtenant/ or tests/, installs no extra but
    ``server``, and gets the extension only as the project's wheel (whose contents
    test_packaging.py builds and checks) and the reference API from app/."""
    chain = _chain(stages, "api")
    text = " ".join(args for _, args in chain)
    assert "devtenant" not in text and "tests" not in text
    assert not re.search(r"\[(dev|devtenant)\]|\['(dev|devtenant)'\]|\s-e\s|--editable", text), text
    own = [sources for origin, sources in _copies(chain) if origin is None]
    assert ["app"] in own  # the reference API, from source
    forbidden = ("flask_obo", "devtenant", "tests", ".")
    assert all(not source.startswith(forbidden) for s in own for source in s), own
    wheels = [(origin, sources) for origin, sources in _copies(chain) if origin is not None]
    assert len(wheels) == 1, wheels
    origin, (source,) = wheels[0]
    build = _all(stages[origin].instructions, "RUN")
    wheel = rf"pip wheel --no-deps \S+ -w {re.escape(source)}"
    assert any(re.fullmatch(wheel, args) for args in build), build
    assert any(re.fullmatch(r"pip install --no-deps \S+\.whl( && .*)?", args) for args in _all(chain, "RUN"))
    # nothing else of the build stage (its copy of the build context) reaches the image
    assert "build" not in {stage.base for stage in stages.values()}


def test_devtenant_target_installs_the_flask_obo_devtenant_distribution(
    stages: dict[str, Stage], compose: dict
) -> None:
    """The compose stack's dev tenant is what adopters install: the flask-obo-devtenant
    wheel built from devtenant-dist/ (whose devtenant/ is a link to the repository's
    devtenant/, copied beside it so the link resolves), with its own dependencies; not
    flask-obo's old ``devtenant`` extra, not sources run from a folder."""
    chain = _chain(stages, "devtenant")
    text = " ".join(args for _, args in chain)
    assert not re.search(r"\[devtenant\]|\['devtenant'\]", text), text
    own = [source for origin, sources in _copies(chain) if origin is None for source in sources]
    assert not [source for source in own if "devtenant" in source], own  # no sources run from a folder
    ((origin, (wheels,)),) = [(o, s) for o, s in _copies(chain) if o is not None]
    builder = stages[origin].instructions
    copies = {words[0]: words[-1] for words in (args.split() for args in _all(builder, "COPY"))}
    # every link in devtenant-dist/ (devtenant/, LICENSE) resolves in the build stage too
    links = [path for path in (ROOT / "devtenant-dist").iterdir() if path.is_symlink()]
    assert {link.name for link in links} >= {"devtenant"}
    for link in links:
        target = link.resolve().relative_to(ROOT)
        assert str(target) in copies, f"{link.name} -> {target}: not copied beside devtenant-dist"
        assert (Path(copies["devtenant-dist"]).parent / target) == \
            (Path(copies["devtenant-dist"]) / os.readlink(link)).resolve(), copies
    assert f"pip wheel --no-deps {copies['devtenant-dist']} -w {wheels}" in _all(builder, "RUN")
    (copied,) = [args.split()[-1] for args in _all(chain, "COPY") if args.startswith(f"--from={origin} ")]
    assert any(re.fullmatch(rf"pip install {re.escape(copied)}/\*\.whl( && .*)?", args)
               for args in _all(stages["devtenant"].instructions, "RUN"))  # with its dependencies
    project = tomllib.loads((ROOT / "devtenant-dist" / "pyproject.toml").read_text())["project"]
    assert project["name"] == "flask-obo-devtenant" and project["dependencies"]
    (cmd,) = _all(stages["devtenant"].instructions, "CMD")
    assert json.loads(cmd)[:4] == ["python", "-m", "devtenant", "serve"]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(_all(chain, "ENV"))))
    service = compose["services"]["devtenant"]
    assert env["DEVTENANT_STATE_DIR"] == service["environment"]["DEVTENANT_STATE_DIR"]


def test_dockerfile_copies_only_files_in_the_build_context(dockerfile: list[tuple[str, str]]) -> None:
    ignored = [p.strip().rstrip("/") for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    missing, excluded = [], []
    for origin, sources in _copies(dockerfile):
        if origin is not None:  # from another stage, not from the build context
            continue
        for source in sources:
            if not (ROOT / source).exists():
                missing.append(source)
            if any(fnmatch.fnmatch(source, pattern) for pattern in ignored):
                excluded.append(source)
    assert not missing, f"COPY sources missing from the build context: {missing}"
    assert not excluded, f"COPY sources excluded by .dockerignore: {excluded}"


def test_dockerignore_keeps_stale_build_output_out_of_the_wheel() -> None:
    """The build stage runs ``pip wheel`` on the build context: a local build/ (setuptools
    packs build/lib as found, an old devtenant/ included) or egg-info must not be in it."""
    ignored = {p.strip().rstrip("/") for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")}
    assert {"build", "dist", "*.egg-info", ".env", ".venv", ".devtenant", "tests"} <= ignored


def test_dockerfile_copies_what_cmd_and_healthcheck_need(stages: dict[str, Stage]) -> None:
    api = stages["api"].instructions
    (cmd,) = _all(api, "CMD")
    assert json.loads(cmd) == ["gunicorn", "--config", "config/gunicorn.conf.py", "wsgi:app"]
    copied = {source for origin, sources in _copies(api) if origin is None for source in sources}
    assert {"config", "wsgi.py"} <= copied  # app/ comes in the wheel
    assert (ROOT / "config/gunicorn.conf.py").is_file() and (ROOT / "wsgi.py").is_file()


def test_dockerfile_healthcheck_probes_healthz(stages: dict[str, Stage]) -> None:
    (health,) = _all(stages["api"].instructions, "HEALTHCHECK")
    port = runpy.run_path(str(GUNICORN_CONF))["bind"].rsplit(":", 1)[1]
    assert re.search(rf"http://(127\.0\.0\.1|localhost):{port}/healthz\b", health), health
    assert "CMD" in health.split()
    assert "--timeout=" in health and "--interval=" in health


# --- config/gunicorn.conf.py ---------------------------------------------------------------


@pytest.fixture
def gunicorn_conf(monkeypatch: pytest.MonkeyPatch):
    for name in ("GUNICORN_WORKERS", "GUNICORN_THREADS", "GUNICORN_TIMEOUT", "GUNICORN_GRACEFUL_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)

    def load(cores: int | None = None) -> dict:
        if cores is not None:
            monkeypatch.setattr(multiprocessing, "cpu_count", lambda: cores)
        return runpy.run_path(str(GUNICORN_CONF))

    return load


def test_gunicorn_uses_gthread_sized_from_the_cpu_count(gunicorn_conf) -> None:
    conf = gunicorn_conf()
    assert conf["worker_class"] == "gthread"
    cores = multiprocessing.cpu_count()
    assert conf["workers"] == max(2, cores)
    assert conf["threads"] >= cores
    same = gunicorn_conf(cores)  # the defaults are what this many cores gives
    assert (same["workers"], same["threads"]) == (conf["workers"], conf["threads"])
    small, large = gunicorn_conf(1), gunicorn_conf(8)
    assert small["workers"] == 2  # at least two, even on one core
    assert large["workers"] == 8  # one per core
    assert 1 <= small["threads"] < large["threads"]


def test_gunicorn_sizes_can_be_overridden(gunicorn_conf, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUNICORN_WORKERS", "7")
    monkeypatch.setenv("GUNICORN_THREADS", "3")
    conf = gunicorn_conf(16)
    assert (conf["workers"], conf["threads"]) == (7, 3)


def test_gunicorn_timeouts(gunicorn_conf) -> None:
    conf = gunicorn_conf()
    assert isinstance(conf["timeout"], int) and conf["timeout"] > 0
    assert isinstance(conf["graceful_timeout"], int) and conf["graceful_timeout"] > 0
    # nginx waits longer for an answer than gunicorn lets a worker be silent
    read_timeout = re.search(r"^\s*proxy_read_timeout\s+(\d+)s;", NGINX_CONF.read_text(), re.M)
    assert read_timeout and int(read_timeout.group(1)) > conf["timeout"]


def test_gunicorn_access_log_holds_no_credentials_or_query_string(gunicorn_conf) -> None:
    fmt = gunicorn_conf()["access_log_format"]
    assert "authorization" not in fmt.lower()
    for atom in ("%(q)s", "%(r)s", "%({cookie}i)s"):  # query string; request line (has the query)
        assert atom not in fmt
    # only the documented request headers: the user agent and the request id
    headers = {h.lower() for h in re.findall(r"%\(\{([^}]+)\}i\)s", fmt)}
    assert headers <= {"x-request-id", "user-agent"}, headers


def test_gunicorn_binds_loopback_unless_told(gunicorn_conf, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only nginx may reach gunicorn (forwarded headers, slow clients): loopback by default."""
    monkeypatch.delenv("GUNICORN_BIND", raising=False)
    assert gunicorn_conf()["bind"] == "127.0.0.1:8000"
    monkeypatch.setenv("GUNICORN_BIND", "0.0.0.0:8000")  # what docker-compose.yml sets
    assert gunicorn_conf()["bind"] == "0.0.0.0:8000"


def test_gunicorn_logs_access_through_the_sanitising_logger(gunicorn_conf) -> None:
    from gunicorn.config import Config

    from app.gunicorn_logging import SanitisingLogger

    cfg = Config()
    cfg.set("logger_class", gunicorn_conf()["logger_class"])
    assert cfg.logger_class is SanitisingLogger  # resolved as gunicorn resolves it


def test_gunicorn_metrics_directory_hooks(gunicorn_conf, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    """An operator's PROMETHEUS_MULTIPROC_DIR loses an earlier run's files at start (its
    counts are not this run's); a worker that exits keeps its counters in the sums and
    loses only its live gauges (prometheus_client's mark_process_dead). Read as plain
    Python, the file sets no directory (the end-to-end tests cover gunicorn's own run)."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    conf = gunicorn_conf()
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    stale = [tmp_path / name for name in ("counter_11.db", "histogram_11.db", "gauge_livesum_11.db")]
    other = tmp_path / "notes.txt"
    for path in (*stale, other):
        path.write_bytes(b"")
    # on_starting also shares the workers' view of Entra ID and Redis: restored after the
    # test, so no other test's stores share this process's.
    monkeypatch.setattr(worker_state, "_pace", None)
    monkeypatch.setattr(worker_state, "_redis_health", None)
    conf["on_starting"](None)
    assert not any(path.exists() for path in stale) and other.exists()
    assert worker_state.entra_pace() is worker_state.entra_pace()  # one, shared (share_across_workers)
    assert worker_state.redis_health() is worker_state.redis_health()

    kept = [tmp_path / name for name in ("counter_77.db", "histogram_77.db")]
    live = tmp_path / "gauge_livesum_77.db"
    for path in (*kept, live):
        path.write_bytes(b"")
    conf["child_exit"](None, type("Worker", (), {"pid": 77})())
    assert all(path.exists() for path in kept) and not live.exists()


# --- config/nginx.conf -------------------------------------------------------------------


def test_nginx_access_log_holds_no_credentials_or_query_string() -> None:
    conf = NGINX_CONF.read_text()
    formats = dict(re.findall(r"^\s*log_format\s+(\w+)\s+(.*?);", conf, re.M | re.S))
    assert formats, "no log_format: nginx would use 'combined', which logs $request"
    for fmt in formats.values():
        for variable in (r"\$http_authorization", r"\$request\b", r"\$request_uri", r"\$args",
                         r"\$arg_", r"\$query_string", r"\$is_args", r"\$http_cookie", r"\$request_body"):
            assert not re.search(variable, fmt), f"log_format uses {variable}"
    # every access_log names one of these formats (no implicit 'combined')
    for args in re.findall(r"^\s*access_log\s+([^;]+);", conf, re.M):
        words = args.split()
        assert words == ["off"] or (len(words) >= 2 and words[1] in formats), args


def _server_blocks(conf: str) -> list[str]:
    """The bodies of nginx.conf's ``server { ... }`` blocks (braces in quotes skipped)."""
    bodies = []
    for match in re.finditer(r"^\s*server\s*\{", conf, re.M):
        depth, quote, i = 1, None, match.end()
        while depth:
            char = conf[i]
            if quote:
                quote = None if char == quote else quote
            elif char in "'\"":
                quote = char
            elif char in "{}":
                depth += 1 if char == "{" else -1
            i += 1
        bodies.append(conf[match.end():i - 1])
    return bodies


def _directives(body: str, name: str) -> list[str]:
    return [args.strip() for args in re.findall(rf"^\s*{name}\s+([^;]*);", body, re.M)]


def test_nginx_answers_only_the_hosts_it_names() -> None:
    """Unknown hosts reach a default server that answers nothing (444) and refuses TLS
    handshakes; the API's servers name their hosts, and pass only those upstream."""
    conf = re.sub(r"(?m)^\s*#.*$", "", NGINX_CONF.read_text())
    servers = _server_blocks(conf)
    defaults = [s for s in servers if any("default_server" in a for a in _directives(s, "listen"))]
    assert len(defaults) == 1, "one default server for every port"
    (default,) = defaults
    assert {a.split()[0] for a in _directives(default, "listen")} == {"8080", "8443"}
    assert _directives(default, "return") == ["444"]
    assert _directives(default, "ssl_reject_handshake") == ["on"]
    assert "proxy_pass" not in default
    for server in (s for s in servers if s is not default):
        (names,) = _directives(server, "server_name")
        assert names and not re.search(r"(^|\s)(_|~|\*|\.)", names), names  # no catch-all, wildcard, regex
    # upstream, the host is always one nginx matched, never what the client sent
    headers = dict(a.split(None, 1) for a in _directives(conf, "proxy_set_header"))
    assert headers["Host"] == headers["X-Forwarded-Host"] == "$host"
    # set once, for the whole server: a location setting any would drop them all
    assert len(headers) == len(_directives(conf, "proxy_set_header"))
    assert not re.search(r"\$http_(host|x_forwarded)", conf)


@pytest.mark.nginx
def test_nginx_accepts_the_rendered_config(tmp_path: Path) -> None:
    binary = require_binary("nginx")
    state = tmp_path / "state"
    tenant = DevTenant(state)
    tenant.ensure_state()
    run_dir = world_traversable_dir("flask-obo-nginx-t-")
    try:
        conf = tmp_path / "nginx.conf"
        conf.write_text(render_nginx_conf(
            NGINX_CONF.read_text(), upstreams=["127.0.0.1:1", "127.0.0.1:2"], http_port=1, tls_port=2,
            cert=tenant.paths.server_cert, key=tenant.paths.server_key, run_dir=run_dir, log_dir=tmp_path,
            spa_dir=stage_spa(run_dir),
        ))
        result = nginx_test_config(binary, conf, run_dir)
        assert result.returncode == 0, result.stderr
        assert "test is successful" in result.stderr
        # negative control: nginx -t does reject a broken copy
        conf.write_text(conf.read_text().replace("proxy_read_timeout", "proxy_read_timeoutt", 1))
        assert nginx_test_config(binary, conf, run_dir).returncode != 0
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
