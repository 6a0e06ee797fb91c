"""WSGI entry point: ``gunicorn -c config/gunicorn.conf.py wsgi:app``.

The API runs behind exactly one reverse proxy (nginx), so ProxyFix trusts one hop of
X-Forwarded-For/-Proto/-Host/-Port and no more. That trust holds only while nginx is the
sole client: it overwrites those headers (X-Forwarded-Host with a host from its own
server_name list), whereas a client reaching gunicorn directly would choose the host in
redirects (``Location``) and the address in the logs. Hence gunicorn binds loopback by
default (config/gunicorn.conf.py) and, in docker-compose.yml, listens on a network only
nginx shares. Bad settings stop start-up with one line per bad setting, each naming the
variable (never its value), all at once. Under gunicorn those lines come from
config/gunicorn.conf.py, which checks the same settings in the master before forking;
these serve ``flask --app wsgi run`` and the like. ``flask --app wsgi obo check`` and
``token-cache`` load anyway (an application with only those commands): the first reports
the settings, the others need only Redis's.
"""

import sys

from werkzeug.middleware.proxy_fix import ProxyFix

from app import create_app
from flask_obo import SettingsError, loading_for_a_command, operator_app, settings_error_lines

try:
    app = create_app()
except SettingsError as exc:
    if not loading_for_a_command():
        print("\n".join(settings_error_lines(exc)), file=sys.stderr)
        sys.exit(3)
    app = operator_app(exc)

app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_port=1)
