# flask-obo — the two commands: `make run` and `make test`. `make` alone lists the targets.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: help run test lint bench clean
.DEFAULT_GOAL := help

## list these targets (what `make` alone does)
help:
	@awk '/^## /{doc = substr($$0, 4); next} /^[a-z][a-z-]*:/{if (doc) printf "  make %-6s %s\n", substr($$1, 1, length($$1) - 1), doc} {doc = ""}' $(firstword $(MAKEFILE_LIST))

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

## run the API locally (the dev tenant when no Azure settings are given)
run: $(STAMP)
	$(PY) scripts/run_local.py

## install what the tests need and run them all
test: $(STAMP)
	@command -v redis-server >/dev/null || echo "NOTE: redis-server is missing, so integration tests are skipped. Install it: sudo apt-get install redis-server"
	@command -v nginx >/dev/null || echo "NOTE: nginx is missing, so deployment tests are skipped. Install it: sudo apt-get install nginx"
	$(PY) -m ruff check app flask_obo devtenant tests bench scripts wsgi.py config
	$(PY) -m mypy
	$(PY) -m pytest

## ruff and mypy only (make test runs them too)
lint: $(STAMP)
	$(PY) -m ruff check app flask_obo devtenant tests bench scripts wsgi.py config
	$(PY) -m mypy

## benchmarks (not part of the test suite; about 5 minutes; needs redis-server)
bench: $(STAMP)
	@command -v redis-server >/dev/null || { echo "make bench needs redis-server: sudo apt-get install redis-server"; exit 1; }
	@status=0; \
	echo "== bench/token_cache_bench.py"; $(PY) bench/token_cache_bench.py || status=1; \
	echo "== bench/serving_bench.py"; $(PY) bench/serving_bench.py || status=1; \
	exit $$status

## remove the virtualenv and the caches
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info build dist
