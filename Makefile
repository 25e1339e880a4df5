# wirefault: `make demo` runs the walk-through, `make test` runs the tests.
# Both create .venv and install what they need (PostgreSQL from Debian when missing).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo bench instructions reliability lint postgres venv clean

$(STAMP): pyproject.toml protocols/_pg_scan.c protocols/_pg_wire.h proxy/_whole_read.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

postgres:
	@bash scripts/ensure-postgres.sh

test: venv postgres
	$(PY) -m ruff check .
	$(PY) -m pytest -q

demo: venv postgres
	$(PY) scripts/demo.py

# make bench TOXIPROXY=/path/to/toxiproxy-server adds the Toxiproxy targets
# (scripts/build-toxiproxy.sh SOURCE_DIR OUTPUT_BINARY builds one from its source).
bench: venv postgres
	$(PY) tests/benchmarks/run.py $(if $(TOXIPROXY),--toxiproxy $(TOXIPROXY))

# Instructions per transaction of the Python proxies under callgrind (needs valgrind): the
# hot path's cost counted, steady on a busy machine (tests/benchmarks/instructions.py).
instructions: venv postgres
	$(PY) tests/benchmarks/instructions.py

reliability: venv postgres
	$(PY) tests/reliability/run.py

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
