# flask-obo — the two commands: `make run` and `make test`. `make` alone lists the targets.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml devtenant-dist/pyproject.toml | cksum | cut -d' ' -f1)

SPA_PACKAGES := spa/node_modules/.package-lock.json

.PHONY: help run test lint bench clean spa-packages dist
.DEFAULT_GOAL := help

## list these targets (what `make` alone does)
help:
	@awk '/^## /{doc = substr($$0, 4); next} /^[a-z][a-z-]*:/{if (doc) printf "  make %-6s %s\n", substr($$1, 1, length($$1) - 1), doc} {doc = ""}' $(firstword $(MAKEFILE_LIST))

# flask-obo-devtenant (devtenant-dist/) editable too: its pytest plugin is how the tests start
# the dev tenant, as an adopter's would.
$(STAMP): setup.cfg pyproject.toml devtenant-dist/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -e ./devtenant-dist
	@rm -f $(VENV)/.installed-* && touch $@

## run the API locally (the dev tenant when no Azure settings are given)
run: $(STAMP)
	$(PY) scripts/run_local.py

## install what the tests need and run them all
test: $(STAMP) spa-packages
	@command -v redis-server >/dev/null || echo "NOTE: redis-server is missing, so integration tests are skipped. Install it: sudo apt-get install redis-server"
	@command -v nginx >/dev/null || echo "NOTE: nginx is missing, so deployment tests are skipped. Install it: sudo apt-get install nginx"
	@command -v chromium >/dev/null || echo "NOTE: chromium is missing, so the SPA's browser tests are skipped. Install it: sudo apt-get install chromium"
	$(PY) -m ruff check app flask_obo devtenant tests bench scripts wsgi.py config docs
	$(PY) -m mypy
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir site
	$(PY) -m pytest

# The sample SPA's npm packages (msal-browser), from the lockfile; without npm, a note.
spa-packages:
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(SPA_PACKAGES); \
	else echo "NOTE: npm is missing, so the SPA's browser tests are skipped. Install it: sudo apt-get install npm"; fi

$(SPA_PACKAGES): spa/package.json spa/package-lock.json
	cd spa && npm ci --no-audit --no-fund

## build the release: dist/ (flask-obo's sdist and wheel), devtenant-dist/dist/ (flask-obo-devtenant's)
dist: $(STAMP)
	rm -rf dist devtenant-dist/dist
	$(PY) -m build --outdir dist .
	$(PY) -m build --outdir devtenant-dist/dist devtenant-dist
	$(PY) -m twine check --strict dist/* devtenant-dist/dist/*

## ruff and mypy only (make test runs them too)
lint: $(STAMP)
	$(PY) -m ruff check app flask_obo devtenant tests bench scripts wsgi.py config docs
	$(PY) -m mypy

## benchmarks (not part of the test suite; about 10 minutes; needs redis-server)
bench: $(STAMP)
	@command -v redis-server >/dev/null || { echo "make bench needs redis-server: sudo apt-get install redis-server"; exit 1; }
	@status=0; \
	echo "== bench/token_cache_bench.py"; $(PY) bench/token_cache_bench.py || status=1; \
	echo "== bench/serving_bench.py"; $(PY) bench/serving_bench.py || status=1; \
	echo "== bench/session_bench.py"; $(PY) bench/session_bench.py || status=1; \
	exit $$status

## remove the virtualenv and the caches
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info build dist site spa/node_modules \
		devtenant-dist/dist devtenant-dist/build devtenant-dist/*.egg-info
