"""WSGI entry point: ``gunicorn wsgi:app``.

A bad setting stops start-up with one line naming the variable (never its value).
"""

import sys

from app import create_app
from app.settings import SettingsError

try:
    app = create_app()
except SettingsError as exc:
    print(f"flask-obo: configuration error: {exc}", file=sys.stderr)
    sys.exit(3)
