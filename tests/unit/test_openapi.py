"""The API document, ``GET /openapi.json`` (app/openapi.py): valid OpenAPI 3.1, every route
of the application in it, its security scheme built from the application's settings, and
its error vocabulary the code's and the documentation's. Every error the code renders conforms to
it. (tests/e2e/test_openapi_conformance.py runs schemathesis against the running API.)"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from flask import Blueprint, Flask
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from app import create_app
from app.gunicorn_errors import write_json_error
from app.openapi import UNDESCRIBED_PATHS, all_error_codes
from flask_obo import errors
from flask_obo.settings import Settings
from tests.support.fake_entra import TENANT_ID, settings_env
from tests.support.openapi import PENDING_ROUTES, app_routes, documented_routes
from tests.unit.test_readme import api_error_codes, readme_error_table


@pytest.fixture
def document(client) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.get_json()


def test_the_document_is_valid_openapi_3_1(document) -> None:
    assert document["openapi"].startswith("3.1.")
    validate(document, cls=OpenAPIV31SpecValidator)


# --- routes --------------------------------------------------------------------------------


def undescribed(app: Flask, document: dict[str, Any]) -> set[tuple[str, str]]:
    """Routes of ``app`` the document lacks (less the operational ``UNDESCRIBED_PATHS``)."""
    return {(method, path) for method, path in app_routes(app) - documented_routes(document)
            if path not in UNDESCRIBED_PATHS}


def test_every_route_of_the_app_is_in_the_document(app, document) -> None:
    assert app_routes(app)  # the walk sees the routes
    assert not undescribed(app, document)


def test_every_route_in_the_document_is_the_apps_or_pending(app, document) -> None:
    """What the document describes ahead of the application is listed in PENDING_ROUTES;
    once a pending route lands, it leaves that list."""
    ahead = documented_routes(document) - app_routes(app)
    assert ahead == PENDING_ROUTES, (
        f"described but not routed, and not pending: {sorted(ahead - PENDING_ROUTES)}; "
        f"pending but routed now (remove from PENDING_ROUTES): {sorted(PENDING_ROUTES - ahead)}"
    )


def test_a_new_route_missing_from_the_document_is_caught(settings, store, document) -> None:
    """Negative control: a route added without its description fails the walk, and one
    path, ``/metrics``, is operational and stays out of the document."""
    app = create_app(settings, store=store)
    extra = Blueprint("extra", __name__)
    extra.add_url_rule("/api/extra/<int:item>", "extra", lambda item: "", methods=["GET", "PUT"])
    extra.add_url_rule("/metrics", "metrics", lambda: "")
    app.register_blueprint(extra)
    assert undescribed(app, document) == {("GET", "/api/extra/{item}"), ("PUT", "/api/extra/{item}")}
    assert "/metrics" not in document["paths"]


# --- the security scheme -------------------------------------------------------------------


def test_the_security_scheme_is_the_configured_authority_and_scope(store) -> None:
    settings = Settings.from_env(settings_env(
        AZURE_AUTHORITY_HOST="https://login.contoso.example",
        AZURE_APP_ID_URI="api://tasks.contoso.example",
        API_REQUIRED_SCOPE="Tasks.ReadWrite",
    ))
    document = create_app(settings, store=store).test_client().get("/openapi.json").get_json()
    (name, scheme), = document["components"]["securitySchemes"].items()
    flow = scheme["flows"]["authorizationCode"]
    authority = f"https://login.contoso.example/{TENANT_ID}"
    assert scheme["type"] == "oauth2"
    assert flow["authorizationUrl"] == f"{authority}/oauth2/v2.0/authorize"
    assert flow["tokenUrl"] == f"{authority}/oauth2/v2.0/token"
    assert list(flow["scopes"]) == ["api://tasks.contoso.example/Tasks.ReadWrite"]
    for path in ("/api/whoami", "/api/me", "/api/me/manager"):
        assert document["paths"][path]["get"]["security"] == [{name: ["api://tasks.contoso.example/Tasks.ReadWrite"]}]
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert document["paths"][path]["get"]["security"] == []


def test_by_default_the_scope_is_on_the_client_ids_app_id_uri(settings, document) -> None:
    flow = next(iter(document["components"]["securitySchemes"].values()))["flows"]["authorizationCode"]
    assert flow["authorizationUrl"].startswith(f"https://login.microsoftonline.com/{settings.tenant_id}/")
    assert list(flow["scopes"]) == [f"api://{settings.client_id}/user_impersonation"]


# --- errors --------------------------------------------------------------------------------


def test_the_error_code_enum_is_the_readmes_error_table(document) -> None:
    enum = set(document["components"]["schemas"]["Error"]["properties"]["error"]["enum"])
    assert enum == readme_error_table()
    assert enum == api_error_codes()  # and what the code can answer (scanned from the source)


def test_challenges_and_retry_after_are_required_headers(document) -> None:
    responses = document["components"]["responses"]
    assert responses["Unauthorized"]["headers"]["WWW-Authenticate"]["required"] is True
    # consent_required comes with no challenge
    assert responses["Forbidden"]["headers"]["WWW-Authenticate"]["required"] is False
    assert responses["ServiceUnavailable"]["headers"]["Retry-After"]["required"] is True
    assert responses["MethodNotAllowed"]["headers"]["Allow"]["required"] is True


def _validator(document: dict[str, Any], pointer: str) -> Draft202012Validator:
    registry = Registry().with_resource("urn:api", Resource.from_contents(document, DRAFT202012))
    return Draft202012Validator({"$ref": f"urn:api#{pointer}"}, registry=registry)


def _described_response(document: dict[str, Any], status: int) -> dict[str, Any]:
    (name,) = {response["$ref"].rsplit("/", 1)[1] for item in document["paths"].values()
               for operation in item.values() for code, response in operation["responses"].items()
               if code == str(status) and "$ref" in response}
    return {"name": name, **document["components"]["responses"][name]}


def _every_error() -> list[errors.ApiError]:
    """One instance of each error the API renders: every ApiError class, the generic HTTP
    errors, and the reference API's own."""
    arguments = {errors.InsufficientClaims: ('{"access_token": {}}',), errors.InsufficientScope: ("x",),
                 errors.MissingAppRole: (("Jobs.Run",),), errors.UserTokenRequired: ("x",)}
    instances = [cls(*arguments.get(cls, ())) for cls in vars(errors).values()
                 if isinstance(cls, type) and issubclass(cls, errors.ApiError)]
    # 405 needs its Allow header from the handler: see the next test
    instances += [errors.http_error(status) for status in (400, 404, 413, 414, 431, 500)]
    instances.append(errors.ApiError("x", status=404, error="manager_not_found"))
    return instances


@pytest.mark.parametrize("error", _every_error(), ids=lambda e: f"{type(e).__name__}-{e.status}-{e.error}")
def test_every_error_the_code_renders_conforms_to_the_document(app, document, error) -> None:
    with app.test_request_context():
        response = error.response()
    _assert_conforms(document, response)


def _assert_conforms(document: dict[str, Any], response: Any) -> None:
    described = _described_response(document, response.status_code)
    assert response.mimetype in described["content"]
    pointer = f"/components/responses/{described['name']}/content/application~1json/schema"
    _validator(document, pointer).validate(response.get_json())
    for header, spec in described.get("headers", {}).items():
        if spec["required"]:
            assert header in response.headers, header
        if header in response.headers:
            schema = spec["schema"]
            value = response.headers[header]
            Draft202012Validator(schema).validate(int(value) if schema.get("type") == "integer" else value)


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("GET", "/api/nope", None, 404),
    ("POST", "/api/whoami", None, 405),
    ("DELETE", "/healthz", None, 405),
    ("GET", "/readyz", b"x" * 70_000, 413),
])
def test_generic_http_errors_conform_to_the_document(client, document, method, path, body, status) -> None:
    response = client.open(path, method=method, data=body)
    assert response.status_code == status
    _assert_conforms(document, response)


def test_each_status_names_exactly_its_codes(document) -> None:
    """A 401 body's ``error`` is one of the 401 codes, and so on: per status, from the code."""
    for status, codes in all_error_codes().items():
        schema = _described_response(document, status)["content"]["application/json"]["schema"]
        assert set(schema["allOf"][1]["properties"]["error"]["enum"]) == codes, status


@pytest.mark.parametrize(("status", "reason", "error"), [
    (400, "Bad Request", "invalid_request"),
    (414, "URI Too Long", "request_too_large"),
    (431, "Request Header Fields Too Large", "request_too_large"),
    (500, "Internal Server Error", "server_error"),
])
def test_gunicorns_own_answers_are_the_documents_json(document, status, reason, error) -> None:
    """What app/gunicorn_errors.py writes instead of gunicorn's HTML page, which quotes the
    client's request: the document's JSON error, with nothing of the request in it."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        write_json_error(ours, status, reason, "Invalid HTTP Header: 'X-Planted-Marker'")
        raw = theirs.recv(65536)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} {reason}\r\n".encode())
    assert b"Content-Type: application/json\r\n" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body)["error"] == error
    assert b"Planted" not in body
    described = _described_response(document, status)
    pointer = f"/components/responses/{described['name']}/content/application~1json/schema"
    _validator(document, pointer).validate(json.loads(body))


# --- bodies --------------------------------------------------------------------------------


def test_the_probes_and_whoami_answer_as_described(client, entra, document) -> None:
    token = entra.api_token()
    for path, schema in (("/healthz", "Health"), ("/readyz", "Readiness"), ("/api/whoami", "Whoami"),
                         ("/openapi.json", "OpenApiDocument")):
        response = client.get(path, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, path
        _validator(document, f"/components/schemas/{schema}").validate(response.get_json())


def test_me_answers_as_described(client, entra, document) -> None:
    response = client.get("/api/me", headers={"Authorization": f"Bearer {entra.api_token()}"})
    assert response.status_code == 200
    _validator(document, "/components/schemas/User").validate(response.get_json())
