"""schemathesis against the running API: it answers what the document it serves
(``/openapi.json``) says. Real processes on loopback: the dev tenant, the API under
gunicorn (the shipped config), a real redis-server.

Each described operation is run through schemathesis's phases (examples, coverage: methods
the path does not take, missing and malformed headers; fuzzing), positive and negative,
once with a valid token, once with an expired one and once with none. Every response must
be no server error and conform to the document: status code, content type, body schema
and headers (``WWW-Authenticate`` on 401, ``Retry-After`` on 503, ``Allow`` on 405).
Generation is derandomized, seeded and bounded (``MAX_EXAMPLES`` per operation), so a run
is reproducible and takes seconds. Then requests schemathesis does not make (an unknown
path, oversized bodies, headers and request lines, a malformed request, which gunicorn
itself answers) are checked against the document's error responses.

    .venv/bin/pytest tests/e2e/test_openapi_conformance.py -p no:cacheprovider
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from schemathesis.engine import Status, events, from_schema

from tests.support.openapi import PENDING_ROUTES
from tests.support.servers import redis_server
from tests.support.stack import DevTenantProcess, GunicornProcess, api_env, devtenant, gunicorn

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 25
SEED = 20240608
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "unsupported_method",  # 405 with Allow for a method the path does not take
    "allow_header_conformance",
    "ignored_auth",  # a protected operation refuses a request without its credentials
)


@dataclass
class Run:
    """What one schemathesis run did: per operation, the statuses its own method got."""

    operations: set[str] = field(default_factory=set)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    calls: int = 0
    checks: int = 0
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevTenantProcess, GunicornProcess]]:
    with (
        redis_server() as redis_url,
        devtenant(tmp_path_factory.mktemp("devtenant")) as tenant,
        gunicorn(api_env(tenant, redis_url), workers=2) as api,
    ):
        yield tenant, api


@pytest.fixture(scope="module")
def api(stack: tuple[DevTenantProcess, GunicornProcess]) -> GunicornProcess:
    return stack[1]


@pytest.fixture(scope="module")
def document(api: GunicornProcess) -> dict[str, Any]:
    response = requests.get(f"{api.url}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    return response.json()


@pytest.fixture(scope="module")
def tokens(stack: tuple[DevTenantProcess, GunicornProcess]) -> dict[str, str | None]:
    tenant = stack[0].tenant
    return {"valid": tenant.api_token("adele"), "expired": tenant.api_token("adele", expired=True),
            "none": None}


def run_schemathesis(api: GunicornProcess, document: dict[str, Any], token: str | None) -> Run:
    config: dict[str, Any] = {
        "seed": SEED,
        "base-url": api.url,
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True,
                       "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        "request-timeout": 30,
        "workers": 1,
    }
    if token:
        config["headers"] = {"Authorization": f"Bearer {token}"}
    # from_dict, not from_url: loaded from a URL, schemathesis leaves that URL's operation
    # (here GET /openapi.json) untested.
    schema = schemathesis.openapi.from_dict(document, config=schemathesis.Config.from_dict(config))
    for method, path in PENDING_ROUTES:
        schema = schema.exclude(method=method, path=path)
    run = Run(operations={result.ok().label for result in schema.get_all_operations()})
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            method = recorder.label.split(" ", 1)[0]
            for interaction in recorder.interactions.values():
                run.calls += 1
                if interaction.response is not None and interaction.request.method == method:
                    run.statuses.setdefault(recorder.label, Counter())[interaction.response.status_code] += 1
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    run.checks += 1
                    if check.status != Status.SUCCESS:
                        case = recorder.cases[case_id].value
                        failure = check.failure_info.failure if check.failure_info else None
                        what = f"{failure.title}: {failure.message}" if failure else check.status
                        run.failures.append(f"{recorder.label} [{event.phase}] {check.name}: {case.method} "
                                            f"{case.formatted_path} headers={case.headers}: {what}")
        elif isinstance(event, events.NonFatalError | events.FatalError):
            run.errors.append(str(getattr(event, "value", None) or getattr(event, "exception", None)))
        elif isinstance(event, events.EngineFinished):
            assert event.stop_reason == "completed", event.stop_reason
    return run


def _report(credential: str, run: Run) -> None:
    print(f"\nschemathesis, {credential} token: {len(run.operations)} operations, {run.calls} calls, "
          f"{run.checks} checks run, {len(run.failures)} failures")
    for label, statuses in sorted(run.statuses.items()):
        print(f"  {label:24} {dict(sorted(statuses.items()))}")


def _assert_conforms(run: Run) -> None:
    assert not run.errors, run.errors
    assert not run.failures, "\n".join(run.failures)
    # every operation was called (less those the API does not have yet)
    assert set(run.statuses) == run.operations, run.operations - set(run.statuses)


def _protected(run: Run) -> set[str]:
    return {label for label in run.operations if " /api/" in label}


def test_conforms_with_a_valid_token(api, document, tokens, capsys) -> None:
    run = run_schemathesis(api, document, tokens["valid"])
    with capsys.disabled():
        _report("a valid", run)
    _assert_conforms(run)
    for label in _protected(run):  # the token was sent and let in (sign-out answers 204)
        assert run.statuses[label].keys() & {200, 204}, (label, run.statuses[label])


@pytest.mark.parametrize("credential", ["expired", "none"])
def test_conforms_with_an_expired_token_and_with_none(api, document, tokens, capsys, credential) -> None:
    run = run_schemathesis(api, document, tokens[credential])
    with capsys.disabled():
        _report("an expired" if credential == "expired" else "no", run)
    _assert_conforms(run)
    for label in _protected(run):  # never let in
        assert set(run.statuses[label]) == {401}, (label, run.statuses[label])
    assert {200} == {status for label in run.operations - _protected(run) for status in run.statuses[label]}


# --- what schemathesis does not send -------------------------------------------------------


def _error_validator(document: dict[str, Any], status: int) -> tuple[Draft202012Validator, dict[str, Any]]:
    """A validator of the body the document gives for ``status``, and its response object."""
    (name,) = {response["$ref"].rsplit("/", 1)[1] for item in document["paths"].values()
               for operation in item.values() for code, response in operation["responses"].items()
               if code == str(status) and "$ref" in response}
    registry = Registry().with_resource("urn:api", Resource.from_contents(document, DRAFT202012))
    schema = {"$ref": f"urn:api#/components/responses/{name}/content/application~1json/schema"}
    return Draft202012Validator(schema, registry=registry), document["components"]["responses"][name]


def _raw(api: GunicornProcess, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes requests would refuse to send; the answer's status, headers and body."""
    url = urlsplit(api.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


ODD_REQUESTS = {
    "an unknown path": (404, lambda url: requests.get(f"{url}/api/nope", timeout=10)),
    "a trailing slash": (404, lambda url: requests.get(f"{url}/healthz/", timeout=10)),
    "a method no path takes": (405, lambda url: requests.request("PURGE", f"{url}/api/me", timeout=10)),
    "a POST to a GET route": (405, lambda url: requests.post(f"{url}/readyz", timeout=10)),
    "a body over 64 KB": (413, lambda url: requests.get(f"{url}/api/whoami", data=b"x" * 70_000, timeout=10)),
    "a request line over gunicorn's limit": (414, lambda url: requests.get(f"{url}/healthz?q={'a' * 5000}",
                                                                           timeout=10)),
    "a 12 KB token reaches the API (gunicorn allows what nginx does)": (401, lambda url: requests.get(
        f"{url}/api/whoami", headers={"Authorization": "Bearer " + "a" * 12_000}, timeout=10)),
    "a header over gunicorn's limit": (431, lambda url: requests.get(
        f"{url}/api/whoami", headers={"Authorization": "Bearer " + "a" * 17_000}, timeout=10)),
    "more headers than gunicorn takes": (431, lambda url: requests.get(
        f"{url}/healthz", headers={f"X-Extra-{i}": "1" for i in range(120)}, timeout=10)),
}


@pytest.mark.parametrize("case", list(ODD_REQUESTS))
def test_odd_requests_are_answered_as_the_document_says(api, document, case) -> None:
    status, send = ODD_REQUESTS[case]
    response = send(api.url)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json", response.text
    validator, described = _error_validator(document, status)
    validator.validate(response.json())
    for header, spec in described.get("headers", {}).items():
        assert not spec["required"] or header in response.headers, header


def test_a_malformed_request_gets_the_json_400_not_gunicorns_page(api, document) -> None:
    status, headers, body = _raw(api, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n"
                                      b"Connection: close\r\n\r\n")
    assert status == 400
    assert headers["content-type"] == "application/json"
    validator, _ = _error_validator(document, 400)
    validator.validate(json.loads(body))
    assert b"abc" not in body and b"CONTENT-LENGTH" not in body.upper()  # nothing of the request echoed
