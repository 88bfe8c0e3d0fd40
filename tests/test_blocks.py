"""Block store: sparse files, presence persistence order, checksums, verification, eviction."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.fakes import ramp
from ttfs.blocks import BlobSpec, BlockStore, checker_for
from ttfs.errors import CacheFull

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
