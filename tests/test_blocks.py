"""Block store: sparse files, presence persistence order, checksums, verification, eviction."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fakes import ramp
from ttfs.blocks import Blob, BlobSpec, BlockStore, Checker, checker_for
from ttfs.blocks import store as store_module
from ttfs.errors import CacheError, CacheFull

BS = 64 * 1024


def spec_for(data: bytes, blob_id: str = "b1", hashtype: str = "sha256") -> BlobSpec:
    digest = hashlib.sha256(data).hexdigest()
    return BlobSpec(blob_id, len(data), checker_for(hashtype, digest))


def fill(store: BlockStore, spec: BlobSpec, data: bytes, blocks: range) -> None:
    blob = store.open_blob(spec)
    for i in blocks:
        start, end = blob.block_range(i)
        assert blob.writer(i).write(data[start:end]) == [i]
    store.release(blob)


def test_sparse_file_and_presence_roundtrip(tmp_path: Path) -> None:
    data = ramp(5 * BS + 123)
    spec = spec_for(data)
    with BlockStore(tmp_path, block_size=BS) as store:
        blob = store.open_blob(spec)
        assert blob.n_blocks == 6 and blob.bytes_present == 0
        assert not blob.path.exists()  # nothing fetched: no file, no descriptor yet
        w = blob.writer(2)
        assert w.write(data[2 * BS : 2 * BS + 1000]) == []  # a partial block is not present
        assert os.stat(blob.path).st_size == len(data)
        assert os.stat(blob.path).st_blocks * 512 < 2 * BS  # sparse: only what was written
        assert w.write(data[2 * BS + 1000 : 4 * BS]) == [2, 3]
        assert blob.pread(2 * BS, 10) == data[2 * BS : 2 * BS + 10]
        assert blob.missing(range(6)) == [0, 1, 4, 5]
        store.release(blob)
    with BlockStore(tmp_path, block_size=BS) as store:
        blob = store.open_blob(spec)
        assert list(blob.present) == [0, 0, 1, 1, 0, 0]
        assert blob.bytes_present == 2 * BS


def test_last_block_is_short(tmp_path: Path) -> None:
    data = ramp(2 * BS + 7)
    with BlockStore(tmp_path, block_size=BS) as store:
        fill(store, spec_for(data), data, range(3))
        blob = store.open_blob(spec_for(data))
        assert blob.complete and blob.bytes_present == len(data)
        assert blob.verify()
        store.release(blob)


def test_killed_process_loses_nothing_thanks_to_the_journal(tmp_path: Path) -> None:
    """Blocks (and half blocks) written after the last index write survive a kill -9."""
    data = ramp(3 * BS)
    store = BlockStore(tmp_path, block_size=BS)
    blob = store.open_blob(spec_for(data))
    blob.writer(0).write(data[:BS])
    store.flush()
    blob.writer(1).write(data[BS : 2 * BS])  # landed in memory, never flushed
    blob.writer(2).write(data[2 * BS : 2 * BS + 1000])  # half a block
    store._index.close()  # "kill -9": no release(), no close()
    store.fds.close_all()
    with BlockStore(tmp_path, block_size=BS) as again:
        reopened = again.open_blob(spec_for(data))
        assert list(reopened.present) == [1, 1, 0]
        assert reopened.partial == {2: 1000}
        w = reopened.writer(2)  # resumes mid-block, checksum seeded from the prefix on disk
        assert w.pos == 2 * BS + 1000
        assert w.write(data[2 * BS + 1000 :]) == [2]
        assert reopened.verify()
        again.release(reopened)


def test_a_one_block_blob_keeps_no_journal_and_a_kill_costs_that_block(tmp_path: Path) -> None:
    """A manifest of 10^4 small files must not create, append and unlink a journal per file;
    the price is one refetched block when the process dies before the index write."""
    small = ramp(BS - 5)
    store = BlockStore(tmp_path, block_size=BS)
    blob = store.open_blob(spec_for(small))
    assert blob.writer(0).write(small) == [0]
    assert not list(tmp_path.rglob("*.journal"))
    store._index.close()  # "kill -9" before any flush
    store.fds.close_all()
    with BlockStore(tmp_path, block_size=BS) as again:
        reopened = again.open_blob(spec_for(small))
        assert list(reopened.present) == [0]  # fetched again, never trusted unchecked
        assert reopened.writer(0).write(small) == [0] and reopened.verify()
        again.flush()
        again.release(reopened)
    with BlockStore(tmp_path, block_size=BS) as third:  # once in the index, it stays
        assert third.open_blob(spec_for(small)).complete


def test_journal_records_are_checked_against_the_data(tmp_path: Path) -> None:
    """After a power loss the journal may vouch for bytes that never reached the disk."""
    data = ramp(2 * BS)
    store = BlockStore(tmp_path, block_size=BS)
    blob = store.open_blob(spec_for(data))
    blob.writer(0).write(data[:BS])
    store._index.close()
    store.fds.close_all()
    path = store.data_path("b1")
    with open(path, "r+b") as f:  # the page cache was lost: block 0 is zeros on disk
        f.write(bytes(BS))
    with BlockStore(tmp_path, block_size=BS) as again:
        assert list(again.open_blob(spec_for(data)).present) == [0, 0]


def test_corrupt_block_is_dropped_on_open(tmp_path: Path) -> None:
    data = ramp(4 * BS)
    spec = spec_for(data)
    with BlockStore(tmp_path, block_size=BS) as store:
        fill(store, spec, data, range(3))
        path = store.data_path(spec.blob_id)
    with open(path, "r+b") as f:  # a torn write / disk error in block 1
        f.seek(BS + 5)
        f.write(b"\x00\x01\x02")
    with BlockStore(tmp_path, block_size=BS) as store:
        blob = store.open_blob(spec)
        assert list(blob.present) == [1, 0, 1, 0]


def test_verify_and_discard(tmp_path: Path) -> None:
    data = ramp(3 * BS)
    wrong = BlobSpec("b2", len(data), checker_for("sha256", "0" * 64))
    with BlockStore(tmp_path, block_size=BS) as store:
        fill(store, wrong, data, range(3))
        blob = store.open_blob(wrong)
        assert blob.complete and not blob.verify()
        blob.discard()
        assert blob.n_present == 0 and not any(blob.present)
        assert os.stat(blob.path).st_blocks == 0
        store.release(blob)


def test_verified_flag_survives_restart_but_not_tampering(tmp_path: Path) -> None:
    data = ramp(2 * BS)
    spec = spec_for(data)
    with BlockStore(tmp_path, block_size=BS) as store:
        fill(store, spec, data, range(2))
        blob = store.open_blob(spec)
        assert blob.verify()
        store.mark_verified(blob)
        store.release(blob)
        assert store.is_verified(spec.blob_id, len(data))
    with BlockStore(tmp_path, block_size=BS) as store:
        blob = store.open_blob(spec)
        assert blob.verified and blob.complete
        store.release(blob)
        os.utime(store.data_path(spec.blob_id), ns=(1, 1))  # someone touched the file
        assert not store.is_verified(spec.blob_id, len(data))


@pytest.mark.parametrize(
    ("hashtype", "digest", "algorithm"),
    [
        ("etag", "a" * 64, "sha256"),
        ("etag", "b" * 40, "git-sha1"),
        ("md5", "c" * 32, "md5"),
        ("etag", "_" + "d" * 32 + "_", "md5"),
        ("etag", "_" + "d" * 32 + "-13_", None),
        ("etag", "_0x8DCB1234ABCD_", None),
        ("sha256", "e" * 64, "sha256"),
        ("md5", "gcs-123456", None),
        ("whatever", "abc", None),
    ],
)
def test_checker_for(hashtype: str, digest: str, algorithm: str | None) -> None:
    checker = checker_for(hashtype, digest)
    assert checker.algorithm == algorithm
    if algorithm is None:
        assert checker.reason


def test_git_sha1_matches_git() -> None:
    content = b"hello world\n"
    checker = checker_for("etag", "3b18e512dba79e4c8300dd08aeb37f8e728b8dad")
    h = checker.new(len(content))
    h.update(content)
    assert h.hexdigest() == checker.expected


def test_eviction_is_lru_and_spares_pinned(tmp_path: Path) -> None:
    blobs = {f"blob{i}": ramp(2 * BS, seed=i) for i in range(4)}
    with BlockStore(tmp_path, block_size=BS, max_bytes=6 * BS) as store:
        for n, (bid, data) in enumerate(blobs.items()):
            spec = spec_for(data, bid)
            blob = store.open_blob(spec)
            for i in range(2):
                blob.writer(i).write(data[i * BS : (i + 1) * BS])
            blob.atime = 1000.0 + n
            store.release(blob)
        freed = store.evict({"blob0"})
        assert freed == 2 * BS  # 8 blocks > 6: the least recently used unpinned blob goes
        left = {bid for bid, _ in store.known()}
        assert left == {"blob0", "blob2", "blob3"}
        assert not store.data_path("blob1").exists()


def test_disk_full_is_cachefull(tmp_path: Path) -> None:
    data = ramp(2 * BS)
    with BlockStore(tmp_path, block_size=BS) as store:
        blob = store.open_blob(spec_for(data))
        with blob.lease() as real_fd:  # swap the leased descriptor for /dev/full
            full = os.open("/dev/full", os.O_WRONLY)
            blob._fd = full
            try:
                with pytest.raises(CacheFull):
                    blob.writer(0).write(data[:BS])
            finally:
                os.close(full)
                blob._fd = real_fd
        store.release(blob)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_descriptors_stay_bounded_whatever_the_number_of_blobs(tmp_path: Path) -> None:
    """300 open blobs, each written and read, hold at most ``max_descriptors`` descriptors."""
    before = _open_fds()
    datas = {f"blob{i:03d}": ramp(BS + i, seed=i) for i in range(300)}
    with BlockStore(tmp_path, block_size=BS, max_descriptors=8) as store:
        blobs = [store.open_blob(spec_for(d, bid)) for bid, d in datas.items()]
        assert store.fds.open_count == 0  # nothing written yet: no file, no descriptor
        for blob, data in zip(blobs, datas.values(), strict=True):
            blob.writer(0).write(data[:BS])  # data + journal descriptors, then evicted
            blob.writer(1).write(data[BS:])
            assert store.fds.open_count <= 8
        assert _open_fds() - before <= 8 + 4  # + the index's SQLite files
        for blob, data in zip(blobs, datas.values(), strict=True):
            assert blob.pread(0, len(data)) == data  # reopened on demand
            assert blob.verify()
        assert store.fds.opens > 300  # they really were closed and reopened
        for blob in blobs:
            store.release(blob)
        assert store.fds.open_count == 0
        assert not list(tmp_path.rglob("*.journal"))  # covered by the index: removed
    with BlockStore(tmp_path, block_size=BS, max_descriptors=8) as store:
        for bid, data in datas.items():  # journals and presence survived the churn
            blob = store.open_blob(spec_for(data, bid))
            assert blob.complete and blob.pread(0, len(data)) == data
            store.release(blob)


def test_a_data_file_deleted_behind_an_open_blob_is_never_served(tmp_path: Path) -> None:
    data = ramp(2 * BS)
    with BlockStore(tmp_path, block_size=BS, max_descriptors=8) as store:
        blob = store.open_blob(spec_for(data))
        blob.writer(0).write(data[:BS])
        store.fds.forget(blob)  # as if the LRU had closed it
        blob.path.unlink()
        with pytest.raises(CacheError, match="was deleted"):
            blob.pread(0, 10)
        assert blob.n_present == 0  # presence dropped: the next read fetches again
        assert blob.writer(0).write(data[:BS]) == [0]  # a fresh sparse file
        assert blob.pread(0, BS) == data[:BS]
        store.release(blob)


def _count_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = Blob.check_blocks

    def counting(self: Blob) -> list[int]:
        calls.append(self.blob_id)
        return real(self)

    monkeypatch.setattr(Blob, "check_blocks", counting)
    return calls


@pytest.mark.parametrize(
    "checker",
    [
        checker_for("etag", "_" + "d" * 32 + "-13_"),  # multipart S3 etag
        checker_for("etag", "_0x8DCB1234ABCD_"),  # Azure
        checker_for("sha256", "0" * 64),  # checkable, but --no-verify never checked it
    ],
    ids=["multipart-etag", "azure", "no-verify"],
)
def test_complete_uncheckable_blob_is_checked_once_then_trusted_by_stat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checker: Checker
) -> None:
    data = ramp(3 * BS + 5)
    spec = BlobSpec("u1", len(data), checker)
    checks = _count_checks(monkeypatch)
    with BlockStore(tmp_path, block_size=BS) as store:
        fill(store, spec, data, range(4))  # written here: every block's checksum is known
    for _ in range(3):
        with BlockStore(tmp_path, block_size=BS) as store:
            blob = store.open_blob(spec)
            assert blob.complete and not blob.verified
            store.release(blob)
    assert checks == []  # never re-read at open
    os.utime(tmp_path / "blobs" / "u1"[:2] / "u1", ns=(1, 1))  # someone touched the file
    for _ in range(2):
        with BlockStore(tmp_path, block_size=BS) as store:
            blob = store.open_blob(spec)
            assert blob.complete
            store.release(blob)
    assert checks == ["u1"]  # checked once after the change, then trusted again


def test_unreadable_boot_id_never_trusts_unsynced_flags_across_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a boot id a flag meant for "this boot" must mean "this process" only."""
    a, b = store_module._boot_id("/nonexistent"), store_module._boot_id("/nonexistent")
    assert a != b and "unknown" not in (a, b)
    data = ramp(2 * BS)
    spec = spec_for(data)
    checks = _count_checks(monkeypatch)
    monkeypatch.setattr(store_module, "BOOT_ID", a)  # the process that verified it
    store = BlockStore(tmp_path, block_size=BS)
    blob = store.open_blob(spec)
    blob.writer(0).write(data)
    assert blob.verify()
    store.mark_verified(blob)  # persisted, but not fdatasync'd (no flush or release yet)
    assert store.is_verified(spec.blob_id, len(data))
    # Killed before release or the next flush (which would sync it at once, the boot being
    # unknown): the flag stays "this process only". No close(): that flushes.
    store._index.close()
    store.fds.close_all()
    monkeypatch.setattr(store_module, "BOOT_ID", b)  # the next process, same boot (unknown)
    with BlockStore(tmp_path, block_size=BS) as store:
        assert not store.is_verified(spec.blob_id, len(data))
        blob = store.open_blob(spec)
        assert not blob.verified and checks == [spec.blob_id]  # checked again
        store.release(blob)


def test_a_fresh_blob_is_synced_once_its_data_had_time_to_reach_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Release does not wait on the dirty pages of a blob written a moment ago (the end of a
    download): its trust stays bound to this boot, which a later process of the same boot
    keeps and another boot does not. The flush of the next process to hold it syncs it once
    SYNC_AFTER has passed since the last write; then any boot trusts it. Without a boot id,
    release syncs at once."""
    data = ramp(3 * BS + 5)
    spec = spec_for(data)
    syncs: list[int] = []
    real_sync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real_sync(fd))[1])
    checks = _count_checks(monkeypatch)
    monkeypatch.setattr(store_module, "BOOT_ID", "boot-1")
    with BlockStore(tmp_path, block_size=BS) as store:
        blob = store.open_blob(spec)
        blob.writer(0).write(data)
        assert blob.verify()
        store.mark_verified(blob)
        store.release(blob)
        assert syncs == [] and store._index.get(spec.blob_id)["boot"] == "boot-1"
    with BlockStore(tmp_path, block_size=BS) as store:  # same boot: trusted as it is
        blob = store.open_blob(spec)
        assert blob.verified and checks == []
        monkeypatch.setattr(store_module, "SYNC_AFTER", 0.0)  # its data is old enough now
        store.flush()
        assert len(syncs) == 1 and store._index.get(spec.blob_id)["boot"] is None
        store.flush()
        assert len(syncs) == 1  # once
        store.release(blob)
    monkeypatch.setattr(store_module, "BOOT_ID", "boot-2")  # after a reboot
    with BlockStore(tmp_path, block_size=BS) as store:
        blob = store.open_blob(spec)
        assert blob.verified and checks == []  # synced: trusted across the reboot
        store.release(blob)

    monkeypatch.setattr(store_module, "SYNC_AFTER", 30.0)
    other = spec_for(ramp(BS, seed=9), "b2")
    with BlockStore(tmp_path, block_size=BS) as store:
        fill(store, other, ramp(BS, seed=9), range(1))
        assert store._index.get("b2")["boot"] == "boot-2"  # fresh: bound to this boot
    monkeypatch.setattr(store_module, "BOOT_ID", "boot-3")  # rebooted before any sync
    with BlockStore(tmp_path, block_size=BS) as store:
        blob = store.open_blob(other)
        assert checks == ["b2"]  # checked again (and found intact)
        store.release(blob)

    monkeypatch.setattr(store_module, "BOOT_ID", store_module._boot_id("/nonexistent"))
    syncs.clear()
    third = spec_for(ramp(BS, seed=10), "b3")
    with BlockStore(tmp_path, block_size=BS) as store:
        fill(store, third, ramp(BS, seed=10), range(1))
        assert len(syncs) == 1 and store._index.get("b3")["boot"] is None


def test_opens_of_different_blobs_do_not_wait_on_each_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow, fast = ramp(2 * BS, seed=1), ramp(2 * BS, seed=2)
    with BlockStore(tmp_path, block_size=BS) as store:
        fill(store, spec_for(slow, "slow"), slow, range(1))  # partial: checked at open
    entered, go = threading.Event(), threading.Event()
    real = Blob.check_blocks

    def stalled(self: Blob) -> list[int]:
        if self.blob_id == "slow":
            entered.set()
            go.wait(10)
        return real(self)

    monkeypatch.setattr(Blob, "check_blocks", stalled)
    with BlockStore(tmp_path, block_size=BS) as store:
        opened: list[Blob] = []
        slow_open = threading.Thread(
            target=lambda: opened.append(store.open_blob(spec_for(slow, "slow")))
        )
        slow_open.start()
        assert entered.wait(10)
        again = threading.Thread(
            target=lambda: opened.append(store.open_blob(spec_for(slow, "slow")))
        )
        again.start()  # a second open of the same blob waits for the first
        t0 = time.monotonic()
        other = store.open_blob(spec_for(fast, "fast"))  # not behind the slow one
        assert time.monotonic() - t0 < 2 and not opened
        go.set()
        slow_open.join(10)
        again.join(10)
        assert len(opened) == 2 and opened[0] is opened[1] and opened[0].refs == 2
        for blob in (*opened, other):
            store.release(blob)


def _fill_blob(store: BlockStore, blob_id: str, data: bytes, atime: float) -> None:
    blob = store.open_blob(spec_for(data, blob_id))
    for i in range(blob.n_blocks):
        start, end = blob.block_range(i)
        blob.writer(i).write(data[start:end])
    blob.atime = atime
    store.release(blob)


def test_eviction_counts_hard_links_removes_journals_and_spares_open_blobs(
    tmp_path: Path,
) -> None:
    blobs = {f"blob{i}": ramp(2 * BS, seed=i) for i in range(5)}
    with BlockStore(tmp_path / "c", block_size=BS, max_bytes=4 * BS) as store:
        for n, (bid, data) in enumerate(blobs.items()):
            _fill_blob(store, bid, data, 1000.0 + n)
        journal = Path(f"{store.data_path('blob1')}.journal")
        journal.write_bytes(b"x" * 16)  # a journal left by a killed writer
        os.link(store.data_path("blob0"), tmp_path / "output")  # a resolve output
        held = store.open_blob(spec_for(blobs["blob2"], "blob2"))  # a mount serves it
        rows = {bid: cost for bid, _, cost in store.usage()}
        assert rows["blob0"] == 0 and rows["blob1"] == 2 * BS  # the link costs nothing
        freed = store.evict()
        # 8 blocks counted > 4: blob1 then blob3 go (blob0 is linked, blob2 open).
        assert freed == 4 * BS and store.last_usage == 4 * BS
        assert {bid for bid, _ in store.known()} == {"blob0", "blob2", "blob4"}
        assert not store.data_path("blob1").exists() and not journal.exists()
        assert (tmp_path / "output").read_bytes() == blobs["blob0"]
        assert held.pread(0, 2 * BS) == blobs["blob2"]
        store.release(held)
        (tmp_path / "output").unlink()  # the output is gone: blob0 costs again
        assert store.evict() == 2 * BS
        assert {bid for bid, _ in store.known()} == {"blob2", "blob4"}


def test_cache_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        data = ramp(BS)
        with BlockStore(tmp_path / "cache", block_size=BS) as store:
            fill(store, spec_for(data, "ab12"), data, range(1))
            blob = store.open_blob(spec_for(data, "ab12"))
            blob.writer(0)  # keep it open with its journal
            store.release(blob)
    finally:
        os.umask(old)
    root = tmp_path / "cache"
    modes = {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}
    dirs = {k: m for k, m in modes.items() if (root / k).is_dir()}
    files = {k: m for k, m in modes.items() if not (root / k).is_dir()}
    assert set(dirs.values()) == {0o700}, dirs
    assert set(files.values()) == {0o600}, files
    assert any(k.startswith("index/") for k in files) and "blobs/ab/ab12" in files


def test_raise_nofile_limit_in_a_child() -> None:
    code = (
        "import resource\n"
        "from ttfs.procs import raise_nofile_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))\n"
        "print(raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "(256, 2048) (2048, 2048)"


def test_a_lease_outlives_forget_and_closes_at_its_end(tmp_path: Path) -> None:
    """A flush in another thread may still hold a lease when the blob's last reference goes:
    its descriptor must stay valid (never closed and reused under it) until the lease ends."""
    data = ramp(BS)
    with BlockStore(tmp_path, block_size=BS) as store:
        blob = store.open_blob(spec_for(data))
        blob.writer(0).write(data)
        with blob.lease() as fd:
            store.fds.forget(blob)
            assert os.pread(fd, 16, 0) == data[:16]
        assert blob._fd is None and store.fds.open_count == 0
        store.release(blob)
