# The two commands of the README: `make run` and `make test`. Each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test soak bench lint typecheck clean

run:
	@scripts/bootstrap.sh fuse,loaders
	$(PY) -m demo.run

test:
	@scripts/bootstrap.sh test
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The long soak (tests/test_soak.py: faults, kill -9 and remount, a full disk; every byte
# read compared) and 100 rounds of `ttfs umount` after kill -9. `make test` runs both short.
SOAK_SECONDS ?= 600
soak:
	@scripts/bootstrap.sh test
	TTFS_SOAK_SECONDS=$(SOAK_SECONDS) TTFS_UMOUNT_LOOPS=100 $(PY) -m pytest -q -s \
		tests/test_soak.py tests/test_umount.py::test_umount_after_kill_9_in_a_loop $(PYTEST_ARGS)

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
