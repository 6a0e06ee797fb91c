"""WSGI entry point: ``gunicorn -c config/gunicorn.conf.py wsgi:app``.

The API runs behind exactly one reverse proxy (nginx), so ProxyFix trusts one hop of
X-Forwarded-For/-Proto/-Host/-Port and no more. That trust holds only while nginx is the
sole client: it overwrites those headers (X-Forwarded-Host with a host from its own
server_name list), whereas a client reaching gunicorn directly would choose the host in
redirects (``Location``) and the address in the logs. Hence gunicorn binds loopback by
default (config/gunicorn.conf.py) and, in docker-compose.yml, listens on a network only
nginx shares. A bad setting stops start-up with one line naming the variable (never its
value). Under gunicorn that line comes from config/gunicorn.conf.py, which checks the same
settings in the master before forking; this one serves ``flask --app wsgi`` and the like.
"""

import sys

from werkzeug.middleware.proxy_fix import ProxyFix

from app import create_app
from flask_obo import SettingsError

try:
    app = create_app()
except SettingsError as exc:
    print(f"flask-obo: configuration error: {exc}", file=sys.stderr)
    sys.exit(3)

app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_port=1)
