"""The b10fs shared cache: upstream's rules (settings, cleanup, headroom, speed heuristic), the
NFS-safe per-blob lock, copy-publish, and the fetch tier that reads entries, waits for other
replicas and refuses truncated or corrupt entries. Cross-process runs: test_shared_replicas.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import ttfs.blocks.shared as shared_mod
from tests.fakes import FakeProvider, pointer_for, ramp
from ttfs.blocks import Blob, BlockStore
from ttfs.blocks.identity import key_of_open
from ttfs.blocks.shared import RECORDS, SharedCache, SpaceStats, desired_speed
from ttfs.config import Settings, SharedCacheConfig
from ttfs.errors import ConfigError
from ttfs.fetch import Fetcher, Priority, open_fetcher
from ttfs.fetch.scheduler import FetcherStatistics
from ttfs.providers import ProviderSet
from ttfs.units import GiB, KiB, MiB

BS = 2 * MiB
HOUR = 3600.0


def config(directory: Path, **kw: object) -> SharedCacheConfig:
    values: dict[str, object] = {
        "directory": directory,
        "min_free_bytes": 0,
        "speed_mbps": 1.0,
        "lock_stale_secs": 2.0,
        "poll_secs": 0.02,
    }
    values.update(kw)
    return SharedCacheConfig(**values)  # type: ignore[arg-type]


def put(path: Path, data: bytes, *, age_hours: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if age_hours is not None:
        t = time.time() - age_hours * HOUR
        os.utime(path, (t, t))
    return path


# -- settings --------------------------------------------------------------------------------


def test_enabled_exactly_as_upstream(tmp_path: Path) -> None:
    assert SharedCacheConfig.from_env({}) is None
    assert SharedCacheConfig.from_env({"BASETEN_FS_ENABLED": "1"}) is None
    assert SharedCacheConfig.from_env({"USE_BASETEN_FS_TRUSS_TRANSFER": "true"}) is None
    assert (
        SharedCacheConfig.from_env(
            {"BASETEN_FS_ENABLED": "on", "USE_BASETEN_FS_TRUSS_TRANSFER": "1"}
        )
        is None
    )
    cfg = SharedCacheConfig.from_env(
        {"BASETEN_FS_ENABLED": "Y", "USE_BASETEN_FS_TRUSS_TRANSFER": "YES"}
    )
    assert cfg is not None and cfg.enabled_by == "b10fs"
    # Upstream's constants (spec §7.1).
    assert cfg.directory == Path("/cache/org/artifacts/truss_transfer_managed_v1")
    assert cfg.cleanup_hours == 96.0
    assert cfg.min_free_bytes == 100 * GiB
    assert cfg.benchmark_bytes == 128 * MiB
    assert cfg.max_stale_bytes is None and cfg.speed_mbps is None
    env = {
        "BASETEN_FS_ENABLED": "true",
        "USE_BASETEN_FS_TRUSS_TRANSFER": "1",
        "TRUSS_TRANSFER_CACHE_DIR": str(tmp_path / "b10"),
        "TRUSS_TRANSFER_B10FS_CLEANUP_HOURS": "2.5",
        "TRUSS_TRANSFER_B10FS_MAX_STALE_CACHE_SIZE_GB": "3",
        "TRUSS_TRANSFER_B10FS_MIN_REQUIRED_AVAILABLE_SPACE_GB": "0",
        "TRUSS_TRANSFER_B10FS_DOWNLOAD_SPEED_MBPS": "250",
        "TTFS_SHARED_LOCK_STALE_SECS": "7",
    }
    cfg = SharedCacheConfig.from_env(env)
    assert cfg is not None
    assert (cfg.directory, cfg.cleanup_hours, cfg.max_stale_bytes) == (
        tmp_path / "b10",
        2.5,
        3 * GiB,
    )
    assert (cfg.min_free_bytes, cfg.speed_mbps, cfg.lock_stale_secs) == (0, 250.0, 7.0)
    # --shared-cache (or TTFS_SHARED_CACHE) turns it on with the same rules, anywhere.
    opt = SharedCacheConfig.from_env({"TTFS_SHARED_CACHE": str(tmp_path / "s")})
    assert opt is not None and opt.directory == tmp_path / "s" and opt.enabled_by == "option"
    assert SharedCacheConfig.from_env({}, tmp_path / "o") is not None
    with pytest.raises(ConfigError, match="CLEANUP_HOURS"):
        SharedCacheConfig.from_env({**env, "TRUSS_TRANSFER_B10FS_CLEANUP_HOURS": "soon"})
    # Through Settings and the CLI override.
    assert Settings.from_env(env).shared_cache == cfg
    s = Settings.from_env({}, cache_dir=tmp_path, shared_cache_dir=tmp_path / "x")
    assert s.shared_cache is not None and s.shared_cache.directory == tmp_path / "x"


def test_desired_speed_is_drawn_once_per_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert desired_speed(config(tmp_path, speed_mbps=42.0)) == 42.0
    unset = config(tmp_path, speed_mbps=None)
    monkeypatch.setattr(shared_mod, "_DESIRED_SPEED", None)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    first = desired_speed(unset)
    assert 10.0 <= first < 150.0 and desired_speed(unset) == first
    draws = set()
    for _ in range(200):
        monkeypatch.setattr(shared_mod, "_DESIRED_SPEED", None)
        monkeypatch.setattr(os, "cpu_count", lambda: 64)
        draws.add(desired_speed(unset))
    assert all(10.0 <= d < 600.0 for d in draws) and max(draws) > 150.0


# -- cleanup and the decision -------------------------------------------------------------------


def test_cleanup_hours_rule_never_touches_the_current_manifest(tmp_path: Path) -> None:
    d = tmp_path / "b10"
    cache = SharedCache(config(d, cleanup_hours=96))
    put(d / "cur", b"x" * 100, age_hours=1000)  # ancient, but in the manifest
    put(d / "cur-bad", b"x" * 5, age_hours=1000)  # in the manifest, wrong size: reported, kept
    put(d / "cur-bad.lock", b"", age_hours=1000)  # side files of the current manifest: in use
    put(d / "cur.lock", b"", age_hours=1000)  # stale, beside its complete entry: broken
    put(d / "cur2", b"x" * 7, age_hours=1)
    put(d / "cur2.lock", b"", age_hours=0)  # live beside its entry: the holder is unlocking
    put(d / "old", b"o" * 10, age_hours=97)
    put(d / "old.incomplete", b"o", age_hours=200)
    put(d / "young", b"y" * 20, age_hours=95)
    (d / "subdir").mkdir()
    stats = cache.cleanup({"cur": 100, "cur-bad": 6, "cur2": 7})
    left = sorted(p.name for p in d.iterdir())
    assert left == ["cur", "cur-bad", "cur-bad.lock", "cur2", "cur2.lock", "subdir", "young"]
    assert stats.cached_bytes == 107  # only right-sized manifest entries count
    assert (stats.deleted_files, stats.deleted_bytes, stats.stale_bytes) == (2, 11, 20)
    assert stats.available_bytes > 0


def test_cleanup_max_stale_size_deletes_oldest_first(tmp_path: Path) -> None:
    d = tmp_path / "b10"
    cache = SharedCache(config(d, cleanup_hours=96, max_stale_bytes=250))
    for name, hours in [("a", 50), ("b", 40), ("c", 30), ("d", 20)]:
        put(d / name, b"z" * 100, age_hours=hours)
    put(d / "keep", b"k" * 1000, age_hours=90)  # manifest entry: never a candidate
    stats = cache.cleanup({"keep": 1000})
    assert sorted(p.name for p in d.iterdir()) == ["c", "d", "keep"]
    assert stats.stale_bytes == 200 and stats.deleted_files == 2


def test_headroom_rule_and_setting(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = SharedCache(config(tmp_path, min_free_bytes=100 * GiB))
    space = SpaceStats(available_bytes=150 * GiB, cached_bytes=10 * GiB)
    assert cache.write_allowed(space, total_bytes=59 * GiB)  # 150 > 49 + 100
    with caplog.at_level(logging.WARNING):
        assert not cache.write_allowed(space, total_bytes=61 * GiB)
    assert "Insufficient space for b10cache write" in caplog.text
    assert "Disabling write to b10cache" in caplog.text
    # The whole decision on a real (small) disk: 100 GiB headroom disables writing...
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    big = SharedCache(config(tmp_path / "b10", min_free_bytes=free + GiB))
    assert not big.decide([("h", 10)]).write
    # ...and TRUSS_TRANSFER_B10FS_MIN_REQUIRED_AVAILABLE_SPACE_GB=0 lets small disks use it.
    small = SharedCache(config(tmp_path / "b10", min_free_bytes=0))
    assert small.decide([("h", 10)]).write


def test_speed_heuristic(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "b10"
    probe = 64 * KiB
    put(d / "small", b"s" * (2 * probe))  # not bigger than 2 x probe: skipped
    put(d / "short", b"t" * 1000)  # manifest says bigger: wrong size, skipped
    put(d / "big", ramp(3 * probe))
    blobs = [("small", 2 * probe), ("short", 5 * probe), ("missing", 9 * probe), ("big", 3 * probe)]
    fast = SharedCache(config(d, benchmark_bytes=probe, speed_mbps=0.001))
    with caplog.at_level(logging.INFO):
        decision = fast.decide(blobs)
    assert decision.read and decision.speed_mbps is not None and decision.speed_mbps > 0.001
    assert "b10cache: Read speed of" in caplog.text and "desired: 0.00 MB/s" in caplog.text
    assert "b10cache use: Read: True, Write: True" in caplog.text
    slow = SharedCache(config(d, benchmark_bytes=probe, speed_mbps=1e12))
    assert not slow.decide(blobs).read
    caplog.clear()
    with caplog.at_level(logging.INFO):
        none = SharedCache(config(d, benchmark_bytes=probe, speed_mbps=1e12)).decide(blobs[:3])
    assert none.read and none.speed_mbps is None
    assert "Skipping b10cache speed check." in caplog.text


# -- locks -----------------------------------------------------------------------------------


def test_lock_create_refresh_release(tmp_path: Path) -> None:
    a, b = SharedCache(config(tmp_path)), SharedCache(config(tmp_path))
    held = a.try_lock("h")
    assert held is not None and b.try_lock("h") is None
    info = b.inspect_lock("h")
    assert info is not None and info.owner is not None
    assert info.owner["pid"] == os.getpid() and info.owner["token"] == held.token
    assert b.lock_stale("h", info) is None
    old = time.time() - 1.0
    os.utime(held.path, (old, old))
    assert a.refresh(held)
    assert time.time() - held.path.stat().st_mtime < 0.5
    a.release(held)
    assert not held.path.exists() and b.inspect_lock("h") is None


def test_stale_lock_rules_and_single_breaker(tmp_path: Path) -> None:
    a, b, c = (SharedCache(config(tmp_path, lock_stale_secs=0.3)) for _ in range(3))
    held = a.try_lock("h")
    assert held is not None
    # A live, refreshed lock is not stale; one not refreshed for the timeout is.
    info = b.inspect_lock("h")
    assert info is not None and b.lock_stale("h", info) is None
    old = time.time() - 10
    os.utime(held.path, (old, old))
    info = b.inspect_lock("h")
    assert info is not None
    reason = b.lock_stale("h", info)
    assert reason is not None and "not refreshed" in reason
    same = c.inspect_lock("h")
    assert same is not None
    assert b.break_lock("h", info, reason)
    assert not c.break_lock("h", same, "also stale")  # the second breaker loses
    # A breaker that judged an old lock but finds a fresh one renames it back.
    fresh = c.try_lock("h")
    assert fresh is not None
    assert not b.break_lock("h", info, "judged earlier")
    now = c.inspect_lock("h")
    assert now is not None and now.owner is not None and now.owner["token"] == fresh.token
    a.release(held)  # a's lock was broken: releasing must not remove c's
    assert c.inspect_lock("h") is not None
    c.release(fresh)
    assert c.inspect_lock("h") is None


def test_lock_unchanged_for_the_timeout_is_stale_despite_clock_skew(tmp_path: Path) -> None:
    a, b = (
        SharedCache(config(tmp_path, lock_stale_secs=0.2)),
        SharedCache(config(tmp_path, lock_stale_secs=0.2)),
    )
    held = a.try_lock("h")
    assert held is not None
    future = time.time() + 3600  # a server clock far ahead: the wall-clock rule cannot fire
    os.utime(held.path, (future, future))
    info = b.inspect_lock("h")
    assert info is not None and b.lock_stale("h", info) is None
    time.sleep(0.3)
    info = b.inspect_lock("h")
    assert info is not None and "unchanged" in (b.lock_stale("h", info) or "")


def test_lock_of_a_dead_local_process_is_stale_at_once(tmp_path: Path) -> None:
    cache = SharedCache(config(tmp_path, lock_stale_secs=60))
    held = cache.try_lock("h")
    assert held is not None
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    owner = json.loads(held.path.read_text())
    owner["pid"] = int(proc.stdout)
    held.path.write_text(json.dumps(owner))
    info = SharedCache(config(tmp_path, lock_stale_secs=60)).inspect_lock("h")
    assert info is not None
    assert "is gone" in (cache.lock_stale("h", info) or "")
    owner["host"] = "elsewhere"  # another machine: only the timeout can tell
    held.path.write_text(json.dumps(owner))
    info = cache.inspect_lock("h")
    assert info is not None and cache.lock_stale("h", info) is None


# -- publish -----------------------------------------------------------------------------------


def test_publish_copies_and_never_moves_the_local_file(tmp_path: Path) -> None:
    d = tmp_path / "b10"
    d.mkdir()
    cache = SharedCache(config(d))
    data = ramp(3 * MiB + 7)
    src = put(tmp_path / "local" / "blob", data)  # same filesystem: upstream would move it
    ino = src.stat().st_ino
    assert cache.publish(src, "h", len(data)) == "published"
    assert src.stat().st_ino == ino and src.read_bytes() == data
    assert (d / "h").read_bytes() == data and (d / "h").stat().st_ino != ino
    assert sorted(p.name for p in d.iterdir()) == ["h"]  # no .incomplete left
    # A right-sized entry is only touched (its atime refreshed for cleanup).
    old = time.time() - 50 * HOUR
    os.utime(d / "h", (old, old))
    assert cache.publish(src, "h", len(data)) == "present"
    assert time.time() - (d / "h").stat().st_atime < 60
    # A wrong-sized entry is replaced.
    (d / "h").write_bytes(b"short")
    assert cache.publish(src, "h", len(data)) == "published"
    assert (d / "h").read_bytes() == data


def test_publish_respects_a_copy_in_progress_and_its_timeout(tmp_path: Path) -> None:
    d = tmp_path / "b10"
    cache = SharedCache(config(d, lock_stale_secs=5))
    src = put(tmp_path / "blob", ramp(MiB))
    put(d / "h.incomplete", b"partial")  # another replica is copying right now
    assert cache.publish(src, "h", MiB) == "busy"
    assert not (d / "h").exists()
    put(d / "h.incomplete", b"partial", age_hours=1)  # abandoned by a dead replica
    assert cache.publish(src, "h", MiB) == "published"
    timed = SharedCache(config(d, publish_timeout=-1.0))
    assert timed.publish(src, "g", MiB) == "timeout"
    assert not (d / "g").exists() and not (d / "g.incomplete").exists()
    assert src.read_bytes() == ramp(MiB)


def test_truncated_entry_is_not_opened(tmp_path: Path) -> None:
    cache = SharedCache(config(tmp_path))
    put(tmp_path / "h", b"x" * 10)
    assert cache.open_entry("h", 11) is None
    entry = cache.open_entry("h", 10)
    assert entry is not None
    os.close(cache.open_for_read(entry))
    put(tmp_path / "h.new", b"y" * 10)
    os.replace(tmp_path / "h.new", tmp_path / "h")  # replaced: never read the new file blindly
    with pytest.raises(OSError, match="replaced or changed"):
        cache.open_for_read(entry)


# -- the fetch tier -------------------------------------------------------------------------------


@asynccontextmanager
async def tiered(
    settings: Settings, fake: FakeProvider, shared: Path, **kw: object
) -> AsyncIterator[Fetcher]:
    settings = settings.replace(shared_cache=config(shared, **kw))
    store = BlockStore(settings.cache_dir, block_size=settings.block_size)
    providers = ProviderSet(settings)
    providers.add("http", fake)
    try:
        async with open_fetcher(store, providers, settings) as fetcher:
            yield fetcher
    finally:
        store.close()


async def test_entry_is_read_in_parallel_ranges_not_from_origin(
    settings: Settings, tmp_path: Path
) -> None:
    data = ramp(40 * BS + 5)
    shared = tmp_path / "b10"
    put(shared / hashlib.sha256(data).hexdigest(), data)
    fake = FakeProvider({"m.bin": data})
    async with tiered(settings, fake, shared) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        await fetcher.complete(source)
        await fetcher.settled(source)
        assert source.blob.verified and source.blob.pread(0, len(data)) == data
        stats = fetcher.statistics()
    assert fake.calls == [] and stats.origin_bytes == 0
    assert stats.shared_bytes == len(data)
    assert stats.shared_requests >= 5  # 16 MiB runs in parallel, not one stream


@pytest.mark.parametrize("kernel", ["copy_file_range", "refused"])
async def test_hot_start_copies_in_the_kernel(
    kernel: str, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entry bytes reach the blob by copy_file_range (none through a Python read/write
    loop); where the kernel refuses (EXDEV), the worker thread copies and the result is
    the same. Either way the blob is hashed before use."""
    data = ramp(20 * BS + 7)
    shared = tmp_path / "b10"
    put(shared / hashlib.sha256(data).hexdigest(), data)
    copied = [0]
    real = os.copy_file_range

    def counting(src: int, dst: int, count: int, *args: int) -> int:
        if kernel == "refused":
            raise OSError(errno.EXDEV, "cross-device")
        n = real(src, dst, count, *args)
        copied[0] += n
        return n

    monkeypatch.setattr(os, "copy_file_range", counting)
    fake = FakeProvider({"m.bin": data})
    async with tiered(settings, fake, shared) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        await fetcher.complete(source)
        await fetcher.settled(source)
        assert source.blob.verified and source.blob.pread(0, len(data)) == data
        assert fetcher.statistics().shared_bytes == len(data)
    assert fake.calls == []
    assert copied[0] == (len(data) if kernel == "copy_file_range" else 0)


async def test_an_entry_this_store_verified_is_trusted_until_anything_changes_it(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trust rule, this store's own record (TTFS_SHARED_TRUST=store): a hot start of a
    blob this store verified before, from an entry with the identity recorded then, copies
    without hashing. A touch (another replica's atime update), an in-place write (same size)
    or TTFS_SHARED_TRUST=0 each bring the hash back, and a tampered entry never reaches the
    blob."""
    data = ramp(10 * BS + 3)
    digest = hashlib.sha256(data).hexdigest()
    shared = tmp_path / "b10"
    entry = put(shared / digest, data)
    hashed: list[tuple[int, int]] = []
    real_hash_blocks = Blob.hash_blocks

    def counting(blob: Blob, hasher: object, first: int, end: int, **kw: bool) -> None:
        hashed.append((first, end))
        real_hash_blocks(blob, hasher, first, end, **kw)

    monkeypatch.setattr(Blob, "hash_blocks", counting)
    fake = FakeProvider({"m.bin": data})

    async def hot_start(trust: str = "store") -> tuple[FetcherStatistics, list[tuple[int, int]]]:
        """One replica's hot start into the same local store, its copy of the blob gone."""
        hashed.clear()
        with BlockStore(settings.cache_dir, block_size=settings.block_size) as store:
            store.data_path(digest).unlink(missing_ok=True)
        async with tiered(settings, fake, shared, trust=trust) as fetcher:
            source = await fetcher.add(pointer_for("m.bin", data))
            await fetcher.complete(source)
            await fetcher.settled(source)
            assert source.blob.verified and source.blob.pread(0, len(data)) == data
            return fetcher.statistics(), list(hashed)

    first, hashes = await hot_start()  # verified by its hash, identity recorded
    assert (first.shared_bytes, first.shared_trusted) == (len(data), 0) and hashes
    with BlockStore(settings.cache_dir, block_size=settings.block_size) as store:
        assert store.key_record("shared", digest) == key_of_open(entry)

    trusted, hashes = await hot_start()  # same entry, untouched: no hash at all
    assert (trusted.shared_bytes, trusted.shared_trusted, hashes) == (len(data), 1, [])

    await trio.sleep(0.02)  # a later timestamp tick for the ctime below
    st = entry.stat()
    os.utime(entry, ns=(time.time_ns(), st.st_mtime_ns))  # another replica's atime touch
    touched, hashes = await hot_start()
    assert touched.shared_trusted == 0 and hashes  # hashed again (and recorded again)
    again, hashes = await hot_start()
    assert again.shared_trusted == 1 and hashes == []

    off, hashes = await hot_start(trust="off")
    assert off.shared_trusted == 0 and hashes

    await trio.sleep(0.02)
    with entry.open("r+b") as f:  # tampered in place: same size, one bit
        f.seek(4 * BS + 5)
        f.write(bytes([data[4 * BS + 5] ^ 0x10]))
    tampered, hashes = await hot_start()
    assert (tampered.shared_trusted, tampered.shared_corrupt) == (0, 1) and hashes
    assert fake.bytes_served == len(data)  # the blob came from the origin instead
    assert (shared / digest).read_bytes() == data  # and replaced the tampered entry


async def test_an_entry_this_store_published_is_trusted_on_its_next_hot_start(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = ramp(6 * BS + 1)
    digest = hashlib.sha256(data).hexdigest()
    shared = tmp_path / "b10"
    fake = FakeProvider({"m.bin": data})
    async with tiered(settings, fake, shared) as fetcher:  # cold: fetched, verified, published
        source = await fetcher.add(pointer_for("m.bin", data))
        await fetcher.complete(source)
        await fetcher.settled(source)
    assert fake.bytes_served == len(data) and (shared / digest).read_bytes() == data
    with BlockStore(settings.cache_dir, block_size=settings.block_size) as store:
        assert store.key_record("shared", digest) == key_of_open(shared / digest)
        store.data_path(digest).unlink()  # evicted
    hashed = []
    real_hash_blocks = Blob.hash_blocks

    def counting(blob: Blob, hasher: object, first: int, end: int, **kw: bool) -> None:
        hashed.append((first, end))
        real_hash_blocks(blob, hasher, first, end, **kw)

    monkeypatch.setattr(Blob, "hash_blocks", counting)
    async with tiered(settings, fake, shared) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        await fetcher.complete(source)
        assert source.blob.verified and source.blob.pread(0, len(data)) == data
        stats = fetcher.statistics()
    assert (stats.shared_bytes, stats.shared_trusted, hashed) == (len(data), 1, [])
    assert fake.bytes_served == len(data)  # nothing more from the origin


async def test_verified_blob_is_published_and_lock_released(
    settings: Settings, tmp_path: Path
) -> None:
    data = ramp(5 * BS + 1)
    shared = tmp_path / "b10"
    digest = hashlib.sha256(data).hexdigest()
    fake = FakeProvider({"m.bin": data}, gate=trio.Event())
    async with tiered(settings, fake, shared) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        async with trio.open_nursery() as n:
            n.start_soon(fetcher.complete, source)
            while not (shared / f"{digest}.lock").exists():  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert fake.gate is not None
            fake.gate.set()
        await fetcher.settled(source)
        local = source.blob.path
    assert (shared / digest).read_bytes() == data
    # The lock gone, nothing partial; the entry's verification record beside it.
    assert sorted(p.name for p in shared.iterdir()) == sorted([digest, RECORDS])
    assert [p.name for p in (shared / RECORDS).iterdir()] == [f"{digest}.json"]
    assert local.read_bytes() == data  # the local blob stays where it is


async def test_corrupt_entry_is_reported_moved_aside_and_replaced(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = ramp(6 * BS)
    digest = hashlib.sha256(data).hexdigest()
    shared = tmp_path / "b10"
    bad = bytearray(data)
    bad[3 * BS + 9] ^= 1
    put(shared / digest, bytes(bad))  # right size, wrong content
    fake = FakeProvider({"m.bin": data})
    with caplog.at_level(logging.WARNING):
        async with tiered(settings, fake, shared) as fetcher:
            source = await fetcher.add(pointer_for("m.bin", data))
            await fetcher.complete(source)
            await fetcher.settled(source)
            assert source.blob.pread(0, len(data)) == data
            assert fetcher.statistics().shared_corrupt == 1
    assert fake.bytes_served == len(data)  # refetched from the origin once, no failure
    assert f"b10cache entry {shared / digest} does not match sha256" in caplog.text
    names = sorted(p.name for p in shared.iterdir() if p.name != RECORDS)
    assert names[0] == digest and names[1].startswith(f"{digest}.corrupt-") and len(names) == 2
    assert (shared / digest).read_bytes() == data  # replaced by the verified copy


async def test_truncated_entry_is_never_served(settings: Settings, tmp_path: Path) -> None:
    data = ramp(3 * BS)
    digest = hashlib.sha256(data).hexdigest()
    shared = tmp_path / "b10"
    put(shared / digest, data[: 2 * BS])
    fake = FakeProvider({"m.bin": data})
    async with tiered(settings, fake, shared) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        await fetcher.complete(source)
        await fetcher.settled(source)
        assert fetcher.statistics().shared_bytes == 0
    assert fake.bytes_served == len(data)
    assert (shared / digest).read_bytes() == data


async def test_waiter_uses_the_other_replicas_entry_and_demand_goes_to_origin(
    settings: Settings, tmp_path: Path
) -> None:
    data = ramp(8 * BS)
    digest = hashlib.sha256(data).hexdigest()
    shared = tmp_path / "b10"
    other = SharedCache(config(shared))
    shared.mkdir()
    held = other.try_lock(digest)  # another replica fetches this blob
    assert held is not None
    fake = FakeProvider({"m.bin": data})
    async with tiered(settings, fake, shared, lock_stale_secs=30.0) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        async with trio.open_nursery() as n:
            n.start_soon(fetcher.complete, source, Priority.PREFETCH)
            await trio.sleep(0.3)
            assert fake.calls == []  # background work waits for the other replica
            # A blocked reader does not wait: its block comes from the origin now.
            assert await fetcher.read(source, 5 * BS, 10) == data[5 * BS : 5 * BS + 10]
            assert fake.bytes_served == BS
            other.refresh(held)
            await trio.to_thread.run_sync(
                other.publish, put(tmp_path / "theirs", data), digest, len(data)
            )
            other.release(held)
        await fetcher.settled(source)
        assert source.blob.pread(0, len(data)) == data
        stats = fetcher.statistics()
    assert stats.origin_bytes == BS and stats.shared_bytes == 7 * BS


async def test_dead_holder_does_not_block_beyond_the_stale_timeout(
    settings: Settings, tmp_path: Path
) -> None:
    data = ramp(3 * BS)
    digest = hashlib.sha256(data).hexdigest()
    shared = tmp_path / "b10"
    shared.mkdir()
    lock = shared / f"{digest}.lock"
    lock.write_text(json.dumps({"host": "gone-node", "pid": 1, "token": "x"}))  # never refreshed
    fake = FakeProvider({"m.bin": data})
    t0 = time.monotonic()
    async with tiered(settings, fake, shared, lock_stale_secs=0.5) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        await fetcher.complete(source)
        await fetcher.settled(source)
    assert 0.5 <= time.monotonic() - t0 < 5
    assert fake.bytes_served == len(data) and (shared / digest).read_bytes() == data
    assert not lock.exists()
