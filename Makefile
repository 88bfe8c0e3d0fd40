# The two commands of the README: `make run` and `make test`. Each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test test310 soak bench lint typecheck clean

run:
	@scripts/bootstrap.sh fuse,loaders
	$(PY) -m demo.run

# The oldest Python the package supports (CUDA serving images: Ubuntu 22.04, Python 3.10).
# (pyenv's shim on PATH may refuse to run it, so the interpreter itself comes first.)
PY310 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) $(shell command -v python3.10))
DROPIN_TESTS ?= tests/test_truss_compat.py tests/test_truss_switch.py tests/test_dropin_child.py

test:
	@scripts/bootstrap.sh test
	$(PY) -m pytest -q $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test310

# The drop-in (truss_transfer oracles, resolve) under Python 3.10, in its own venv.
test310:
	@if [ -z "$(PY310)" ]; then echo "test310: no python3.10 found (set PY310=...)" >&2; exit 1; fi
	@VENV=.venv310 PYTHON=$(PY310) scripts/bootstrap.sh droptest
	.venv310/bin/python -m pytest -q -p no:cacheprovider $(DROPIN_TESTS)

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
	rm -rf $(VENV) .venv310 .pytest_cache .mypy_cache .ruff_cache
