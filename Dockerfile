# flask-obo images, one per target:
#   api        the production image: the reference API (app/, wsgi.py, config/) on the
#              flask_obo wheel with its dependencies and the server extra, non-root. No dev
#              tenant, no test tools. The default target (the last stage).
#   devtenant  the dev tenant (a local Entra ID + Graph) for the compose stack; never in production.
#   docker build --target api -t flask-obo .
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/flask-obo

# Dependencies come from setup.cfg; copying the metadata first keeps that layer cached
# while the code changes.
COPY setup.cfg pyproject.toml README.md ./
RUN python -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); \
print(c['options']['install_requires'])" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
RUN useradd --system --uid 10001 --home-dir /srv/flask-obo --shell /usr/sbin/nologin flaskobo


# The extension's wheel, built from the build context: setup.cfg decides what it holds
# (flask_obo; never app/, devtenant/ or tests/).
FROM base AS build
COPY . /src
RUN pip wheel --no-deps /src -w /wheels


# The dev tenant's own distribution, flask-obo-devtenant (devtenant-dist/: its devtenant/
# and LICENSE are links to the repository's, copied beside it so the links resolve).
FROM base AS devtenant-build
COPY devtenant-dist /src/devtenant-dist
COPY devtenant /src/devtenant
COPY LICENSE /src/LICENSE
RUN pip wheel --no-deps /src/devtenant-dist -w /wheels


# The dev tenant as adopters install it: the flask-obo-devtenant wheel and its dependencies.
FROM base AS devtenant
COPY --from=devtenant-build /wheels /tmp/wheels
RUN pip install /tmp/wheels/*.whl && rm -rf /tmp/wheels
RUN mkdir /devtenant && chown 10001 /devtenant
# `python -m devtenant token adele` (docker compose exec) reads the state the server wrote.
ENV DEVTENANT_STATE_DIR=/devtenant
USER 10001
EXPOSE 8443
CMD ["python", "-m", "devtenant", "serve", "--host", "0.0.0.0", "--port", "8443"]


FROM base AS api
# What the reference API adds to the extension: gunicorn, flask-cors, python-json-logger.
RUN python -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); \
print(c['options.extras_require']['server'])" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
COPY app ./app
COPY config ./config
COPY wsgi.py ./
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["gunicorn", "--config", "config/gunicorn.conf.py", "wsgi:app"]
