"""Replicas sharing one b10fs directory, as real processes against the counting origin.

Each replica is ``python -m ttfs resolve`` (or a mount) with its own local cache and download
dir and one shared dir, the way pods of one model share a b10fs volume. The origin is
rate-limited so that replicas started together really overlap. What is asserted is what went
over the wire: the origin serves each blob about once however many replicas start, a warm
shared cache costs the origin nothing, and a replica killed while holding a blob's lock delays
the others by at most the stale-lock timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from demo.origin import Origin
from tests.origin_helpers import (
    REPO_ROOT,
    assert_same_files,
    cli_env,
    manifest_for,
    write_manifest,
    write_random_files,
)
from ttfs.blocks.shared import RECORDS
from ttfs.units import KiB, MiB

SIZES = {
    "config.json": 700,
    "tokenizer.json": 300 * KiB,
    # Two shards of 8 MiB or more: only those get a replicas' verification record.
    "model-00001-of-00004.safetensors": 9 * MiB,
    "model-00002-of-00004.safetensors": 8 * MiB,
    "model-00003-of-00004.safetensors": 5 * MiB + 123,
    "model-00004-of-00004.safetensors": 4 * MiB,
}
TOTAL = sum(SIZES.values())


def b10fs_env(cache: Path, shared: Path, **extra: str) -> dict[str, str]:
    """A replica's environment: upstream's switches, a small-disk headroom, a short lock timeout."""
    return cli_env(
        cache,
        BASETEN_FS_ENABLED="1",
        USE_BASETEN_FS_TRUSS_TRANSFER="1",
        TRUSS_TRANSFER_CACHE_DIR=str(shared),
        TRUSS_TRANSFER_B10FS_MIN_REQUIRED_AVAILABLE_SPACE_GB="0",
        TTFS_SHARED_LOCK_STALE_SECS="3",
        TTFS_STATS_FILE=str(cache.parent / f"{cache.name}-stats.json"),
        **extra,
    )


def start_resolve(manifest: Path, out: Path, env: Mapping[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ttfs", "resolve", str(manifest), str(out), "--no-progress"],
        env=dict(env),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 90) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"replica did not finish in {timeout}s:\n{err[-4000:]}") from None
    assert proc.returncode == 0, f"replica failed ({proc.returncode}):\n{err[-4000:]}"
    return err


def leftovers(shared: Path) -> list[str]:
    return sorted(p.name for p in shared.iterdir() if "." in p.name and p.name != RECORDS)


@pytest.fixture
def files(origin_root: Path) -> dict[str, Path]:
    return write_random_files(origin_root, SIZES, seed=5)


@pytest.fixture
def manifest(origin: Origin, files: dict[str, Path], tmp_path: Path) -> Path:
    return write_manifest(tmp_path / "manifest.json", manifest_for(origin, files))


def test_three_replicas_fetch_each_blob_about_once_and_a_warm_start_fetches_nothing(
    origin: Origin, files: dict[str, Path], manifest: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "b10fs"
    origin.rate_limit = 3 * MiB  # per response: a 6 MiB blob takes 2 s, so replicas overlap
    procs = [
        start_resolve(manifest, tmp_path / f"out{i}", b10fs_env(tmp_path / f"cache{i}", shared))
        for i in range(3)
    ]
    logs = [finish(p) for p in procs]
    served = origin.stats.snapshot().bytes_sent
    ratio = served / TOTAL
    print(f"3 replicas: origin served {served} of {TOTAL} manifest bytes ({ratio:.3f}x)")
    assert ratio <= 1.1, "\n".join(logs)
    for i in range(3):
        assert_same_files(tmp_path / f"out{i}", files)  # all three byte-identical to the source
    digests = {json.loads(manifest.read_text())["pointers"][i]["hash"] for i in range(len(SIZES))}
    # Published, the two big ones with their verification records; no lock or partial left.
    assert {p.name for p in shared.iterdir()} == digests | {RECORDS}
    assert len(list((shared / RECORDS).iterdir())) == 2
    assert any("b10cache use: Read: True, Write: True" in log for log in logs)

    # A fourth replica on a fresh machine (empty local cache) while the shared cache is warm.
    origin.reset_stats()
    origin.rate_limit = None
    env = b10fs_env(tmp_path / "cache-warm", shared)
    finish(start_resolve(manifest, tmp_path / "out-warm", env))
    assert origin.stats.snapshot().bytes_sent == 0
    assert_same_files(tmp_path / "out-warm", files)
    stats = json.loads(Path(env["TTFS_STATS_FILE"]).read_text())
    assert stats["b10fs_enabled"] is True and stats["b10fs_decision_to_use"] is True
    assert stats["b10fs_hot_starts_files"] == len(SIZES)
    assert stats["b10fs_hot_starts_bytes"] == TOTAL
    assert stats["b10fs_cold_starts_files"] == 0 and stats["file_downloads"] == []


def test_a_killed_lock_holder_delays_others_only_until_the_stale_timeout(
    origin: Origin, files: dict[str, Path], manifest: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "b10fs"
    origin.rate_limit = 256 * KiB  # the holder is slow: it is still fetching when killed
    holder = start_resolve(manifest, tmp_path / "out-a", b10fs_env(tmp_path / "cache-a", shared))
    # Kill it once the small files are published and unlocked (not mid-copy, not between
    # publishing and unlocking: that lock would stay beside its entry until a later cleanup
    # breaks it) and big ones are locked.
    pointers = json.loads(manifest.read_text())["pointers"]
    small = [shared / p["hash"] for p in pointers if p["size"] < MiB]
    small_locks = {f"{p.name}.lock" for p in small}

    def killable() -> bool:
        held = {p.name for p in shared.glob("*.lock")}
        return all(p.exists() for p in small) and bool(held) and not held & small_locks

    deadline = time.monotonic() + 30
    while not killable():
        assert time.monotonic() < deadline, "the first replica never took a lock"
        assert holder.poll() is None, holder.communicate()[1]
        time.sleep(0.05)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    locks = sorted(shared.glob("*.lock"))
    assert locks, "the killed replica left no lock behind"
    # Pretend the holder ran on another node: only the stale timeout (3 s) can free its locks.
    for lock in locks:
        st = lock.stat()
        owner = json.loads(lock.read_text())
        lock.write_text(json.dumps({**owner, "host": "another-node"}))
        os.utime(lock, ns=(st.st_atime_ns, st.st_mtime_ns))
    origin.rate_limit = None
    t0 = time.monotonic()
    err = finish(
        start_resolve(manifest, tmp_path / "out-b", b10fs_env(tmp_path / "cache-b", shared))
    )
    elapsed = time.monotonic() - t0
    assert elapsed < 3 + 12, err
    assert "broke stale lock" in err
    assert_same_files(tmp_path / "out-b", files)
    assert leftovers(shared) == []


@pytest.mark.fuse
def test_two_mounts_sharing_a_cache_fetch_each_blob_about_once(
    origin: Origin, files: dict[str, Path], manifest: Path, tmp_path: Path
) -> None:
    from tests.mount_helpers import daemon_env, mounted, require_fuse, sha256_file, ttfs

    require_fuse()
    shared = tmp_path / "b10fs"
    origin.rate_limit = 3 * MiB
    env = daemon_env(
        TRUSS_TRANSFER_B10FS_MIN_REQUIRED_AVAILABLE_SPACE_GB="0", TTFS_SHARED_LOCK_STALE_SECS="3"
    )
    args = ("--shared-cache", str(shared))
    mnt1, mnt2 = tmp_path / "m1", tmp_path / "m2"
    with (
        mounted(manifest, mnt1, tmp_path / "cache1", *args, env=env),
        mounted(manifest, mnt2, tmp_path / "cache2", *args, env=env),
    ):
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "ttfs", "materialize", "--no-progress", str(m)],
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for m in (mnt1, mnt2)
        ]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        served = origin.stats.snapshot().bytes_sent
        print(f"2 mounts: origin served {served} of {TOTAL} manifest bytes ({served / TOTAL:.3f}x)")
        assert served <= 1.1 * TOTAL
        for m in (mnt1, mnt2):
            for rel, src in files.items():
                assert sha256_file(m / rel) == sha256_file(src)
        # Every byte of each mount came from the origin or the shared cache, the origin's
        # only about once in total (ttfs status: bytes by source, the CACHE column).
        origin_total = 0
        cache_total = 0
        for m in (mnt1, mnt2):
            doc = json.loads(ttfs("status", "--json", "--files", str(m), check=True).stdout)
            origin = sum(f["bytes_by_source"]["origin"] for f in doc["files"])
            cache = sum(f["bytes_by_source"]["cache"] for f in doc["files"])
            assert origin + cache >= TOTAL
            assert doc["mount"]["fetcher"]["shared_bytes"] == cache
            origin_total += origin
            cache_total += cache
        assert origin_total <= 1.1 * TOTAL and cache_total >= 0.9 * TOTAL
    assert leftovers(shared) == []


def test_truss_transfer_drop_in_fills_and_then_hits_b10fs(
    origin: Origin,
    files: dict[str, Path],
    manifest: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import truss_transfer

    shared = tmp_path / "b10fs"
    env = b10fs_env(tmp_path / "cache1", shared, TTFS_MANIFEST_PATHS=str(manifest))
    for name in (
        "BASETEN_FS_ENABLED",
        "USE_BASETEN_FS_TRUSS_TRANSFER",
        "TRUSS_TRANSFER_CACHE_DIR",
        "TRUSS_TRANSFER_B10FS_MIN_REQUIRED_AVAILABLE_SPACE_GB",
        "TTFS_CACHE_DIR",
        "TTFS_MANIFEST_PATHS",
        "TTFS_STATS_FILE",
    ):
        monkeypatch.setenv(name, env[name])
    stats_file = Path(env["TTFS_STATS_FILE"])
    assert truss_transfer.lazy_data_resolve(str(tmp_path / "d1")) == str(tmp_path / "d1")
    cold = json.loads(stats_file.read_text())
    assert cold["b10fs_enabled"] is True and cold["b10fs_decision_to_use"] is True
    assert (cold["b10fs_cold_starts_files"], cold["b10fs_cold_starts_bytes"]) == (len(SIZES), TOTAL)
    assert cold["b10fs_hot_starts_files"] == 0 and len(cold["file_downloads"]) == len(SIZES)
    # Another replica (fresh local cache): every file is a b10fs hit, nothing from the origin.
    origin.reset_stats()
    monkeypatch.setenv("TTFS_CACHE_DIR", str(tmp_path / "cache2"))
    truss_transfer.lazy_data_resolve(str(tmp_path / "d2"))
    assert origin.stats.snapshot().bytes_sent == 0
    hot = json.loads(stats_file.read_text())
    assert (hot["b10fs_hot_starts_files"], hot["b10fs_hot_starts_bytes"]) == (len(SIZES), TOTAL)
    assert hot["b10fs_cold_starts_files"] == 0 and hot["file_downloads"] == []
    assert_same_files(tmp_path / "d2", files)
    # Plain local files, not symlinks into b10fs as upstream makes them ...
    assert not any(p.is_symlink() for p in (tmp_path / "d2").rglob("*"))
    # ... unless TTFS_SHARED_HOTSTART=symlink asks for upstream's output: every file a link to
    # its entry (all verified by a record or a hash first), no byte copied or fetched.
    monkeypatch.setenv("TTFS_CACHE_DIR", str(tmp_path / "cache3"))
    monkeypatch.setenv("TTFS_SHARED_HOTSTART", "symlink")
    truss_transfer.lazy_data_resolve(str(tmp_path / "d3"))
    assert origin.stats.snapshot().bytes_sent == 0
    linked = json.loads(stats_file.read_text())
    assert (linked["b10fs_hot_starts_files"], linked["b10fs_hot_starts_bytes"]) == (
        len(SIZES),
        TOTAL,
    )
    pointers = {p["file_name"]: p["hash"] for p in json.loads(manifest.read_text())["pointers"]}
    for name, digest in pointers.items():
        assert os.readlink(tmp_path / "d3" / name) == str((shared / digest).resolve())
    assert_same_files(tmp_path / "d3", files)


def test_replicas_trust_the_records_beside_the_entries_until_one_changes(
    origin: Origin, files: dict[str, Path], manifest: Path, tmp_path: Path
) -> None:
    """The trust rule across processes. The first replica fetches, publishes and writes a
    verification record per entry of 8 MiB or more; a new replica (empty block store: a new
    pod) copies those without hashing them and hashes the small ones. An entry written in
    place since is hashed, caught, moved aside and fetched from the origin. With
    TTFS_SHARED_TRUST=store a new replica hashes everything once and trusts only its own
    records afterwards."""
    shared = tmp_path / "b10fs"
    finish(start_resolve(manifest, tmp_path / "out1", b10fs_env(tmp_path / "cache1", shared)))
    trusted = "recorded for its unchanged b10cache entry"

    def hot_start(out: str, cache: str, **extra: str) -> str:
        for path in (tmp_path / cache / "blobs").rglob("*"):  # local copies evicted (if any)
            if path.is_file():
                path.unlink()
        origin.reset_stats()
        env = b10fs_env(tmp_path / cache, shared, **extra)
        err = finish(start_resolve(manifest, tmp_path / out, env))
        assert_same_files(tmp_path / out, files)
        return err

    def trusted_files(err: str) -> set[str]:
        return {n for n in SIZES if trusted in err.split(f"verified {n} (")[1][:80]}

    recorded = {n for n, size in SIZES.items() if size >= 8 * MiB}  # smaller: hashed
    assert {p.name for p in (shared / RECORDS).iterdir()} == {
        f"{p['hash']}.json"
        for p in json.loads(manifest.read_text())["pointers"]
        if p["file_name"] in recorded
    }
    err = hot_start("out2", "cache2")  # a new replica
    assert trusted_files(err) == recorded and origin.stats.snapshot().bytes_sent == 0

    pointers = {p["file_name"]: p["hash"] for p in json.loads(manifest.read_text())["pointers"]}
    tampered = "model-00002-of-00004.safetensors"
    with (shared / pointers[tampered]).open("r+b") as f:  # same size, one bit
        f.seek(3 * MiB + 17)
        byte = f.read(1)
        f.seek(3 * MiB + 17)
        f.write(bytes([byte[0] ^ 0x01]))
    err = hot_start("out3", "cache3")
    assert origin.stats.snapshot().bytes_sent == SIZES[tampered]
    assert f"b10cache entry {shared / pointers[tampered]} does not match" in err
    assert any(p.name.startswith(f"{pointers[tampered]}.corrupt-") for p in shared.iterdir())
    assert trusted_files(err) == recorded - {tampered}

    err = hot_start("out4", "cache4", TTFS_SHARED_TRUST="store")
    assert trusted_files(err) == set() and origin.stats.snapshot().bytes_sent == 0
    err = hot_start("out5", "cache4", TTFS_SHARED_TRUST="store")
    assert trusted_files(err) == set(SIZES) and origin.stats.snapshot().bytes_sent == 0
