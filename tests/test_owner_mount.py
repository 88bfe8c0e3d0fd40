"""The cache owner with a real mount: other processes fetch through the mount daemon, and a
blob discarded after a hash mismatch leaves no stale pages in the kernel.

Both tests mount with the CLI against the counting origin and read from child processes (see
tests/mount_helpers.py for why readers never run in the test process).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from demo.origin import Origin
from tests.mount_helpers import (
    REPO,
    mounted,
    require_fuse,
    run_py,
    status,
    wait_for,
    write_manifest,
)
from ttfs.control import file_status
from ttfs.units import MiB

pytestmark = pytest.mark.fuse


@pytest.fixture(autouse=True)
def _fuse() -> None:
    require_fuse()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_READ_ALL = """
import hashlib, sys
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        print(path, hashlib.sha256(f.read()).hexdigest())
"""

_LAZY = """
import sys, truss_transfer
print(truss_transfer.lazy_data_resolve(sys.argv[1]))
"""


@pytest.mark.parametrize("lazy_links", [False, True], ids=["daemon-path", "lazy-links"])
def test_mount_resolve_and_lazy_data_resolve_on_one_cache_fetch_each_byte_once(
    origin: Origin, origin_root: Path, tmp_path: Path, lazy_links: bool
) -> None:
    """Three processes on one cache: the mount (its files served by the daemon, or lazy links
    read by the kernel from the blob files the other two hard-link), ``ttfs resolve`` and
    truss_transfer's ``lazy_data_resolve``; every byte comes from the origin once."""
    rng = __import__("random").Random(4)
    names = ["a/model-00001.safetensors", "a/model-00002.safetensors", "config.json"]
    sizes = [7 * MiB + 11, 6 * MiB, 900]
    for name, size in zip(names, sizes, strict=True):
        (origin_root / name).parent.mkdir(parents=True, exist_ok=True)
        (origin_root / name).write_bytes(rng.randbytes(size))
    manifest = tmp_path / "manifest.json"
    write_manifest(origin, origin_root, manifest, names=names)
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    origin.rate_limit = 2 * MiB  # per response: the three overlap
    env = dict(os.environ, TTFS_CACHE_DIR=str(cache), TTFS_MANIFEST_PATHS=str(manifest))
    with mounted(manifest, mnt, cache, *(["--lazy-links"] if lazy_links else [])) as m:
        if lazy_links:
            assert all((mnt / n).is_symlink() for n in names)
        resolve = subprocess.Popen(
            [sys.executable, "-m", "ttfs", "resolve", str(manifest), str(tmp_path / "out-r")],
            env=env,
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        lazy = subprocess.Popen(
            [sys.executable, "-c", _LAZY, str(tmp_path / "out-l")],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        reader = run_py(_READ_ALL, *(str(mnt / n) for n in names), timeout=180)
        _, err_r = resolve.communicate(timeout=180)
        _, err_l = lazy.communicate(timeout=180)
        assert resolve.returncode == 0, err_r
        assert lazy.returncode == 0, err_l
        assert f"is owned by pid {m.pid}" in err_r, err_r
        assert f"is owned by pid {m.pid}" in err_l, err_l
        wait_for(lambda: status(mnt)["verified"] == len(names), what="all verified")
        assert (status(mnt)["lazy_links"] == "on") == lazy_links
    want = {n: _digest(origin_root / n) for n in names}
    mounted_digests = dict(line.split() for line in reader.stdout.splitlines())
    assert {Path(k).relative_to(mnt).as_posix(): v for k, v in mounted_digests.items()} == want
    for out in ("out-r", "out-l"):
        assert {n: _digest(tmp_path / out / n) for n in names} == want, out
    served = origin.stats.snapshot().bytes_sent
    assert served == sum(sizes), f"origin served {served} bytes for {sum(sizes)}"


def test_a_hash_mismatch_drops_the_pages_a_reader_has_cached(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    rng = __import__("random").Random(7)
    good, bad = rng.randbytes(6 * MiB), rng.randbytes(6 * MiB)
    target = origin_root / "w.bin"
    target.write_bytes(good)
    manifest = tmp_path / "manifest.json"
    write_manifest(origin, origin_root, manifest, names=["w.bin"])  # promises sha256(good)
    target.write_bytes(bad)  # ... but the origin first serves other bytes of the same size
    # The origin is fixed (a rename: requests that opened the bad file keep it) the moment the
    # first fetch's requests have all opened it, by a thread of this process watching the
    # origin's counters; every request waits 2 s before the origin opens the file, so the
    # refetch that follows the mismatch (it cannot start before those bytes were sent) opens
    # the fixed one. Fixing it after the reader below returned raced with that refetch on a
    # busy machine (the reader is another interpreter), and a blob that fails twice stays failed.
    origin.latency = 2.0
    fixed = threading.Event()

    def fix_once_served() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            served = origin.stats.snapshot().by_path
            if sum(p.bytes for k, p in served.items() if k.endswith("/w.bin")) >= len(bad):
                tmp = origin_root / "w.bin.tmp"
                tmp.write_bytes(good)
                tmp.replace(target)
                fixed.set()
                return
            time.sleep(0.005)

    fixer = threading.Thread(target=fix_once_served, daemon=True)
    fixer.start()
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    with mounted(manifest, mnt, cache, "--no-prefetch") as m:
        path = mnt / "w.bin"
        first = run_py(_READ_ALL, str(path)).stdout.split()[1]
        assert first == hashlib.sha256(bad).hexdigest()  # the kernel now caches these pages
        fixer.join(60)
        assert fixed.is_set()
        wait_for(lambda: file_status(path)["verified"], 60, what="verified after refetch")
        again = run_py(_READ_ALL, str(path)).stdout.split()[1]
        assert again == hashlib.sha256(good).hexdigest(), m.log_text()[-3000:]
        assert "mismatch; discarding" in m.log_text()


def test_a_second_mount_of_one_cache_fails_naming_the_first(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    (origin_root / "x.bin").write_bytes(b"x" * 4096)
    manifest = tmp_path / "manifest.json"
    write_manifest(origin, origin_root, manifest, names=["x.bin"])
    cache = tmp_path / "cache"
    env = dict(os.environ, TTFS_OWNER_WAIT="1")
    with mounted(manifest, tmp_path / "mnt1", cache) as first:
        (tmp_path / "mnt2").mkdir()
        log = str(tmp_path / "mnt2.log")
        args = ["mount", "--cache-dir", str(cache), "--log-file", log]
        done = subprocess.run(
            [sys.executable, "-m", "ttfs", *args, str(manifest), str(tmp_path / "mnt2")],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert done.returncode != 0
        errors = [line for line in done.stderr.splitlines() if line.startswith("ttfs: error:")]
        assert len(errors) == 1, done.stderr
        assert f"in use by pid {first.pid}" in errors[0], errors
        assert "Traceback" not in done.stderr
        # The first mount still serves.
        assert run_py(_READ_ALL, str(tmp_path / "mnt1" / "x.bin")).stdout.split()[1] == (
            hashlib.sha256(b"x" * 4096).hexdigest()
        )
