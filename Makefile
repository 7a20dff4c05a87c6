# pgwarden: everything installs itself into .venv; nothing else is needed but Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test lint bench bench-engine bench-lookup bench-pgbouncer clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pgwarden demo

lint: $(STAMP)
	$(BIN)/ruff check proxy tests benchmarks
	$(BIN)/ruff format --check proxy tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

# pgbouncer is the benchmark peer: Debian's package, installed when we can (root + apt).
# `make bench` runs all three benchmarks: pgbench_select.py with its defaults and
# BENCH_ARGS (as before), then engine_cost.py with ENGINE_ARGS and pgbench_lookup.py
# with LOOKUP_ARGS (quick by default). bench-engine and bench-lookup run one each and
# also take BENCH_ARGS (after the defaults, so e.g. BENCH_ARGS="--seconds 30" wins).
ENGINE_ARGS ?=
LOOKUP_ARGS ?= --quick

bench-pgbouncer:
	command -v pgbouncer >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
		|| (apt-get update -qq && apt-get install -y -qq pgbouncer) || true

bench: $(STAMP) bench-pgbouncer
	$(BIN)/python benchmarks/pgbench_select.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/engine_cost.py $(ENGINE_ARGS)
	$(BIN)/python benchmarks/pgbench_lookup.py $(LOOKUP_ARGS)

bench-engine: $(STAMP)
	$(BIN)/python benchmarks/engine_cost.py $(ENGINE_ARGS) $(BENCH_ARGS)

bench-lookup: $(STAMP) bench-pgbouncer
	$(BIN)/python benchmarks/pgbench_lookup.py $(LOOKUP_ARGS) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
