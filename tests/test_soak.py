"""Soak: a mount under faults, kills and a full disk, and every byte it served checked.

For ``TTFS_SOAK_SECONDS`` (45 in ``make test``; ``make soak`` runs 600):

* the origin injects 503s, connection resets, truncated bodies and stalls (seeded);
* reader threads read random ranges of random files through the mount (``pread``, as
  loaders do) and compare every byte returned against the source; errors are allowed (the
  daemon was just killed, the origin's faults outlived the retry budget, the disk is full),
  wrong bytes are not;
* at random moments the daemon gets ``kill -9``; the mount is cleared with ``unmount()``
  (``ttfs umount``) and mounted again on the same cache, which must resume from what the
  killed daemon left (journal replay, torn blocks dropped);
* the cache lives on a small tmpfs that a filler file fills to ``ENOSPC`` and frees again.

At the end the faults stop, ``ttfs materialize`` must succeed and every file must read back
byte-identical. The counts (reads served, kills survived, bytes compared, mismatches) are
printed as one JSON line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import random
import shutil
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from demo.origin import Faults, Origin
from tests.mount_helpers import require_fuse, stop_daemon, ttfs, write_manifest
from ttfs.fuse.daemon import Daemon, mount_in_subprocess, unmount
from ttfs.fuse.kernel import is_mounted
from ttfs.procs import process_alive

SECONDS = float(os.environ.get("TTFS_SOAK_SECONDS", "45"))
MiB = 1 << 20

pytestmark = [pytest.mark.fuse, pytest.mark.slow, pytest.mark.timeout(int(SECONDS) + 400)]

# Errors a reader may see while the daemon is killed, the mount swapped, the disk full or the
# origin failing past the retry budget. Anything else is a failure of the test.
EXPECTED_ERRNOS = {
    errno.ENOTCONN,  # the daemon was killed; the mount is dead until cleared
    errno.ECONNABORTED,  # a request was in flight when the daemon died
    errno.ENOENT,  # between unmount and remount the path is the empty directory
    errno.EIO,  # the origin's faults outlived the retry budget
    errno.ENOSPC,  # the cache's disk is full
    errno.EINTR,
}


@dataclass
class Counts:
    reads: int = 0
    bytes_compared: int = 0
    mismatches: int = 0
    short_reads: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    kills: int = 0
    remounts: int = 0
    disk_fills: int = 0
    cache_wipes: int = 0
    daemon_deaths: int = 0  # daemons found dead that the test did not kill
    lock: threading.Lock = field(default_factory=threading.Lock)


def _model(root: Path, rng: random.Random) -> dict[str, bytes]:
    sizes = {
        "config.json": 2_000,
        "tokenizer.json": 300_000,
        "model-00001-of-00002.safetensors": 20 * MiB,
        "model-00002-of-00002.safetensors": 20 * MiB + 12345,
        "extra/weights.bin": 6 * MiB,
    }
    data = {}
    for name, size in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = rng.randbytes(size)
        path.write_bytes(blob)
        data[name] = blob
    return data


def _reader(mnt: Path, data: dict[str, bytes], counts: Counts, stop: threading.Event, seed: int):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    names = sorted(data)
    while not stop.is_set():
        name = rng.choice(names)
        want_all = data[name]
        size = len(want_all)
        if rng.random() < 0.1:
            offset, length = 0, size  # a whole file
        else:
            offset = rng.randrange(size)
            length = rng.choice((1, 4096, 100_000, 2 * MiB + 17, 5 * MiB))
        # A third of the reads bypass the page cache, so they reach the daemon every time.
        direct = rng.random() < 0.33
        if direct:
            offset -= offset % 4096
            length = -(-length // 4096) * 4096
        try:
            if direct:
                fd = os.open(mnt / name, os.O_RDONLY | os.O_DIRECT)
                buf = mmap.mmap(-1, length)
                try:
                    n = os.preadv(fd, [buf], offset)
                    got = bytes(buf[:n])
                finally:
                    os.close(fd)
                    buf.close()
            else:
                fd = os.open(mnt / name, os.O_RDONLY)
                try:
                    got = os.pread(fd, length, offset)
                finally:
                    os.close(fd)
        except OSError as e:
            with counts.lock:
                counts.errors[errno.errorcode.get(e.errno or 0, str(e.errno))] += 1
                if e.errno not in EXPECTED_ERRNOS:
                    counts.unexpected.append(f"{name}@{offset}+{length}: {e}")
            time.sleep(0.2 if e.errno == errno.ENOENT else 0.05)
            continue
        want = want_all[offset : offset + length]
        with counts.lock:
            counts.reads += 1
            counts.bytes_compared += len(got)
            if got != want[: len(got)]:
                counts.mismatches += 1
            elif len(got) < len(want):
                counts.short_reads += 1  # legal (an error after some pages), and checked above


def _fill(disk: Path, rng: random.Random) -> Path:
    """Write a filler file until the disk is full; return it."""
    filler = disk / f"filler-{rng.randrange(1 << 30)}"
    chunk = os.urandom(MiB)
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
        while True:
            f.write(chunk)
    return filler


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 160 MiB tmpfs: the cache's disk, small enough to fill in a moment."""
    if os.geteuid() != 0:
        pytest.skip("the soak mounts a tmpfs for its cache (root only)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_soak_faults_kills_and_a_full_disk_serve_nothing_wrong(
    tmp_path: Path, small_disk: Path
) -> None:
    require_fuse()
    rng = random.Random(int(os.environ.get("TTFS_SOAK_SEED", "13")))
    src = tmp_path / "src"
    data = _model(src, rng)
    faults = Faults(
        error_rate=0.05, reset_rate=0.04, truncate_rate=0.03, stall_rate=0.02, stall_seconds=3.0
    )
    counts = Counts()
    env = dict(os.environ, TTFS_STALL_TIMEOUT="1", TTFS_RETRY_ATTEMPTS="6")
    cache = small_disk / "cache"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "daemon.log"
    # 2 MB/s per response and 6 connections: a full fetch of the 46 MiB takes several seconds,
    # so kills, cache wipes and the full disk land in the middle of fetches.
    with Origin(src, faults=faults, rate_limit=2e6) as origin:
        manifest = tmp_path / "m.json"
        write_manifest(origin, src, manifest)

        def mount() -> Daemon:
            return mount_in_subprocess(
                [manifest],
                mnt,
                cache_dir=cache,
                log_file=log,
                env=env,
                timeout=120,
                extra_args=["--max-connections", "6"],
            )

        daemon = mount()
        stop = threading.Event()
        readers = [
            threading.Thread(target=_reader, args=(mnt, data, counts, stop, i), daemon=True)
            for i in range(3)
        ]
        for t in readers:
            t.start()
        filler: Path | None = None
        deadline = time.monotonic() + SECONDS
        try:
            while time.monotonic() < deadline:
                time.sleep(rng.uniform(1.0, 3.0))
                action = rng.random()
                if filler is not None:
                    filler.unlink()  # the disk frees again
                    filler = None
                elif action < 0.3:
                    filler = _fill(small_disk, rng)
                    counts.disk_fills += 1
                    continue
                if action < 0.55:
                    continue  # let the readers run
                if not process_alive(daemon.pid):
                    counts.daemon_deaths += 1
                os.kill(daemon.pid, 9)
                counts.kills += 1
                time.sleep(rng.uniform(0, 0.5))  # readers meet the dead mount
                unmount(mnt, pid=daemon.pid, timeout=10)
                if rng.random() < 0.4:  # the cache is lost too: everything is fetched again
                    shutil.rmtree(cache, ignore_errors=True)
                    counts.cache_wipes += 1
                daemon = mount()
                counts.remounts += 1
            if filler is not None:
                filler.unlink()
            if not process_alive(daemon.pid):
                counts.daemon_deaths += 1
        finally:
            stop.set()
            for t in readers:
                t.join(timeout=60)
        # The faults stop: everything must arrive, and every file read back whole.
        origin.faults = Faults()
        try:
            done = ttfs("materialize", str(mnt), timeout=300)
            assert done.returncode == 0, done.stderr
            final_bytes = 0
            for name, want in data.items():
                got = (mnt / name).read_bytes()
                assert got == want, f"{name} differs after the soak"
                final_bytes += len(got)
            status = json.loads(ttfs("status", "--json", str(mnt), check=True).stdout)["mount"]
            assert status["verified"] == len(data)
        finally:
            stop_daemon(mnt, daemon.pid)
            assert not is_mounted(mnt)
    report = {
        "seconds": SECONDS,
        "reads_served": counts.reads,
        "kills_survived": counts.remounts,
        "disk_fills": counts.disk_fills,
        "cache_wipes": counts.cache_wipes,
        "bytes_compared": counts.bytes_compared + final_bytes,
        "mismatches": counts.mismatches,
        "short_reads": counts.short_reads,
        "read_errors": dict(counts.errors),
        "daemon_deaths_not_ours": counts.daemon_deaths,
        "origin_requests": origin.stats.requests,
    }
    print("soak:", json.dumps(report))
    assert counts.mismatches == 0, report
    assert not counts.unexpected, counts.unexpected[:10]
    assert counts.daemon_deaths == 0, f"a daemon died without being killed: {report}"
    assert counts.reads > 0 and counts.kills == counts.remounts
    if SECONDS >= 30:
        assert counts.kills >= 1 and counts.disk_fills >= 1, report
