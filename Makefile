# The two commands of the README: `make run` and `make test`. Each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test bench lint typecheck clean

run:
	@scripts/bootstrap.sh fuse,loaders
	$(PY) -m demo.run

test:
	@scripts/bootstrap.sh test
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench:
	@TTFS_BOOTSTRAP_BENCH=1 scripts/bootstrap.sh test,bench
	$(PY) -m bench $(BENCH_ARGS)

lint:
	@scripts/bootstrap.sh test
	$(VENV)/bin/ruff check ttfs truss_transfer demo tests
	$(VENV)/bin/ruff format --check ttfs truss_transfer demo tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
