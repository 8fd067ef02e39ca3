# Every target installs what it needs into .venv first, from uv.lock, so a fresh clone needs
# only Python >= 3.11 and make. The lock holds exact versions (and hashes) of every package
# of every extra; pyproject.toml keeps the compatible ranges that applications install with.
# A lock that no longer matches pyproject.toml fails the install: run `make lock`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

# uv itself, pinned, installed by pip into a folder of its own (not into .venv, whose
# contents uv keeps equal to the lock). Dockerfile's UV_VERSION and pyproject's
# [tool.uv] required-version follow it (tests/unit/test_lock.py checks).
UV_VERSION := 0.13.9
UV_DIR     := .uv
UV         := $(UV_DIR)/bin/uv
UV_STAMP   := $(UV_DIR)/uv-$(UV_VERSION).stamp
# Only the interpreter given here: never one downloaded by uv (the network may allow
# package registries only), and the environment at $(VENV) whatever it is called.
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
# Compiled at install, as pip does: with PYTHONDONTWRITEBYTECODE set (it is on CI machines)
# nothing would ever write the .pyc files, and every CLI subprocess the suite starts would
# compile SQLAlchemy anew (measured: 1.1 s instead of 0.5 s, and the suite 650 s, not 430 s).
export UV_COMPILE_BYTECODE := 1
SYNC := $(UV) sync --locked --extra dev

# The throwaway environment of `make test-latest`.
LATEST := .latest

.PHONY: install demo test check static unit lint format docs bench lock upgrade test-latest clean \
        prometheus-tools

$(UV_STAMP):
	rm -rf $(UV_DIR)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
	  --target $(UV_DIR) 'uv==$(UV_VERSION)'
	touch $@

# Cheap when nothing changed (uv checks the lock against pyproject.toml and the environment
# against the lock in well under a second), so every target runs it: .venv is always exactly
# the lock, whatever was installed into it by hand or by another target.
install: $(UV_STAMP)
	$(SYNC)

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

demo: install
	$(BIN)/outbox-relay demo

# ruff, mypy and the suite with $(BIN) as it is: `test` installs first, `test-latest` points
# VENV at its throwaway environment.
static:
	$(BIN)/ruff check outbox_lib relay tests docs/examples
	$(BIN)/ruff format --check outbox_lib relay tests docs/examples
	$(BIN)/mypy

check: static
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(MAKE) --no-print-directory static

test: install prometheus-tools
	$(MAKE) --no-print-directory check

unit: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

format: install
	$(BIN)/ruff format outbox_lib relay tests docs/examples
	$(BIN)/ruff check --fix outbox_lib relay tests docs/examples

# The generated tables of docs/configuration.md and docs/metrics.md (tests/unit/test_docs.py
# fails while they are stale).
docs: install
	$(BIN)/python -m relay.docgen

bench: $(UV_STAMP)
	$(SYNC) --extra bench
	$(BIN)/python -m tests.benchmarks.bench $(BENCH_ARGS)

# After an edit of pyproject.toml: the smallest change of uv.lock that satisfies it (locked
# versions that still fit stay).
lock: $(UV_STAMP)
	$(UV) lock

# Every package to the newest version the ranges allow: a reviewed change of uv.lock, best
# after `make test-latest` has passed on the same versions.
upgrade: $(UV_STAMP)
	$(UV) lock --upgrade

# The suite on the newest versions the ranges allow, in a throwaway environment ($(LATEST)),
# without touching uv.lock or .venv. Prints what would change; not run by CI.
test-latest: $(UV_STAMP) prometheus-tools
	rm -rf $(LATEST) && mkdir -p $(LATEST)/lock
	cp pyproject.toml uv.lock README.md $(LATEST)/lock/
	@echo "--- newest versions the ranges allow, against uv.lock:"
	cd $(LATEST)/lock && $(CURDIR)/$(UV) lock --upgrade
	@cmp -s uv.lock $(LATEST)/lock/uv.lock && echo "--- uv.lock already holds the newest versions" \
	  || echo "--- the 'Updated' lines above are what 'make upgrade' would change"
	UV_PROJECT_ENVIRONMENT=$(CURDIR)/$(LATEST)/venv $(UV) sync --locked --extra dev --no-install-project \
	  --project $(LATEST)/lock
	$(UV) pip install --quiet --python $(LATEST)/venv --no-deps -e .
	$(MAKE) --no-print-directory check VENV=$(LATEST)/venv
	@echo "--- passed on the newest versions; 'make upgrade' moves uv.lock to them"

clean:
	rm -rf $(VENV) $(UV_DIR) $(LATEST) bench-results .pytest_cache .mypy_cache .ruff_cache
