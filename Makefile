# pgwarden: everything installs itself into .venv; nothing else is needed but Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install compat-drivers demo demo-insider test lint bench bench-select bench-engine bench-lookup bench-bulk \
	bench-idle bench-alloc bench-pgbouncer clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) compat-drivers

# The compatibility matrix's drivers in other languages (tests/compat): node-postgres as
# package-lock.json pins it (when npm is there), and Debian's pgjdbc when we can (root +
# apt). Without node or java the matrix skips those columns and says why.
NODE_DIR := tests/compat/node
$(NODE_DIR)/node_modules/.installed: $(NODE_DIR)/package-lock.json
	npm ci --prefix $(NODE_DIR) --no-audit --no-fund --loglevel=error
	touch $@

compat-drivers:
	! command -v npm >/dev/null || $(MAKE) --no-print-directory $(NODE_DIR)/node_modules/.installed
	[ -f /usr/share/java/postgresql.jar ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
		|| (apt-get update -qq && apt-get install -y -qq libpostgresql-jdbc-java) \
		|| echo "warning: could not install libpostgresql-jdbc-java: the pgjdbc tests will skip"

demo: $(STAMP)
	$(BIN)/pgwarden demo

demo-insider: $(STAMP)
	$(BIN)/pgwarden demo --scenario insider

lint: $(STAMP)
	$(BIN)/ruff check proxy tests benchmarks
	$(BIN)/ruff format --check proxy tests benchmarks
	$(BIN)/mypy

test: lint compat-drivers
	$(BIN)/python -m pytest

# pgbouncer is the benchmark peer: Debian's package, installed when we can (root + apt).
# `make bench` runs every benchmark through benchmarks/run_all.py, one after the other:
# one JSON file (benchmarks/results/latest.json) and one table of the performance
# targets, met or missed. QUICK=1 for a shorter run (~6 min instead of ~15); BENCH_ARGS
# goes to run_all.py (e.g. BENCH_ARGS="--only bulk,idle"). bench-select, bench-engine,
# bench-lookup, bench-bulk, bench-idle and bench-alloc run one script each: ENGINE_ARGS
# and LOOKUP_ARGS as before, then BENCH_ARGS (so e.g. BENCH_ARGS="--seconds 30" wins).
ENGINE_ARGS ?=
LOOKUP_ARGS ?= --quick

bench-pgbouncer:
	command -v pgbouncer >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
		|| (apt-get update -qq && apt-get install -y -qq pgbouncer) || true

bench: $(STAMP) bench-pgbouncer
	$(BIN)/python benchmarks/run_all.py $(if $(QUICK),--quick) $(BENCH_ARGS)

bench-select: $(STAMP) bench-pgbouncer
	$(BIN)/python benchmarks/pgbench_select.py $(BENCH_ARGS)

bench-engine: $(STAMP)
	$(BIN)/python benchmarks/engine_cost.py $(ENGINE_ARGS) $(BENCH_ARGS)

bench-lookup: $(STAMP) bench-pgbouncer
	$(BIN)/python benchmarks/pgbench_lookup.py $(LOOKUP_ARGS) $(BENCH_ARGS)

bench-bulk: $(STAMP) bench-pgbouncer
	$(BIN)/python benchmarks/bulk_read.py $(BENCH_ARGS)

bench-idle: $(STAMP) bench-pgbouncer
	$(BIN)/python benchmarks/idle_memory.py $(BENCH_ARGS)

bench-alloc: $(STAMP)
	$(BIN)/python benchmarks/row_allocations.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
