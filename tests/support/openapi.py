"""What the API document (``/openapi.json``, app/openapi.py) and the application must agree
on, for the unit tests and the schemathesis run alike."""

from __future__ import annotations

import re
from typing import Any

from flask import Flask

# Described in the document ahead of the application: each lands with its own change, whose
# author removes it from here (then the route-coverage tests check it like every other).
PENDING_ROUTES: frozenset[tuple[str, str]] = frozenset()
# What Flask answers by itself on every route; the document does not repeat them.
IMPLICIT_METHODS = frozenset({"HEAD", "OPTIONS"})
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def app_routes(app: Flask) -> set[tuple[str, str]]:
    """(method, OpenAPI path) of every route in ``app.url_map``."""
    routes = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        routes.update((method, path) for method in (rule.methods or set()) - IMPLICIT_METHODS)
    return routes


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items()
            for method in item if method in HTTP_METHODS}
