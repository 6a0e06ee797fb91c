"""deploy/k8s/: every Kubernetes object validates against the Kubernetes 1.30 schemas
(``kubernetes-validate``, strict: an unknown or misspelt field fails; its schemas ship with
the package, no network), kustomize's patch files parse and name what they patch, and every
environment variable the manifests give the API is a setting it knows, read from the code
that defines the settings (not from a list here). Then what a cluster would notice: probes,
non-root read-only containers whose writable paths are volumes, a grace period above
gunicorn's, workload identity, secrets by reference only, nginx's configuration in step with
config/nginx.conf and accepted by a real ``nginx -t``. With kubectl (built-in kustomize), each
overlay is rendered and its output validated too.
"""

from __future__ import annotations

import ast
import copy
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography.fernet import Fernet

from flask_obo import Settings
from tests.deploy.conftest import NGINX_CONF, ROOT, nginx_test_config
from tests.support.servers import require_binary

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"
KUSTOMIZATIONS = sorted(K8S.rglob("kustomization.yaml"))
OVERLAYS = sorted(path.parent for path in K8S.glob("overlays/*/kustomization.yaml"))
SETTINGS_CONFIGMAP = "flask-obo-settings"
# Where the names the API reads from its environment are defined: the settings, the rest
# of the extension, the reference API, its WSGI entry point and gunicorn's configuration.
SETTINGS_SOURCES = [*sorted((ROOT / "flask_obo").glob("*.py")), *sorted((ROOT / "app").glob("*.py")),
                    ROOT / "wsgi.py", ROOT / "config" / "gunicorn.conf.py"]
SETTING_NAME = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$")
SECRET_NAMES = re.compile(r"SECRET|PASSWORD|KEYS?$|^REDIS_URL$|TOKEN$")


# --- reading the tree ----------------------------------------------------------------------


def _load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _kustomization(path: Path) -> dict[str, Any]:
    (doc,) = _load_all(path)
    return doc


def _listed(kustomization: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(resource files, patch files, generator files) a kustomization names, as paths."""
    doc = _kustomization(kustomization)
    base = kustomization.parent
    resources = [base / item for item in doc.get("resources", [])]
    patches = [base / (item["path"] if isinstance(item, dict) else item)
               for item in [*doc.get("patches", []), *doc.get("patchesStrategicMerge", [])]
               if not isinstance(item, dict) or "path" in item]
    generated = [base / name.split("=")[-1] for generator in doc.get("configMapGenerator", [])
                 for name in generator.get("files", [])]
    return resources, patches, generated


def _resource_files() -> list[Path]:
    return sorted({path for k in KUSTOMIZATIONS for path in _listed(k)[0] if path.is_file()})


def _patch_files() -> list[Path]:
    return sorted({path for k in KUSTOMIZATIONS for path in _listed(k)[1]})


def _objects() -> list[dict[str, Any]]:
    return [doc for path in _resource_files() for doc in _load_all(path)]


def _find(kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [o for o in _objects()
                if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return found


def _deployment() -> dict[str, Any]:
    return _find("Deployment", "flask-obo")


def _container(name: str) -> dict[str, Any]:
    (found,) = [c for c in _deployment()["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def _settings_data(*overlay_patches: Path) -> dict[str, str]:
    """The settings ConfigMap's data, with these patches' data merged over it."""
    data = dict(_find("ConfigMap", SETTINGS_CONFIGMAP)["data"])
    for patch in overlay_patches:
        for doc in _load_all(patch):
            if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
                data.update(doc.get("data", {}))
    return data


# --- the tree is complete and every object validates ------------------------------------------


def test_every_file_is_a_resource_a_patch_or_a_generators_input() -> None:
    assert KUSTOMIZATIONS and len(OVERLAYS) >= 2
    named: set[Path] = set(KUSTOMIZATIONS)
    for kustomization in KUSTOMIZATIONS:
        resources, patches, generated = _listed(kustomization)
        for path in [*resources, *patches, *generated]:
            assert path.exists(), f"{kustomization.relative_to(ROOT)} names a missing {path}"
        named |= {p.resolve() for p in [*patches, *generated, *resources] if p.is_file()}
    on_disk = {p.resolve() for p in K8S.rglob("*") if p.is_file()}
    assert on_disk <= named | {p.resolve() for p in KUSTOMIZATIONS}, on_disk - named


def test_the_kubernetes_schemas_ship_with_kubernetes_validate() -> None:
    """Offline: the schemas of this version are files of the package itself."""
    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    assert (schemas / f"v{KUBERNETES_VERSION}-local-strict" / "deployment-apps-v1.json").is_file()


@pytest.mark.parametrize("path", _resource_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_object_validates_against_the_kubernetes_schemas(path: Path) -> None:
    for doc in _load_all(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_validation_fails_on_a_misspelt_field() -> None:
    """The check above can fail: strict mode refuses a field Kubernetes does not have."""
    broken = copy.deepcopy(_deployment())
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 40
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", _patch_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_patch_parses_and_names_what_it_patches(path: Path) -> None:
    targets = {(o["kind"], o["metadata"]["name"]) for o in _objects()}
    for doc in _load_all(path):
        if isinstance(doc, list):  # a JSON patch (RFC 6902)
            assert all({"op", "path"} <= set(op) for op in doc), doc
        else:  # a strategic merge patch: a partial object, so only its identity is checked
            assert (doc["kind"], doc["metadata"]["name"]) in targets, doc["metadata"]


# --- the settings they set are settings the API knows ---------------------------------------------


def _module_strings(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "TEXT"`` constants."""
    return {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def known_setting_names() -> tuple[set[str], set[str]]:
    """(names, prefixes) the code reads: every call whose first argument is an upper-case
    name (``env.redis_url("REDIS_URL")``, ``os.environ.get("GUNICORN_BIND")``, also through a
    module constant), and the prefixes of families (``DOWNSTREAM_APIS__``)."""
    names: set[str] = set()
    prefixes: set[str] = set()
    for path in SETTINGS_SOURCES:
        tree = ast.parse(path.read_text())
        constants = _module_strings(tree)
        prefixes |= {value for name, value in constants.items()
                     if name.endswith("_PREFIX") and value.endswith("__")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args:
                first = node.args[0]
                value = (first.value if isinstance(first, ast.Constant) else
                         constants.get(first.id) if isinstance(first, ast.Name) else None)
                if isinstance(value, str) and SETTING_NAME.match(value):
                    names.add(value)
    return names, prefixes


def _known(name: str, names: set[str], prefixes: set[str]) -> bool:
    return name in names or any(name.startswith(prefix) for prefix in prefixes)


def _environment_names() -> set[str]:
    """Every variable the manifests set: containers' env, and the settings ConfigMap's keys
    (the API's envFrom), the patches' included."""
    found: set[str] = set()
    for path in [*_resource_files(), *_patch_files()]:
        for doc in _load_all(path):
            if not isinstance(doc, dict):
                continue
            if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == SETTINGS_CONFIGMAP:
                found |= set(doc["data"])
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                found |= {item["name"] for item in container.get("env", [])}
    return found


def test_the_known_names_come_from_the_code() -> None:
    names, prefixes = known_setting_names()
    assert {"AZURE_TENANT_ID", "REDIS_URL", "REDIS_SENTINELS", "TOKEN_CACHE_KEYS",
            "AZURE_FEDERATED_TOKEN_FILE", "AUTHORITY_CACHE_DIR", "GUNICORN_GRACEFUL_TIMEOUT",
            "PROMETHEUS_MULTIPROC_DIR"} <= names
    assert "DOWNSTREAM_APIS__" in prefixes
    assert not _known("REDIS_URLS", names, prefixes)  # a misspelt one is not
    assert not _known("GET", names, prefixes)


def test_every_environment_variable_the_manifests_set_is_a_known_setting() -> None:
    names, prefixes = known_setting_names()
    used = _environment_names()
    assert {"REDIS_URL", "TOKEN_CACHE_KEYS", "REDIS_SENTINELS", "REDIS_SENTINEL_PASSWORD"} <= used
    unknown = sorted(name for name in used if not _known(name, names, prefixes))
    assert not unknown, f"not settings of the API: {unknown}"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_each_overlays_settings_are_valid_settings(overlay: Path, tmp_path: Path) -> None:
    """The settings as a pod would get them (the ConfigMap, the Secret's keys with stand-in
    values, the token file the workload identity webhook projects) pass ``Settings``."""
    patches = _listed(overlay / "kustomization.yaml")[1]
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text("eyJ.stand-in.token")
    secrets = {"REDIS_URL": "redis://:stand-in@mymaster/0" if "sentinel" in overlay.name
               else "rediss://:stand-in@redis.example.com:6380/0",
               "TOKEN_CACHE_KEYS": Fernet.generate_key().decode(), "REDIS_SENTINEL_PASSWORD": "stand-in",
               "AZURE_FEDERATED_TOKEN_FILE": str(token_file)}
    settings = Settings.from_env({**_settings_data(*patches), **secrets})
    assert settings.redis_url and settings.token_cache_keys
    assert bool(settings.redis_sentinels) == ("sentinel" in overlay.name)
    assert settings.authority_cache_dir == "/var/cache/flask-obo/authority"


# --- what a cluster would notice -------------------------------------------------------------------


def _mounted(container: dict[str, Any], path: str) -> bool:
    return any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
               for m in container.get("volumeMounts", []))


def test_the_api_is_probed_on_healthz_and_readyz() -> None:
    api = _container("api")
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["port"] == "gunicorn"
    assert _container("nginx")["readinessProbe"]["httpGet"]["path"] == "/readyz"  # end to end
    for container in (api, _container("nginx")):
        assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]


def test_containers_are_non_root_on_read_only_filesystems_and_write_only_to_volumes() -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
        assert context["runAsUser"] != 0
    data = _settings_data()
    api = _container("api")
    # What the API writes: tempfile's directory, the authority's disk cache, prometheus's
    # multiprocess files and gunicorn's heartbeats.
    for path in ("/tmp", data["AUTHORITY_CACHE_DIR"], data["PROMETHEUS_MULTIPROC_DIR"],
                 data["GUNICORN_WORKER_TMP_DIR"]):
        assert _mounted(api, path), path
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert all("emptyDir" in volumes[m["name"]] or "configMap" in volumes[m["name"]]
               for c in pod["containers"] for m in c["volumeMounts"])
    nginx_conf = (K8S / "base" / "nginx.conf").read_text()
    nginx_writes = ["/tmp/nginx.pid", *re.findall(r"_temp_path (\S+);", nginx_conf)]
    assert len(nginx_writes) == 6 and all(_mounted(_container("nginx"), p) for p in nginx_writes)


@functools.cache
def _gunicorn_default_graceful_timeout() -> int:
    """gunicorn.conf.py's own value, by running it as tools do (no GUNICORN_* override)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUNICORN_")}
    code = "import runpy; print(runpy.run_path('config/gunicorn.conf.py')['graceful_timeout'])"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


def test_the_grace_period_covers_gunicorns_graceful_timeout() -> None:
    graceful = int(_settings_data().get("GUNICORN_GRACEFUL_TIMEOUT", _gunicorn_default_graceful_timeout()))
    assert graceful == _gunicorn_default_graceful_timeout()  # the ConfigMap states gunicorn's own value
    pod = _deployment()["spec"]["template"]["spec"]
    for container in pod["containers"]:
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        # the preStop sleep (endpoints removed), then SIGTERM and the drain, with a margin
        assert pod["terminationGracePeriodSeconds"] > pre_stop + graceful, container["name"]


def test_workload_identity_is_ready() -> None:
    account = _find("ServiceAccount", "flask-obo")
    assert "azure.workload.identity/client-id" in account["metadata"]["annotations"]
    template = _deployment()["spec"]["template"]
    assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
    names, _ = known_setting_names()
    assert "AZURE_FEDERATED_TOKEN_FILE" in names  # what the webhook sets, the API reads


def test_secrets_are_referenced_never_written() -> None:
    assert not [o for o in _objects() if o["kind"] == "Secret"]
    assert not [name for name in _settings_data() if SECRET_NAMES.search(name)]
    for path in [*_resource_files(), *_patch_files()]:
        for doc in _load_all(path):
            pod = doc.get("spec", {}).get("template", {}).get("spec", {}) if isinstance(doc, dict) else {}
            for container in pod.get("containers", []):
                for item in container.get("env", []):
                    if SECRET_NAMES.search(item["name"]):
                        assert "value" not in item and "secretKeyRef" in item["valueFrom"], item["name"]


def test_the_service_the_budget_the_autoscaler_and_the_policy_select_the_api_pods() -> None:
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    selectors = [_find("Service")["spec"]["selector"],
                 _find("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                 _find("NetworkPolicy")["spec"]["podSelector"]["matchLabels"]]
    for selector in selectors:
        assert selector.items() <= labels.items()
    assert _find("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == "flask-obo"
    assert _find("Service")["spec"]["ports"][0]["targetPort"] == "http"  # nginx, never gunicorn
    ingress_ports = {p["port"] for rule in _find("NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == {8080, 8000}


# --- nginx ----------------------------------------------------------------------------------------

SHARED_NGINX_LINES = (
    "log_format flask_obo", "'$body_bytes_sent $request_time", "'request_id=$flask_obo_request_id",
    "map $http_x_request_id $flask_obo_request_id", '"~^[A-Za-z0-9._-]{1,64}$"', "client_max_body_size",
    "client_body_timeout", "client_header_timeout", "large_client_header_buffers", "keepalive_timeout",
    "send_timeout", "proxy_connect_timeout", "proxy_send_timeout", "proxy_read_timeout",
    "server_name localhost",
    'proxy_set_header Connection ""', "proxy_set_header X-Forwarded-For", "proxy_set_header X-Request-Id",
    "location = /metrics", "allow 127.0.0.1;", "allow ::1;", "deny all;", "return 444;",
)


def _line(conf: str, start: str) -> str:
    """The one directive starting with ``start``, without its comment."""
    (found,) = {line.split(" #")[0].strip() for line in conf.splitlines() if line.strip().startswith(start)}
    return found


def test_the_pods_nginx_keeps_config_nginx_conf_s_rules() -> None:
    ours, shipped = (K8S / "base" / "nginx.conf").read_text(), NGINX_CONF.read_text()
    for start in SHARED_NGINX_LINES:
        assert _line(ours, start) == _line(shipped, start), start
    assert "server 127.0.0.1:8000;" in ours  # gunicorn in the same pod


def test_the_pods_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    binary = require_binary("nginx")
    conf = tmp_path / "nginx.conf"
    # Its absolute paths (/tmp/...) are the container's volumes; here, this test's directory.
    conf.write_text((K8S / "base" / "nginx.conf").read_text().replace("/tmp/", f"{tmp_path}/"))
    result = nginx_test_config(binary, conf, tmp_path)
    assert result.returncode == 0, result.stderr


# --- rendered by kustomize -------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_each_overlay_renders_to_valid_objects(overlay: Path) -> None:
    """``kubectl kustomize`` (kustomize built in) when kubectl is installed: every rendered
    object validates, the patches landed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays are checked file by file above only")
    result = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        assert doc["metadata"].get("namespace", "flask-obo") == "flask-obo"
    (configmap,) = [d for d in rendered
                    if d["kind"] == "ConfigMap" and d["metadata"]["name"] == SETTINGS_CONFIGMAP]
    (deployment,) = [d for d in rendered if d["kind"] == "Deployment"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    (nginx_volume,) = [v for v in volumes if v["name"] == "nginx-conf"]
    assert nginx_volume["configMap"]["name"].startswith("flask-obo-nginx-")  # the generator's hashed name
    api = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "api")
    env = {item["name"] for item in api["env"]}
    if overlay.name == "redis-sentinel":
        assert "REDIS_SENTINELS" in configmap["data"] and "REDIS_SENTINEL_PASSWORD" in env
        policy = next(d for d in rendered if d["kind"] == "NetworkPolicy")
        assert 26379 in {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    else:
        assert "REDIS_SENTINELS" not in configmap["data"] and "REDIS_SENTINEL_PASSWORD" not in env
    assert {"REDIS_URL", "TOKEN_CACHE_KEYS"} <= env
