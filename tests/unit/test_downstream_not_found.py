"""A downstream 404 is the caller's JSON 404 on every route, never a 500."""

from __future__ import annotations

from flask_obo.errors import DownstreamNotFound
from tests.support.fake_entra import ADELE, BOB, FakeEntra


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_graph_404_on_me_is_a_json_404(client, entra: FakeEntra):
    entra.graph_behaviours[ADELE] = ["404"]

    response = client.get("/api/me", headers=bearer(entra.api_token(ADELE)))

    assert response.status_code == 404
    assert response.json == {"error": "not_found",
                             "error_description": "The downstream API has no such resource."}
    assert response.headers["Cache-Control"] == "no-store"  # still one user's answer


def test_the_manager_route_keeps_its_own_code(client, entra: FakeEntra):
    response = client.get("/api/me/manager", headers=bearer(entra.api_token(BOB)))

    assert response.status_code == 404
    assert response.json["error"] == "manager_not_found"


def test_any_route_that_meets_a_graph_404_answers_404(app):
    """Not only the API's routes: whatever calls Graph gets the same answer."""

    def lookup():
        raise DownstreamNotFound()

    app.add_url_rule("/elsewhere", view_func=lookup)

    response = app.test_client().get("/elsewhere")

    assert response.status_code == 404
    assert response.json["error"] == "not_found"
