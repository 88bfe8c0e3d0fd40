"""One owner per cache directory (ttfs.owner): the lock, and processes that share a cache.

Real processes on one cache directory against the counting origin: a second resolve fetches
through the first (each byte fetched once), a killed owner frees the directory at once (the
kernel drops ``flock``) and the next run resumes from the journal, and a process that cannot be
served waits (bounded) and fails with one line naming the owner.
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
import trio

from demo.origin import Origin
from tests.origin_helpers import (
    REPO_ROOT,
    assert_same_files,
    cli_env,
    manifest_for,
    write_manifest,
    write_random_files,
)
from ttfs.errors import CacheBusy
from ttfs.owner import OwnerInfo, OwnerLock, claim, claim_or_wait, read_owner
from ttfs.units import MiB

SIZES = {
    "config.json": 700,
    "model-00001-of-00002.safetensors": 6 * MiB + 17,
    "model-00002-of-00002.safetensors": 5 * MiB + 123,
    "dup/copy.safetensors": 4 * MiB,
}
TOTAL = sum(SIZES.values())


def start_resolve(
    manifest: Path, out: Path, env: Mapping[str, str], *extra: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ttfs", "resolve", str(manifest), str(out), "--no-progress", *extra],
        env=dict(env),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"resolve did not finish in {timeout}s:\n{err[-4000:]}") from None
    assert proc.returncode == 0, f"resolve failed ({proc.returncode}):\n{err[-4000:]}"
    return err


@pytest.fixture
def files(origin_root: Path) -> dict[str, Path]:
    return write_random_files(origin_root, SIZES, seed=9)


@pytest.fixture
def manifest(origin: Origin, files: dict[str, Path], tmp_path: Path) -> Path:
    return write_manifest(tmp_path / "manifest.json", manifest_for(origin, files))


# -- the lock ---------------------------------------------------------------------------------
def test_one_owner_and_the_record_names_it(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = claim(cache, "ttfs mount /somewhere")
    assert isinstance(first, OwnerLock)
    try:
        second = claim(cache, "ttfs resolve")  # flock is per open file: this conflicts too
        assert isinstance(second, OwnerInfo)
        assert (second.pid, second.command, second.socket) == (
            os.getpid(),
            "ttfs mount /x"[:0] + "ttfs mount /somewhere",
            None,
        )
        first.advertise(tmp_path / "s.sock")
        assert read_owner(cache) == OwnerInfo(
            os.getpid(), "ttfs mount /somewhere", str(tmp_path / "s.sock")
        )
    finally:
        first.release()
    assert read_owner(cache) is None
    again = claim(cache)
    assert isinstance(again, OwnerLock)
    again.release()


async def test_waiting_for_an_owner_is_bounded_and_names_it(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    held = claim(cache, "ttfs resolve /out")
    assert isinstance(held, OwnerLock)
    try:
        t0 = trio.current_time()
        with pytest.raises(CacheBusy, match=rf"in use by pid {os.getpid()} \(ttfs resolve /out\)"):
            await claim_or_wait(cache, 0.5)
        assert 0.4 <= trio.current_time() - t0 < 5
    finally:
        held.release()
    got = await claim_or_wait(cache, 0.5)
    got.release()


def test_a_killed_owner_frees_the_directory_at_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    code = (
        "import sys, time; from pathlib import Path; from ttfs.owner import claim; "
        f"lock = claim(Path({str(cache)!r}), 'holder'); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        info = claim(cache)
        assert isinstance(info, OwnerInfo) and info.pid == proc.pid and info.command == "holder"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        got = claim(cache)
        assert isinstance(got, OwnerLock), got
        got.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- processes sharing one cache ----------------------------------------------------------------
def test_two_resolves_on_one_cache_fetch_each_byte_once(
    origin: Origin, files: dict[str, Path], manifest: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    # Per response: the first resolve is still busy when the second starts.
    origin.rate_limit = 1 * MiB
    first = start_resolve(manifest, tmp_path / "out-a", cli_env(cache))
    deadline = time.monotonic() + 30
    while read_owner(cache) is None or read_owner(cache).socket is None:  # type: ignore[union-attr]
        assert first.poll() is None, first.communicate()[1]
        assert time.monotonic() < deadline, "the first resolve never owned the cache"
        time.sleep(0.02)
    second = start_resolve(manifest, tmp_path / "out-b", cli_env(cache))
    err_b = finish(second)
    err_a = finish(first)
    assert f"is owned by pid {first.pid}" in err_b, err_b
    assert_same_files(tmp_path / "out-a", files)
    assert_same_files(tmp_path / "out-b", files)
    served = origin.stats.snapshot().bytes_sent
    # Each distinct blob once (the duplicate names share nothing here: all sizes differ).
    assert served == TOTAL, f"origin served {served} of {TOTAL}\n{err_a}\n{err_b}"
    assert not (cache / "owner.sock").exists()


def test_a_killed_owner_is_resumed_by_the_next_run(
    origin: Origin, files: dict[str, Path], manifest: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    origin.rate_limit = 2 * MiB
    first = start_resolve(manifest, tmp_path / "out", cli_env(cache))
    deadline = time.monotonic() + 60
    while origin.stats.snapshot().bytes_sent < TOTAL // 3:
        assert first.poll() is None, first.communicate()[1]
        assert time.monotonic() < deadline, "the first resolve made no progress"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    sent_before = origin.stats.snapshot().bytes_sent
    origin.rate_limit = None
    err = finish(start_resolve(manifest, tmp_path / "out", cli_env(cache)))
    assert "in use by" not in err and "is owned by" not in err, err
    assert_same_files(tmp_path / "out", files)
    again = origin.stats.snapshot().bytes_sent - sent_before
    # The second run fetched only what the first had not landed (socket buffers aside).
    assert again <= TOTAL - sent_before + 2 * MiB, (again, sent_before, TOTAL)
    assert again < TOTAL


def test_a_mount_waits_for_a_resolve_that_owns_the_cache_then_fails_naming_it(
    tmp_path: Path,
) -> None:
    """The daemon side of claim_or_wait without FUSE: serve() fails before mounting anything."""
    cache = tmp_path / "cache"
    held = claim(cache, "ttfs resolve manifest.json /out")
    assert isinstance(held, OwnerLock)
    try:
        manifest = tmp_path / "m.json"
        manifest.write_text(json.dumps({"pointers": []}))
        env = cli_env(cache, TTFS_OWNER_WAIT="0.5")
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        result = subprocess.run(
            [sys.executable, "-m", "ttfs", "mount", str(manifest), str(mnt), "--foreground"],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        held.release()
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "in use by" in line]
    assert lines and f"pid {os.getpid()} (ttfs resolve manifest.json /out)" in lines[-1], (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_a_client_takes_over_when_its_owner_finishes_first(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    """A resolve of a small manifest owns the cache; a resolve of a bigger one becomes its
    client, and when the owner is done and exits mid-way, the client takes the cache over and
    resumes what the owner had landed for it."""
    files = write_random_files(
        origin_root, {"a.bin": 4 * MiB, "b.bin": 8 * MiB + 5, "c.bin": 7 * MiB}, seed=3
    )
    small = write_manifest(tmp_path / "small.json", manifest_for(origin, {"a.bin": files["a.bin"]}))
    big = write_manifest(tmp_path / "big.json", manifest_for(origin, files))
    cache = tmp_path / "cache"
    origin.rate_limit = 0.5 * MiB  # the owner's 4 MiB take 8 s: the client connects before
    owner = start_resolve(small, tmp_path / "out-a", cli_env(cache))
    deadline = time.monotonic() + 30
    while (info := read_owner(cache)) is None or info.socket is None:
        assert owner.poll() is None, owner.communicate()[1]
        assert time.monotonic() < deadline, "the first resolve never owned the cache"
        time.sleep(0.02)
    client = start_resolve(big, tmp_path / "out-b", cli_env(cache))
    finish(owner)
    err = finish(client)
    assert f"is owned by pid {owner.pid}" in err, err
    assert "; trying again" in err, err  # the owner went away mid-way
    assert_same_files(tmp_path / "out-b", files)
    served = origin.stats.snapshot().bytes_sent
    total = sum(p.stat().st_size for p in files.values())
    # Everything once, plus at most what sat in socket buffers when the owner exited.
    assert total <= served <= total + 4 * MiB, (served, total)


def test_a_client_rerun_skips_its_outputs_by_the_owners_records(
    origin: Origin, origin_root: Path, tmp_path: Path
) -> None:
    """The owner remembers what a client placed (inode, mtime), so a client's second run skips
    those files without hashing them, as an owner's own re-run would."""
    slow = write_random_files(origin_root, {"slow.bin": 24 * MiB}, seed=1)
    files = write_random_files(origin_root, {"x/one.bin": 3 * MiB, "two.json": 900}, seed=2)
    cache = tmp_path / "cache"
    origin.rate_limit = 1 * MiB  # the owner stays busy with slow.bin for the whole test
    owner = start_resolve(
        write_manifest(tmp_path / "slow.json", manifest_for(origin, slow)),
        tmp_path / "out-slow",
        cli_env(cache),
    )
    try:
        deadline = time.monotonic() + 30
        while (info := read_owner(cache)) is None or info.socket is None:
            assert owner.poll() is None, owner.communicate()[1]
            assert time.monotonic() < deadline, "the slow resolve never owned the cache"
            time.sleep(0.02)
        manifest = write_manifest(tmp_path / "m.json", manifest_for(origin, files))
        first = finish(start_resolve(manifest, tmp_path / "out", cli_env(cache)))
        assert f"is owned by pid {owner.pid}" in first, first
        second = finish(start_resolve(manifest, tmp_path / "out", cli_env(cache)))
        assert owner.poll() is None, "the owner finished too early for this test"
    finally:
        os.killpg(owner.pid, signal.SIGKILL)
        owner.communicate()
    assert_same_files(tmp_path / "out", files)
    assert second.count("already exists with correct size. Skipping download.") == 2, second
    assert "matches its hash" not in second, second
