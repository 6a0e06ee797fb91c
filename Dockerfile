# flask-obo API (and, in the compose stack, the dev tenant) on a slim Python image.
FROM python:3.11-slim

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

COPY app ./app
COPY devtenant ./devtenant
COPY config ./config
COPY wsgi.py ./
RUN pip install --no-deps . \
 && useradd --system --uid 10001 --home-dir /srv/flask-obo --shell /usr/sbin/nologin flaskobo

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["gunicorn", "--config", "config/gunicorn.conf.py", "wsgi:app"]
