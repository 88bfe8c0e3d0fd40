"""Real mounts at the edges of the host: the open-file limit, --cache-size, and other users.

* A manifest with more files than ``ulimit -n`` allows descriptors: every file is listed and
  readable, ``ttfs materialize`` succeeds and the daemon stays alive (descriptors are leased
  from a bounded LRU, ttfs/blocks/descriptors.py).
* ``--cache-size`` is enforced while mounted: blobs of other models are evicted (with their
  journals), the mount's own blobs and blobs hard-linked to resolve outputs never are.
* The cache is private: a second, unprivileged local user reads what an ``--allow-other``
  mount serves it, and cannot read the cached blobs, the index or the log.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from demo.origin import Origin
from tests.mount_helpers import (
    mounted,
    mounted_under_ulimit,
    require_fuse,
    sha256_file,
    ttfs,
    wait_for,
    write_manifest,
    write_small_files,
)
from ttfs.procs import process_alive

pytestmark = pytest.mark.fuse


@pytest.fixture(autouse=True)
def _needs_fuse() -> None:
    require_fuse()


def test_more_files_than_the_open_file_limit(tmp_path: Path) -> None:
    files = write_small_files(tmp_path / "src", 1500)
    with Origin(tmp_path / "src") as origin:
        manifest = tmp_path / "m.json"
        write_manifest(origin, tmp_path / "src", manifest)
        mnt, cache = tmp_path / "mnt", tmp_path / "cache"
        with mounted_under_ulimit(1024, manifest, mnt, cache) as (pid, log):
            limits = Path(f"/proc/{pid}/limits").read_text()
            assert re.search(r"Max open files\s+1024\s+1024", limits), limits
            listed = {str(Path(d, f).relative_to(mnt)) for d, _, fs in os.walk(mnt) for f in fs}
            assert listed == set(files)
            done = ttfs("materialize", str(mnt), timeout=120)
            assert done.returncode == 0, done.stderr
            for rel, data in files.items():  # every file read through the kernel
                assert (mnt / rel).read_bytes() == data, rel
            assert process_alive(pid)
            assert len(os.listdir(f"/proc/{pid}/fd")) < 512  # bounded, far under the limit
            text = log.read_text()
            assert "Too many open files" not in text
            assert "open-file limit (RLIMIT_NOFILE) is 1024" in text
            assert (mnt / "d00/f00000.txt").read_bytes() == files["d00/f00000.txt"]


def _blob_files(cache: Path) -> set[str]:
    return {p.name for p in (cache / "blobs").rglob("*") if p.is_file()}


def test_cache_size_is_enforced_while_mounted(tmp_path: Path) -> None:
    """A mount evicts other models' blobs (journals too) to fit --cache-size, never its own
    (even when they alone exceed it) and never blobs hard-linked to a resolve output."""
    src = tmp_path / "src"
    for model, seed in (("a", 1), ("b", 2), ("c", 3)):
        for i in range(3 if model != "c" else 1):
            path = src / model / f"w{i}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(3 << 20) + bytes([seed, i]))
    cache = tmp_path / "cache"
    with Origin(src) as origin:
        manifests = {}
        for model in "abc":
            manifests[model] = tmp_path / f"{model}.json"
            names = sorted(str(p.relative_to(src)) for p in (src / model).iterdir())
            write_manifest(origin, src, manifests[model], names=names)
        # c: resolved into an output directory (its blob is the output, hard-linked).
        out = tmp_path / "out"
        done = ttfs("resolve", "--cache-dir", str(cache), str(manifests["c"]), str(out))
        assert done.returncode == 0, done.stderr
        # a: mounted and materialized, then unmounted: its blobs stay in the cache.
        with mounted(manifests["a"], tmp_path / "mnt-a", cache) as m:
            assert ttfs("materialize", str(m.mountpoint), timeout=120).returncode == 0
        a_blobs = {sha256_file(p) for p in (src / "a").iterdir()}
        c_blob = sha256_file(src / "c" / "w0.bin")
        assert a_blobs | {c_blob} <= _blob_files(cache)
        journals = [cache / "blobs" / h[:2] / f"{h}.journal" for h in a_blobs]
        for j in journals:
            j.write_bytes(b"\0" * 16)  # as a killed writer leaves them
        # b: 9 MiB alone, over a 4 MiB limit. Everything of a goes; b and c stay.
        with mounted(manifests["b"], tmp_path / "mnt-b", cache, "--cache-size", "4M") as m:
            wait_for(
                lambda: (
                    not (a_blobs & _blob_files(cache)) and not any(j.exists() for j in journals)
                ),
                30,
                "a's blobs and journals evicted",
            )
            assert ttfs("materialize", str(m.mountpoint), timeout=120).returncode == 0
            time.sleep(2.5)  # one more evictor pass with everything of b landed
            for p in (src / "b").iterdir():
                assert (m.mountpoint / "b" / p.name).read_bytes() == p.read_bytes()
            b_blobs = {sha256_file(p) for p in (src / "b").iterdir()}
            assert b_blobs | {c_blob} <= _blob_files(cache)
            text = m.log_text()
            assert "evicted blob" in text and "over --cache-size" in text
        assert (out / "c" / "w0.bin").read_bytes() == (src / "c" / "w0.bin").read_bytes()


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *cmd],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=30,
        check=False,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_another_user_reads_what_the_mount_serves_and_not_the_cache(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    # Under a world-traversable directory, so the cache's own modes are what stops nobody.
    base = Path(tempfile.mkdtemp(prefix="ttfs-perms-", dir="/tmp"))
    try:
        base.chmod(0o755)
        src = tmp_path / "src"
        src.mkdir()
        secret = os.urandom(3 << 20)
        (src / "weights.bin").write_bytes(secret)
        blob = sha256_file(src / "weights.bin")
        cache, mnt, out = base / "cache", base / "mnt", base / "out"
        old = os.umask(0)  # a permissive umask must not widen the cache
        try:
            with Origin(src) as origin:
                manifest = base / "m.json"
                write_manifest(origin, src, manifest)
                manifest.chmod(0o644)
                with mounted(manifest, mnt, cache, "--allow-other", "--log-file", str(base / "l")):
                    assert ttfs("materialize", str(mnt), timeout=120).returncode == 0
                    served = _as_nobody("sha256sum", str(mnt / "weights.bin"))
                    assert served.returncode == 0 and served.stdout.split()[0] == blob
                    data = cache / "blobs" / blob[:2] / blob
                    for path in (data, cache / "index" / "cache.db", base / "l"):
                        denied = _as_nobody("cat", str(path))
                        assert denied.returncode != 0 and "Permission denied" in denied.stderr
                    assert _as_nobody("ls", str(cache)).returncode != 0
                    assert data.stat().st_mode & 0o777 == 0o600
                    assert (cache.stat().st_mode & 0o777, data.parent.stat().st_mode & 0o777) == (
                        0o700,
                        0o700,
                    )
                with mounted(manifest, mnt, cache, "--no-allow-other"):
                    assert (mnt / "weights.bin").read_bytes()[:16] == secret[:16]
                    assert _as_nobody("cat", str(mnt / "weights.bin")).returncode != 0
                # A resolve output is the user's file (mode from the umask); the blob it is
                # hard-linked to stays unreachable through the cache.
                done = ttfs("resolve", "--cache-dir", str(cache), str(manifest), str(out))
                assert done.returncode == 0, done.stderr
        finally:
            os.umask(old)
        assert os.stat(out / "weights.bin").st_ino == os.stat(data).st_ino
        assert _as_nobody("cat", str(out / "weights.bin")).returncode == 0
        assert _as_nobody("cat", str(data)).returncode != 0
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(base)
