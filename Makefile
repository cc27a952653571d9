# DermaSeg tasks. `make help` lists them. Everything runs in .venv (created on first use).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help serve test test-fast lint openapi bench report smoke clean

help: ## list the tasks
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/.serve-deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(BIN)/.dev-deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[train,dev]"
	touch $(BIN)/.serve-deps $@

serve: $(BIN)/.serve-deps ## serve the shipped model on http://$(HOST):$(PORT)
	$(BIN)/dermaseg serve --host $(HOST) --port $(PORT)

test: $(BIN)/.dev-deps ## run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(BIN)/.dev-deps ## run the tests that train and export nothing
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(BIN)/.dev-deps ## ruff and hadolint
	$(BIN)/ruff check training service tests bench
	$(BIN)/hadolint Dockerfile

openapi: $(BIN)/.dev-deps ## regenerate openapi/openapi.json from the app
	$(BIN)/python -m service.openapi

bench: $(BIN)/.dev-deps ## run the performance benchmark, writes docs/performance.md
	$(BIN)/python -m bench

report: $(BIN)/.dev-deps ## write docs/results.md from the run directories in runs/
	$(BIN)/python -m training.report

smoke: ## build the container and probe it (needs ../shared/tools/container-smoke)
	../shared/tools/container-smoke -- 'curl -fsS $$URL/health/ready'

clean: ## remove caches (not the venv, not runs/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
