# Two commands: `make run` starts both services, `make test` runs lint, types and the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

.PHONY: install run test lint openapi bench
install: $(STAMP)

run: $(STAMP)
	HERMES_ALLOW_PRIVATE_NETWORKS=$${HERMES_ALLOW_PRIVATE_NETWORKS:-true} $(BIN)/hermes-media serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -n 2 --timeout=180 -q

openapi: $(STAMP)
	$(BIN)/hermes-media openapi

bench: $(STAMP)
	$(BIN)/python -m bench.compress
