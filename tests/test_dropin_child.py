"""``lazy_data_resolve`` resolves in a child process and gives the caller's GIL back (issue 12).

Against the real counting origin and real processes, proves:

* the resolve ran in another process: its log records reach the caller's handlers (caplog)
  stamped with a pid that is not the caller's, and that process is gone when the call returns;
  ``TTFS_RESOLVE_CHILD=off`` keeps it in the caller;
* the caller's waiting thread is free: it spends almost no CPU while the child does the work,
  and Python code in the caller's main thread makes progress meanwhile;
* errors round-trip: same class, same one-line message and same cause class as in-process, for
  a bad variable, a bad manifest and a failed download;
* killing the caller (SIGKILL, SIGTERM, SIGINT) leaves no child behind and frees the resolve's
  flock;
* an interpreter that is not Python (an embedded host's ``sys.executable``, or one named in
  ``TTFS_RESOLVE_CHILD`` that cannot run us) falls back to resolving in the caller.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import truss_transfer
from demo.origin import Origin
from tests.origin_helpers import (
    REPO_ROOT,
    assert_same_files,
    children,
    manifest_for,
    write_manifest,
    write_random_files,
)
from ttfs.errors import ConfigError
from ttfs.procs import process_alive
from ttfs.units import MiB


@pytest.fixture
def served(origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    files = write_random_files(origin.root, {"w.bin": 3 * MiB + 5, "c.json": 400}, seed=41)
    manifest = write_manifest(tmp_path / "m.json", manifest_for(origin, files))
    monkeypatch.setenv("TTFS_MANIFEST_PATHS", str(manifest))
    return files


def resolver_pids(caplog: pytest.LogCaptureFixture) -> set[int]:
    return {
        r.process
        for r in caplog.records
        if r.name.startswith("ttfs") and r.getMessage().startswith("Starting downloads to:")
        if r.process is not None
    }


def test_the_resolve_runs_in_a_child_process(
    served: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    assert truss_transfer.lazy_data_resolve(str(out)) == str(out)
    assert_same_files(out, served)
    (pid,) = resolver_pids(caplog)
    assert pid != os.getpid()
    assert not process_alive(pid)  # waited for: nothing left behind


def test_resolve_child_off_resolves_in_the_caller(
    served: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("TTFS_RESOLVE_CHILD", "off")
    out = tmp_path / "out"
    assert truss_transfer.lazy_data_resolve(str(out)) == str(out)
    assert_same_files(out, served)
    assert resolver_pids(caplog) == {os.getpid()}


def test_the_waiting_thread_is_free_while_the_child_works(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write_random_files(origin.root, {"w.bin": 24 * MiB}, seed=42)
    manifest = write_manifest(tmp_path / "m.json", manifest_for(origin, files))
    monkeypatch.setenv("TTFS_MANIFEST_PATHS", str(manifest))
    origin.rate_limit = 4e6  # per response: seconds of downloading
    out = tmp_path / "out"
    waited: dict[str, Any] = {}

    def resolve() -> None:
        start = time.thread_time()
        waited["result"] = truss_transfer.lazy_data_resolve(str(out))
        waited["cpu"] = time.thread_time() - start

    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    thread = threading.Thread(target=resolve)
    thread.start()
    loops_during_download = 0
    x = 0
    while thread.is_alive():  # "model code" in the main thread
        for i in range(10_000):
            x = (x + i * i) % 1_000_003
        if origin.stats.snapshot().bytes_sent and not (out / "w.bin").exists():
            loops_during_download += 1
    thread.join()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (children.ru_utime - children_before.ru_utime) + (
        children.ru_stime - children_before.ru_stime
    )
    assert waited["result"] == str(out)
    assert_same_files(out, files)
    assert loops_during_download > 0
    # The child (with its workers) did the resolve's work; the caller's thread only started it
    # and handed on a few log lines.
    assert waited["cpu"] < 0.15, waited
    assert child_cpu > 5 * waited["cpu"], (child_cpu, waited)


def bad_variable(origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_random_files(origin.root, {"c.json": 300}, seed=43)
    write_manifest(tmp_path / "m.json", manifest_for(origin, files))
    monkeypatch.setenv("TTFS_MANIFEST_PATHS", str(tmp_path / "m.json"))
    monkeypatch.setenv("TRUSS_TRANSFER_DOWNLOAD_MONITOR_SECS", "lots")


def bad_manifest(origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m.json").write_text("{not json")
    monkeypatch.setenv("TTFS_MANIFEST_PATHS", str(tmp_path / "m.json"))


def failed_download(origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pointer = {
        "resolution": {"url": origin.url("missing.bin"), "expiration_timestamp": 4 * 10**9},
        "uid": "u",
        "file_name": "missing.bin",
        "hashtype": "sha256",
        "hash": "ab" * 32,
        "size": 10,
    }
    write_manifest(tmp_path / "m.json", {"pointers": [pointer]})
    monkeypatch.setenv("TTFS_MANIFEST_PATHS", str(tmp_path / "m.json"))
    monkeypatch.setenv("TTFS_RETRY_ATTEMPTS", "1")


def unknown_kind(origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTFS_MANIFEST_PATHS", "")


@pytest.mark.parametrize("case", [bad_variable, bad_manifest, failed_download, unknown_kind])
def test_errors_come_back_as_in_process(
    case: Any, origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case(origin, tmp_path, monkeypatch)
    models = None
    if case is unknown_kind:
        models = [truss_transfer.PyModelRepo("org/model", kind="ftp")]
    caught: dict[str, BaseException] = {}
    for mode in ("off", "auto"):
        monkeypatch.setenv("TTFS_RESOLVE_CHILD", mode)
        with pytest.raises(Exception) as info:
            truss_transfer.lazy_data_resolve(str(tmp_path / "out"), models, "/m")
        caught[mode] = info.value
    here, child = caught["off"], caught["auto"]
    assert type(child) is type(here)
    assert str(child) == str(here) and "\n" not in str(child)
    assert type(child.__cause__) is type(here.__cause__)
    if case is failed_download:
        assert str(child).startswith("Download failure: ") and "missing.bin" in str(child)
        assert getattr(child.__cause__, "file_name", None) == "missing.bin"


CALLER = """
import signal, sys, threading, time, truss_transfer
if sys.argv[2] == "busy":
    # Another thread that takes signals, the main thread blocking them: the kernel then hands
    # Ctrl-C to the other thread and Python only flags it for the main thread, which waits on
    # the child (what a busy server's threads make likely).
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
print("calling", flush=True)
truss_transfer.lazy_data_resolve(sys.argv[1])
print("returned", flush=True)
"""


@pytest.mark.parametrize(
    ("sig", "threads"),
    [
        (signal.SIGKILL, "one"),
        (signal.SIGTERM, "one"),
        (signal.SIGINT, "one"),
        (signal.SIGINT, "busy"),
    ],
)
def test_killing_the_caller_kills_the_child(
    sig: signal.Signals, threads: str, origin: Origin, tmp_path: Path
) -> None:
    files = write_random_files(origin.root, {"w.bin": 24 * MiB}, seed=44)
    manifest = write_manifest(tmp_path / "m.json", manifest_for(origin, files))
    # 100 KB/s per response: however many ranges run at once, the download lasts long
    # enough that the caller is killed in the middle of it, never after it.
    origin.rate_limit = 1e5
    out = tmp_path / "out"
    env = {**os.environ, "TTFS_MANIFEST_PATHS": str(manifest), "PYTHONPATH": str(REPO_ROOT)}
    caller = subprocess.Popen(
        [sys.executable, "-c", CALLER, str(out), threads],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while origin.stats.snapshot().bytes_sent == 0:
            assert caller.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        (child,) = children(caller.pid)
        assert process_alive(child)
        caller.send_signal(sig)
        caller.wait(timeout=30)  # the download would take minutes
        deadline = time.monotonic() + 20
        while process_alive(child):
            assert time.monotonic() < deadline, f"child {child} outlived its caller"
            time.sleep(0.05)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    assert caller.stdout is not None and "returned" not in caller.stdout.read()
    assert not (out / "w.bin").exists()
    # The child's flock on the store went with it: a new resolve would not wait.
    fd = os.open(out / ".ttfs" / "resolve.lock", os.O_RDWR)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # the dying child's workers may hold it a moment
                assert time.monotonic() < deadline, "the resolve lock is still held"
                time.sleep(0.05)
    finally:
        os.close(fd)


def test_an_interpreter_that_is_not_python_resolves_in_the_caller(
    served: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TTFS_LOG", "debug")  # lazy_data_resolve sets the level from the env
    monkeypatch.setattr(sys, "executable", "/usr/bin/uwsgi")  # an embedded host ...
    monkeypatch.setenv("TTFS_WORKERS", "0")  # ... where worker processes cannot start either
    out = tmp_path / "out"
    assert truss_transfer.lazy_data_resolve(str(out)) == str(out)
    assert_same_files(out, served)
    assert resolver_pids(caplog) == {os.getpid()}
    assert any("resolving in this process" in r.getMessage() for r in caplog.records)

    # Named, executable, but not a Python that can run the child: tried once, then here.
    caplog.clear()
    false = next(p for p in ("/bin/false", "/usr/bin/false") if os.path.exists(p))
    monkeypatch.setenv("TTFS_RESOLVE_CHILD", false)
    assert truss_transfer.lazy_data_resolve(str(tmp_path / "out2")) == str(tmp_path / "out2")
    assert_same_files(tmp_path / "out2", served)
    assert resolver_pids(caplog) == {os.getpid()}

    monkeypatch.setenv("TTFS_RESOLVE_CHILD", str(tmp_path / "no-such-python"))
    with pytest.raises(ConfigError, match="TTFS_RESOLVE_CHILD="):
        truss_transfer.lazy_data_resolve(str(out))
