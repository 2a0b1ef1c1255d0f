# Two commands: `make run` starts both services, `make test` runs lint, types and the tests.
# Both install from uv.lock (exact versions and hashes); pyproject.toml keeps minimum versions.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# uv itself lives in a venv of its own: `uv sync` makes .venv exactly the lock's set.
TOOLS := .tools
UV_VERSION := 0.13.9
UV := $(TOOLS)/bin/uv
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
# What the tests need that pip cannot install: Debian packages named like their commands.
TEST_SYSTEM_PACKAGES := redis-server chromium
IMAGE ?= hermes-media:test

# uv trusts the system's certificate store, and the bundle pip is pointed at when the
# environment names one (uv reads SSL_CERT_FILE, not PIP_CERT). It never downloads a Python.
export UV_SYSTEM_CERTS := true
export UV_PYTHON_DOWNLOADS := never
ifdef PIP_CERT
export SSL_CERT_FILE ?= $(PIP_CERT)
endif

.PHONY: install run test test-image test-bare test-system-packages lint openapi bench lock lock-yt-dlp
install: $(TEST_STAMP)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

# Running needs the package and its dependencies only. --inexact keeps test tools a
# previous `make test` installed, so switching between the two commands installs nothing.
$(RUN_STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --inexact --python $(PYTHON)
	touch $@

$(TEST_STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --extra test --python $(PYTHON)
	touch $@ $(RUN_STAMP)

run: $(RUN_STAMP)
	HERMES_ALLOW_PRIVATE_NETWORKS=$${HERMES_ALLOW_PRIVATE_NETWORKS:-true} $(BIN)/hermes-media serve

test-system-packages:
	@missing=""; \
	for pkg in $(TEST_SYSTEM_PACKAGES); do \
	    command -v $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make test: installing$$missing (Debian packages)"; \
	    apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	elif command -v apt-get >/dev/null 2>&1; then \
	    echo "make test needs$$missing; run: sudo apt-get install -y$$missing" >&2; exit 1; \
	else \
	    echo "make test needs these programs on PATH:$$missing (install them, then run make test again)" >&2; exit 1; \
	fi

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: test-system-packages lint
	$(BIN)/pytest -n 2 --timeout=180 -q
	@echo "The container image is tested separately: make test-image (needs Docker; .ci/run runs it)."

# Builds the image and checks it as a user would (tests/image); needs a Docker engine.
test-image: $(TEST_STAMP)
	HERMES_TEST_IMAGE=$(IMAGE) $(BIN)/pytest -m image tests/image -q -s -p no:cacheprovider --timeout=600

# The README's two commands on a fresh clone in a bare Debian container (committed HEAD only).
test-bare:
	tests/image/bare-machine.sh

openapi: $(RUN_STAMP)
	$(BIN)/hermes-media openapi

bench: $(TEST_STAMP)
	$(BIN)/python -m bench.compress

# Refresh the lock: every dependency to its newest release allowed by pyproject.toml.
lock: | $(UV)
	$(UV) lock --upgrade --python $(PYTHON)

# Refresh yt-dlp alone (with the JavaScript parts it pins), the day YouTube changes.
lock-yt-dlp: | $(UV)
	$(UV) lock --upgrade-package yt-dlp --upgrade-package yt-dlp-ejs --upgrade-package deno --python $(PYTHON)
