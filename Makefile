# meepo: `make demo` runs the quickstart on the embedded default, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev

.PHONY: demo test lint bench venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/quickstart.py

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check meepo tests examples benchmarks migrations
	$(VENV)/bin/ruff format --check meepo tests examples benchmarks migrations
	$(VENV)/bin/mypy --strict meepo

bench: venv
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) .meepo .pytest_cache .mypy_cache
