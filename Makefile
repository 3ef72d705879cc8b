# meepo: `make demo` runs the quickstart on the embedded default, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev

.PHONY: demo test test-fast lint bench chaos venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]' --config-settings editable_mode=compat
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/quickstart.py

# `make test` runs every tier (tests/unit, integration, process, model) on SQLite, MariaDB
# and PostgreSQL, in TEST_WORKERS pytest-xdist workers; each worker has databases and a
# Redis db of its own (tests/support/backends.py). TEST_WORKERS=0 runs it in one process.
# `make test-fast` runs tests/unit alone: no server, no redis-server binary, seconds.
TEST_WORKERS ?= 4
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-fast: venv
	$(PY) -m pytest -q tests/unit

lint: venv
	$(VENV)/bin/ruff check meepo meepo_pytest.py tests examples benchmarks migrations chaos
	$(VENV)/bin/ruff format --check meepo meepo_pytest.py tests examples benchmarks migrations chaos
	$(VENV)/bin/mypy --strict meepo meepo_pytest.py
	$(VENV)/bin/mypy --strict tests
	$(VENV)/bin/lint-imports

# The benchmarks compare meepo with other queues (the `bench` extra): they get a venv of
# their own, as arq pins redis-py below 6 (meepo's tests and type checks use the latest).
# A full run (3 runs of everything) takes 20-25 minutes; BENCH_ARGS=--quick: ~5 (the
# other benchmarks below take --quick from BENCH_ARGS too). docs/performance.md says
# what each one measures and its target. The servers: MEEPO_BENCH_MYSQL_URL,
# MEEPO_BENCH_PG_URL, MEEPO_BENCH_REDIS_URL (a --redis in BENCH_ARGS reaches
# benchmarks.run only).
BENCH_VENV ?= .venv-bench
BENCH_ARGS ?=
BENCH_QUICK := $(if $(findstring --quick,$(BENCH_ARGS)),--quick)
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q -e '.[dev,bench]'
	touch $@

bench: $(BENCH_VENV)/.installed
	PY_SPY=$(BENCH_VENV)/bin/py-spy $(BENCH_VENV)/bin/python -m benchmarks.run $(BENCH_ARGS)
	$(BENCH_VENV)/bin/python -m benchmarks.io_bound $(BENCH_QUICK)
	$(BENCH_VENV)/bin/python -m benchmarks.costs $(BENCH_QUICK)
	$(BENCH_VENV)/bin/python -m benchmarks.wait_latency $(BENCH_QUICK)
	$(BENCH_VENV)/bin/python -m benchmarks.lateness
	$(BENCH_VENV)/bin/python -m benchmarks.async_push

# The chaos harness (chaos/README.md): a real workload under injected faults, then the
# invariants. `make chaos SEED=7 DURATION=300 BACKENDS=postgres` reproduces a run (about
# 3 minutes per backend at the defaults); CHAOS_ARGS passes more, e.g.
# CHAOS_ARGS="--skip worker_pause,db_restart --keep".
SEED ?= 1
DURATION ?= 120
BACKENDS ?= mariadb,postgres
CHAOS_ARGS ?=
chaos: venv
	$(PY) -m chaos.run --seed $(SEED) --duration $(DURATION) --backends $(BACKENDS) $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) .meepo .pytest_cache .mypy_cache
