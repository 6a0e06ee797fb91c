"""An adopter's API, tested offline with the flask-obo-devtenant plugin's fixtures alone."""
from flask import Flask

from flask_obo import FlaskOBO, current_token


def create_app(settings):
    app = Flask(__name__)
    obo = FlaskOBO()
    obo.init_app(app, settings=settings)

    @app.get("/api/me")
    @obo.require_scope("user_impersonation")
    def me():
        graph = obo.downstream("graph")  # Microsoft Graph, on behalf of the signed-in user
        return {"oid": current_token.oid, "name": graph.get("/me").json()["displayName"]}

    return app


def test_me_calls_graph_on_behalf_of_the_user(devtenant, devtenant_settings, user_token, spa_sign_in):
    client = create_app(devtenant_settings).test_client()
    assert client.get("/api/me").status_code == 401
    for token in (user_token("adele"), spa_sign_in("adele")["access_token"]):
        answer = client.get("/api/me", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.json
        assert answer.json["name"] == "Adele Vance"
    assert devtenant.token_calls()["on_behalf_of"] == 1  # the second token: from the cache
