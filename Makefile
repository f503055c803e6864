# Everyday targets. `make dev` runs the whole stack locally; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help deps venv binaries lint helm-lint crds test test-unit test-integration dev dev-up dev-down dev-status bench bench-quick bench-soak clean

help:
	@echo "make dev        - build what is missing, start control plane + PostgreSQL + operator + examples (Ctrl-C stops)"
	@echo "make dev-up     - the same, detached; run again to restart whatever died"
	@echo "make dev-down   - stop the local stack (data kept in .dev/)"
	@echo "make test       - install what is missing, lint, type-check and run the whole test suite"
	@echo "make crds       - regenerate crds/ from the pydantic models"
	@echo "make bench      - benchmarks with 1000 tenants on a temporary stack (docs/benchmarks.md)"
	@echo "make bench-quick - the converge benchmark with 200 tenants against the make dev-up stack"

deps:
	@hack/install-system-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

binaries:
	@hack/build-control-plane.sh >/dev/null

lint: venv
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/mypy

helm-lint: binaries
	"$$(hack/build-control-plane.sh)/helm" lint --strict helm/tenancy-operator

crds: venv
	$(VENV)/bin/tenancy-operator crds
	cp crds/*.yaml helm/tenancy-operator/crds/

test: deps venv binaries lint
	$(VENV)/bin/pytest -p no:cacheprovider

test-unit: venv
	$(VENV)/bin/pytest -p no:cacheprovider tests/unit

test-integration: deps venv binaries
	$(VENV)/bin/pytest -p no:cacheprovider tests/integration

dev: deps venv binaries
	$(VENV)/bin/tenancy-operator dev run

dev-up: deps venv binaries
	$(VENV)/bin/tenancy-operator dev up

dev-down: venv
	$(VENV)/bin/tenancy-operator dev down

dev-status: venv
	$(VENV)/bin/tenancy-operator dev status

# Benchmarks (not tests; docs/benchmarks.md): figures are printed and written to that file.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	@$(PY) -m pip install -q -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

bench: deps $(BENCH_STAMP) binaries
	bench/converge --tenants 1000

bench-quick: $(BENCH_STAMP) dev-up
	bench/converge --tenants 200 --stack dev

bench-soak: deps $(BENCH_STAMP) binaries
	$(PY) -m bench.soak --minutes 30

clean:
	rm -rf $(VENV) .dev .mypy_cache .ruff_cache .pytest_cache
