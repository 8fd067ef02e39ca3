# Every target installs what it needs into .venv first, so a fresh clone needs only
# Python >= 3.11 and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test unit lint format docs bench clean prometheus-tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

# promtool and prometheus, for the tests of deploy/ (alert rules, dashboard): Debian's
# package has both. Checked on every run (cheap) since a cached .venv says nothing about
# them; `apt-get update` only if the install fails. Where they cannot be installed (no
# apt-get, no root, sudo wants a password) those tests skip, or fail when CI is set.
PROMETHEUS_APT := apt-get install -y --no-install-recommends prometheus
prometheus-tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; else sudo="sudo -n"; command -v sudo >/dev/null || sudo=no; fi; \
	  if command -v apt-get >/dev/null && [ "$$sudo" != no ]; then \
	    echo "installing Debian's prometheus package (promtool, prometheus)"; \
	    apt="$$sudo env DEBIAN_FRONTEND=noninteractive"; \
	    $$apt $(PROMETHEUS_APT) || { $$apt apt-get update -q && $$apt $(PROMETHEUS_APT); }; \
	  fi; \
	  command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	    echo "prometheus/promtool missing: tests of deploy/ will skip (fail if CI is set)" >&2; \
	    [ -z "$$CI" ]; }; }

demo: $(STAMP)
	$(BIN)/outbox-relay demo

lint: $(STAMP)
	$(BIN)/ruff check outbox_lib relay tests docs/examples
	$(BIN)/ruff format --check outbox_lib relay tests docs/examples
	$(BIN)/mypy

test: lint prometheus-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

format: $(STAMP)
	$(BIN)/ruff format outbox_lib relay tests docs/examples
	$(BIN)/ruff check --fix outbox_lib relay tests docs/examples

# The generated tables of docs/configuration.md and docs/metrics.md (tests/unit/test_docs.py
# fails while they are stale).
docs: $(STAMP)
	$(BIN)/python -m relay.docgen

BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m tests.benchmarks.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) bench-results .pytest_cache .mypy_cache .ruff_cache
