"""Switching from truss-transfer to ttfs without surprises (issue 12), against real processes.

Proves, with the real counting origin, real subprocesses and (as root) a real tmpfs:

* a resolve without ``--cache-dir`` keeps its block store on the destination's filesystem: the
  outputs are hard links of the blobs, a destination on a tmpfs costs the model's size there
  and nothing elsewhere, a blob no output links to is removed, and ``kill -9`` still resumes;
* two processes resolving into one directory take turns (nothing partial or mixed, the model
  fetched once); two threads of one process too;
* ``LazyDataResolverV2`` resolves in the background while Python model code runs;
* the data plane ignores ``HTTP(S)_PROXY`` / ``ALL_PROXY`` (a counting proxy sees nothing, for
  the drop-in and for ``ttfs resolve``) and uses ``TTFS_PROXY`` when set;
* errors: ``Download failure:`` only for downloads, one line per error, and garbage in any
  numeric variable is one line and exit 1, never a traceback;
* ``import truss_transfer`` leaves httpcore alone; ``ttfs mount`` without pyfuse3 says how to
  install it; ``truss-transfer-cli`` is installed beside ``truss_transfer_cli``.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import truss_transfer
from demo.origin import Origin
from tests.origin_helpers import (
    REPO_ROOT,
    allocated_bytes,
    assert_same_files,
    leftovers,
    manifest_for,
    run_cli,
    write_manifest,
    write_random_files,
)
from ttfs.units import MiB

BLOCK = 2 * MiB


def drop_in_env(manifest: Path, **extra: str) -> dict[str, str]:
    """The test's environment for ``python -m truss_transfer``: no cache dir named."""
    env = dict(os.environ)
    env["TTFS_MANIFEST_PATHS"] = str(manifest)
    env["TTFS_RETRY_ATTEMPTS"] = "3"
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra)
    return env


def only_store(out: Path) -> list[Path]:
    """Everything the resolve left under ``out`` that is not an output: the store."""
    return [p for p in out.rglob("*") if ".ttfs" in p.parts]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 128 MiB tmpfs (another filesystem than the tmp dir and /var); needs root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


# -- 2. disk use: the store lives on the destination's filesystem ---------------------------------


def test_resolve_into_a_tmpfs_costs_the_model_once_there(
    origin: Origin, tmp_path: Path, tmpfs: Path
) -> None:
    sizes = {"a/w1.bin": 24 * MiB + 5, "a/w2.bin": 16 * MiB, "config.json": 1482}
    files = write_random_files(origin.root, sizes, seed=21)
    total = sum(sizes.values())
    manifest = write_manifest(tmp_path / "m.json", manifest_for(origin, files))
    out = tmpfs / "model"
    before = used_bytes(tmpfs)
    result = run_cli([str(out)], drop_in_env(manifest), module="truss_transfer")
    assert result.returncode == 0, result.stderr
    assert_same_files(out, files)
    grew = used_bytes(tmpfs) - before
    # The model once, plus the index (a few hundred KiB of SQLite): <= 1% beyond the model.
    assert total <= grew <= total * 1.01 + 512 * 1024, (grew, total)
    # Every output is the store's blob (one inode, two names): no second copy anywhere.
    blobs = [p for p in (out / ".ttfs" / "blobs").rglob("*") if p.is_file() and "." not in p.name]
    assert len(blobs) == len(files)
    inodes = {p.stat().st_ino for p in blobs}
    for rel in sizes:
        st = (out / rel).stat()
        assert st.st_ino in inodes and st.st_nlink == 2, rel
    # A second run fetches nothing.
    requests = origin.stats.snapshot().data_requests
    again = run_cli([str(out)], drop_in_env(manifest), module="truss_transfer")
    assert again.returncode == 0, again.stderr
    assert origin.stats.snapshot().data_requests == requests


def test_a_blob_no_output_links_to_is_removed(origin: Origin, tmp_path: Path) -> None:
    first = write_random_files(origin.root, {"v1/w.bin": 6 * MiB}, seed=22)["v1/w.bin"]
    second = write_random_files(origin.root, {"v2/w.bin": 5 * MiB}, seed=23)["v2/w.bin"]
    out = tmp_path / "out"
    for src in (first, second):
        doc = manifest_for(origin, {"w.bin": src})
        manifest = write_manifest(tmp_path / "m.json", doc)
        result = run_cli([str(out)], drop_in_env(manifest), module="truss_transfer")
        assert result.returncode == 0, result.stderr
    assert (out / "w.bin").read_bytes() == second.read_bytes()
    # The replaced version's blob is gone: the store holds exactly the output's bytes.
    assert allocated_bytes(out / ".ttfs" / "blobs") == (out / "w.bin").stat().st_blocks * 512


def test_kill_9_then_resume_with_the_store_beside_the_files(origin: Origin, tmp_path: Path) -> None:
    sizes = {"w1.bin": 24 * MiB + 1, "w2.bin": 24 * MiB + 3, "w3.bin": 20 * MiB}
    files = write_random_files(origin.root, sizes, seed=24)
    total = sum(sizes.values())
    manifest = write_manifest(tmp_path / "m.json", manifest_for(origin, files))
    out = tmp_path / "out"
    origin.rate_limit = 4e6
    # One range in flight per file: a worker reports a block when it is whole, so each range
    # in flight at the kill may have written up to a block nobody recorded (the bound below).
    proc = subprocess.Popen(
        [sys.executable, "-m", "truss_transfer", str(out)],
        env=drop_in_env(manifest, TTFS_MAX_CONNECTIONS=str(len(sizes))),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while allocated_bytes(out / ".ttfs" / "blobs") < total // 2:
            assert proc.poll() is None, "resolve ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(0.2)
    first = origin.stats.snapshot().bytes_sent
    # What reached the store's files (bytes still in socket buffers at the kill are lost, and
    # on a loaded machine that can be megabytes per connection, so count what landed).
    landed = allocated_bytes(out / ".ttfs" / "blobs")
    assert landed < total
    origin.rate_limit = None
    result = run_cli([str(out)], drop_in_env(manifest), module="truss_transfer")
    assert result.returncode == 0, result.stderr
    assert_same_files(out, files)
    assert not [p for p in leftovers(out) if ".ttfs" not in p.parts]
    second = origin.stats.snapshot().bytes_sent - first
    # The resume fetches what had not landed, plus at most a block per range in flight.
    assert second <= total - landed + len(files) * BLOCK, (second, total, landed)


# -- 7. concurrency -------------------------------------------------------------------------------


def test_two_processes_into_one_directory_take_turns(origin: Origin, tmp_path: Path) -> None:
    sizes = {"w1.bin": 12 * MiB + 7, "w2.bin": 10 * MiB, "config.json": 900}
    files = write_random_files(origin.root, sizes, seed=25)
    total = sum(sizes.values())
    manifest = write_manifest(tmp_path / "m.json", manifest_for(origin, files))
    out = tmp_path / "out"
    env = drop_in_env(manifest, TRUSS_TRANSFER_LOG="info")
    # The test holds the store's lock first (as a third resolve would), so both processes must
    # wait, whatever the machine's load; then they race for it once it is free.
    lock_dir = out / ".ttfs"
    lock_dir.mkdir(parents=True)
    held = os.open(lock_dir / "resolve.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    logs = [tmp_path / f"err{i}.log" for i in range(2)]
    procs = []
    try:
        for log_path in logs:
            with log_path.open("w") as err:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "truss_transfer", str(out)],
                        env=env,
                        cwd=REPO_ROOT,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                        text=True,
                    )
                )
        deadline = time.monotonic() + 60
        while not all("Waiting for another resolve" in p.read_text() for p in logs):
            assert all(p.poll() is None for p in procs), [p.read_text() for p in logs]
            assert time.monotonic() < deadline, [p.read_text() for p in logs]
            time.sleep(0.05)
        assert not (out / "w1.bin").exists()  # nobody wrote while the lock was held
    finally:
        os.close(held)
    for proc in procs:
        proc.wait(timeout=120)
    errs = [p.read_text() for p in logs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert_same_files(out, files)
    assert not [p for p in leftovers(out) if ".ttfs" not in p.parts]
    assert origin.stats.snapshot().bytes_sent <= total + BLOCK  # fetched once, not twice


def test_two_threads_resolving_one_directory(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = {"w.bin": 8 * MiB + 3, "config.json": 700}
    files = write_random_files(origin.root, sizes, seed=26)
    manifest = write_manifest(tmp_path / "m.json", manifest_for(origin, files))
    monkeypatch.setenv("TTFS_MANIFEST_PATHS", str(manifest))
    out = tmp_path / "out"
    results: list[Any] = []

    def call() -> None:
        try:
            results.append(truss_transfer.lazy_data_resolve(str(out)))
        except Exception as e:  # reported by the assertion below
            results.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [str(out), str(out)]
    assert_same_files(out, files)
    assert origin.stats.snapshot().bytes_sent <= sum(sizes.values()) + BLOCK


# -- 3. the background resolver -------------------------------------------------------------------


def test_lazy_data_resolver_v2_lets_model_code_run(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write_random_files(origin.root, {"w.bin": 24 * MiB}, seed=27)
    manifest = write_manifest(tmp_path / "m.json", manifest_for(origin, files))
    monkeypatch.setenv("TTFS_MANIFEST_PATHS", str(manifest))
    origin.rate_limit = 3e6  # 16 MiB ranges: the resolve takes >= 5 s
    out = tmp_path / "data"
    resolver = truss_transfer.LazyDataResolverV2(out)
    with pytest.raises(RuntimeError, match="block_until_download_complete"):
        resolver.raise_if_not_collected()
    # Python model code, in this thread, while the resolve starts (its worker processes take a
    # moment to start on a busy machine) ...
    x = 0
    deadline = time.monotonic() + 30
    while origin.stats.snapshot().bytes_sent == 0:
        assert time.monotonic() < deadline, "the resolve did not start in the background"
        for i in range(10_000):
            x = (x + i * i) % 1_000_003
    # ... and while the weights arrive.
    t0 = time.monotonic()
    for i in range(2_000_000):
        x = (x + i * i) % 1_000_003
    model_secs = time.monotonic() - t0
    assert not (out / "w.bin").exists(), "the model code did not overlap the download"
    assert resolver.block_until_download_complete() == str(out)
    resolver.raise_if_not_collected()
    assert (out / "w.bin").read_bytes() == files["w.bin"].read_bytes()
    assert model_secs < 5.0


def test_lazy_data_resolver_v2_without_manifest_and_with_a_bad_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = tmp_path / "m.json"
    monkeypatch.setenv("TTFS_MANIFEST_PATHS", str(manifest))
    assert truss_transfer.LazyDataResolverV2(tmp_path / "d").block_until_download_complete() == ""
    manifest.write_text('{"invalid": true}')
    resolver = truss_transfer.LazyDataResolverV2(tmp_path / "d")
    with pytest.raises(RuntimeError, match="Error occurred while fetching data: Failed to parse"):
        resolver.block_until_download_complete()


# -- 5. proxies -----------------------------------------------------------------------------------


class CountingProxy:
    """A forward HTTP proxy on 127.0.0.1 that counts the requests it relays."""

    def __init__(self) -> None:
        self.requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.requests += 1
                url = urlsplit(self.path)
                conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "proxy-connection"}
                conn.request(
                    "GET", url.path + (f"?{url.query}" if url.query else ""), None, headers
                )
                resp = conn.getresponse()
                body = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                conn.close()

            do_HEAD = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def proxy_vars(url: str) -> dict[str, str]:
    names = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
    return dict.fromkeys(names, url)


@pytest.mark.parametrize("surface", ["truss_transfer", "ttfs"])
def test_range_downloads_ignore_proxy_variables_and_use_ttfs_proxy(
    surface: str, origin: Origin, tmp_path: Path
) -> None:
    files = write_random_files(origin.root, {"w.bin": 5 * MiB + 1, "c.json": 300}, seed=28)
    manifest = write_manifest(tmp_path / "m.json", manifest_for(origin, files))
    with CountingProxy() as proxy:
        env = {**drop_in_env(manifest), **proxy_vars(proxy.url)}
        env.pop("NO_PROXY", None)
        env.pop("no_proxy", None)
        # The environment would route 127.0.0.1 through it (so the test can fail):
        import httpx

        with httpx.Client(proxy=proxy.url) as client:
            assert client.get(origin.url("c.json")).status_code == 200
        assert proxy.requests == 1

        def run(out: Path, extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
            if surface == "ttfs":
                args = ["resolve", str(manifest), str(out), "--no-progress"]
                return run_cli(args, {**env, **extra}, module="ttfs")
            return run_cli([str(out)], {**env, **extra}, module="truss_transfer")

        result = run(tmp_path / "direct", {})
        assert result.returncode == 0, result.stderr
        assert_same_files(tmp_path / "direct", files)
        assert proxy.requests == 1, "a range request went through HTTP(S)_PROXY"

        result = run(tmp_path / "proxied", {"TTFS_PROXY": proxy.url})
        assert result.returncode == 0, result.stderr
        assert_same_files(tmp_path / "proxied", files)
        assert proxy.requests > 1, "TTFS_PROXY was not used"


# -- 6. errors ------------------------------------------------------------------------------------

NUMERIC_VARS = [
    "TRUSS_TRANSFER_NUM_WORKERS",
    "TRUSS_TRANSFER_RANGE_DOWNLOAD_WORKERS",
    "TRUSS_TRANSFER_RANGE_DOWNLOAD_WORKERS_PER_FILE",
    "TRUSS_TRANSFER_DOWNLOAD_MONITOR_SECS",
    "TRUSS_TRANSFER_B10FS_CLEANUP_HOURS",
    "TRUSS_TRANSFER_B10FS_DOWNLOAD_SPEED_MBPS",
    "TRUSS_TRANSFER_B10FS_MAX_STALE_CACHE_SIZE_GB",
    "TRUSS_TRANSFER_B10FS_MIN_REQUIRED_AVAILABLE_SPACE_GB",
    "TTFS_BLOCK_SIZE",
    "TTFS_CACHE_MAX_BYTES",
    "TTFS_MAX_CONNECTIONS",
    "TTFS_STALL_TIMEOUT",
    "TTFS_RETRY_ATTEMPTS",
    "TTFS_FLUSH_INTERVAL",
    "TTFS_SHARED_LOCK_STALE_SECS",
    "TTFS_SHARED_HOTSTART",  # a word, not a number: the same one-line rule
]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "Error during execution:" in line]


@pytest.fixture
def one_pointer_manifest(origin: Origin, tmp_path: Path) -> Path:
    files = write_random_files(origin.root, {"c.json": 300}, seed=29)
    return write_manifest(tmp_path / "m.json", manifest_for(origin, files))


@pytest.mark.parametrize("name", NUMERIC_VARS)
def test_garbage_in_a_numeric_variable_is_one_line(
    name: str, one_pointer_manifest: Path, tmp_path: Path
) -> None:
    env = drop_in_env(
        one_pointer_manifest,
        BASETEN_FS_ENABLED="1",
        USE_BASETEN_FS_TRUSS_TRANSFER="1",
        TRUSS_TRANSFER_CACHE_DIR=str(tmp_path / "b10fs"),
    )
    env[name] = "lots"
    result = run_cli([str(tmp_path / "out")], env, module="truss_transfer")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = error_lines(result.stderr)
    assert name in line and "lots" in line, line
    assert "Download failure" not in line
    assert not (tmp_path / "out" / "c.json").exists()


def test_download_failure_is_one_line_with_upstream_text(origin: Origin, tmp_path: Path) -> None:
    doc = {
        "pointers": [
            {
                "resolution": {"url": origin.url("missing.bin"), "expiration_timestamp": 4 * 10**9},
                "uid": "u",
                "file_name": "missing.bin",
                "hashtype": "sha256",
                "hash": "ab" * 32,
                "size": 10,
            }
        ]
    }
    manifest = write_manifest(tmp_path / "m.json", doc)
    result = run_cli([str(tmp_path / "out")], drop_in_env(manifest), module="truss_transfer")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert "] Error during execution: Download failure: " in line and "missing.bin" in line
    # Reported once: no other ERROR line (the fetcher's WARN about the range may precede it).
    assert result.stderr.count("[ERROR]") == 1, result.stderr

    manifest.write_text("{not json")
    result = run_cli([str(tmp_path / "out")], drop_in_env(manifest), module="truss_transfer")
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert "Error during execution: Failed to parse JSON manifest from" in line
    assert "Download failure" not in result.stderr
    with pytest.raises(Exception, match=r"^Failed to parse JSON manifest"):
        os.environ["TTFS_MANIFEST_PATHS"] = str(manifest)
        try:
            truss_transfer.lazy_data_resolve(str(tmp_path / "out"))
        finally:
            os.environ["TTFS_MANIFEST_PATHS"] = ""


# -- 8. drifts ------------------------------------------------------------------------------------


def test_import_truss_transfer_leaves_httpcore_alone() -> None:
    code = (
        "from httpcore._async.http11 import AsyncHTTP11Connection as C\n"
        "before = C.READ_NUM_BYTES\n"
        "import truss_transfer\n"
        "assert C.READ_NUM_BYTES == before, (before, C.READ_NUM_BYTES)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_mount_without_pyfuse3_says_how_to_install_it(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.json", {"pointers": []})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code = (
        "import sys; sys.modules['pyfuse3'] = None\n"
        "from ttfs.cli import main\n"
        f"sys.argv = ['ttfs', 'mount', {str(manifest)!r}, {str(mnt)!r}]\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        line for line in done.stderr.strip().splitlines() if line.startswith("ttfs: error:")
    ]
    assert "pip install 'ttfs[fuse]'" in done.stderr and "Traceback" not in done.stderr
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize("script", ["truss-transfer-cli", "truss_transfer_cli"])
def test_console_scripts_are_installed(script: str, tmp_path: Path) -> None:
    path = shutil.which(script, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{script} is not installed in this environment (pip install -e .)")
    env = {**os.environ, "TTFS_MANIFEST_PATHS": "", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [path, str(tmp_path / "d")], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(Path(os.environ["TTFS_STATS_FILE"]).read_text())["success"] is True
