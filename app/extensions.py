"""The reference API's one ``FlaskOBO``, bound to each application by ``create_app``."""

from flask_obo import FlaskOBO

obo = FlaskOBO()
