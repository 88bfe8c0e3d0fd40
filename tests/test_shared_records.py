"""b10fs verification records: a replica that verified an entry writes its inode, size, mtime and
block checksums beside it, and a new replica's hot start trusts that instead of hashing and
reading its copy back (docs/b10fs.md, "The trust rule"). Every change to the entry through the
filesystem brings the hash back, and a bad record is no record."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import trio

import ttfs.blocks.store as store_mod
from tests.fakes import FakeProvider, pointer_for, ramp
from tests.test_shared_cache import BS, config, put, tiered
from ttfs.blocks import Blob, RunWriter
from ttfs.blocks.atime import touch_atime
from ttfs.blocks.identity import key_of_open
from ttfs.blocks.shared import RECORDS, EntryRecord, SharedCache
from ttfs.config import Settings, SharedCacheConfig, shared_trust
from ttfs.fetch.scheduler import FetcherStatistics


class Replica:
    """Hot starts of one blob by replicas with their own block stores, watching what they
    hash and whether their copies read back."""

    def __init__(
        self, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes
    ) -> None:
        self.settings, self.tmp_path, self.data = settings, tmp_path, data
        self.digest = hashlib.sha256(data).hexdigest()
        self.shared = tmp_path / "b10"
        self.entry = self.shared / self.digest
        self.fake = FakeProvider({"m.bin": data})
        self.hashed: list[tuple[int, int]] = []
        self.copies: list[bool] = []  # per copy_from call: whether it had the block checksums
        self.stores = 0
        real_hash, real_copy = Blob.hash_blocks, RunWriter.copy_from

        def hash_blocks(blob: Blob, hasher: object, first: int, end: int, **kw: bool) -> None:
            self.hashed.append((first, end))
            real_hash(blob, hasher, first, end, **kw)

        def copy_from(writer: RunWriter, fd: int, length: int, sums: Any = None) -> Any:
            self.copies.append(sums is not None)
            return real_copy(writer, fd, length, sums)

        monkeypatch.setattr(Blob, "hash_blocks", hash_blocks)
        monkeypatch.setattr(RunWriter, "copy_from", copy_from)

    async def start(
        self, *, trust: str = "replicas", new_store: bool = True
    ) -> tuple[FetcherStatistics, tuple[int, ...]]:
        """A hot start (a new block store unless ``new_store`` is False); its statistics and
        the block checksums its blob ended with (checked against the bytes)."""
        self.hashed.clear()
        self.copies.clear()
        if new_store:
            self.stores += 1
        settings = self.settings.replace(cache_dir=self.tmp_path / f"store{self.stores}")
        async with tiered(settings, self.fake, self.shared, trust=trust) as fetcher:
            source = await fetcher.add(pointer_for("m.bin", self.data))
            await fetcher.complete(source)
            await fetcher.settled(source)
            blob = source.blob
            assert blob.verified and blob.pread(0, len(self.data)) == self.data
            assert await trio.to_thread.run_sync(blob.check_blocks) == []
            return fetcher.statistics(), tuple(blob.sums)

    def record(self) -> EntryRecord | None:
        return SharedCache(config(self.shared)).read_record(self.digest)


@pytest.fixture
def replica(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Replica:
    return Replica(settings, tmp_path, monkeypatch, ramp(9 * BS + 5))


async def test_a_new_store_trusts_the_record_its_publisher_wrote(replica: Replica) -> None:
    """The usual pod start: one replica fetched and published; a replica with an empty store
    copies the entry without hashing it and without reading its copy back (the checksums come
    with the record). With TTFS_SHARED_TRUST=store it hashes, as before records existed."""
    cold, sums = await replica.start()
    assert replica.fake.bytes_served == len(replica.data) and cold.shared_bytes == 0
    record = replica.record()
    key = key_of_open(replica.entry)
    assert record is not None and key is not None and record.matches(key)
    assert record.sums == sums and record.block_size == BS

    hot, hot_sums = await replica.start()
    assert (hot.shared_bytes, hot.shared_trusted, replica.hashed) == (len(replica.data), 1, [])
    assert replica.copies and all(replica.copies)  # no read back
    assert hot_sums == sums and replica.fake.bytes_served == len(replica.data)

    strict, _ = await replica.start(trust="store")
    assert strict.shared_trusted == 0 and replica.hashed and not any(replica.copies)
    off, _ = await replica.start(trust="off")
    assert off.shared_trusted == 0 and replica.hashed


async def test_an_atime_touch_keeps_the_record_a_write_does_not(replica: Replica) -> None:
    """Another replica's atime touch changes the entry's ctime, not its inode, size or mtime:
    the record still holds. Rewriting the same bytes in place changes the mtime: the next
    start hashes (the bytes are right), writes a new record, and the one after trusts it."""
    await replica.start()
    await trio.sleep(0.02)
    SharedCache.touch(replica.entry)
    touched, _ = await replica.start()
    assert touched.shared_trusted == 1 and replica.hashed == []

    await trio.sleep(0.02)  # a later mtime tick
    with replica.entry.open("r+b") as f:
        f.write(replica.data[:4096])
    rewritten, _ = await replica.start()
    assert rewritten.shared_trusted == 0 and replica.hashed and not any(replica.copies)
    record, key = replica.record(), key_of_open(replica.entry)
    assert record is not None and key is not None and record.matches(key)
    again, _ = await replica.start()
    assert again.shared_trusted == 1 and replica.hashed == []


async def test_a_tampered_entry_is_caught_replaced_and_recorded_again(replica: Replica) -> None:
    await replica.start()
    await trio.sleep(0.02)
    with replica.entry.open("r+b") as f:  # one bit, same size
        f.seek(5 * BS + 9)
        f.write(bytes([replica.data[5 * BS + 9] ^ 0x04]))
    caught, _ = await replica.start()
    assert (caught.shared_trusted, caught.shared_corrupt) == (0, 1)
    assert replica.fake.bytes_served == 2 * len(replica.data)  # from the origin again
    assert replica.entry.read_bytes() == replica.data  # republished ...
    record, key = replica.record(), key_of_open(replica.entry)
    assert record is not None and key is not None and record.matches(key)  # ... and recorded
    trusted, _ = await replica.start()
    assert trusted.shared_trusted == 1 and replica.hashed == []


async def test_an_entry_without_a_record_is_hashed_once_for_every_replica(
    replica: Replica,
) -> None:
    """An entry truss-transfer wrote (no record): the first ttfs replica hashes it and writes
    the record, the next ones trust it. A replaced entry (same bytes, a new inode) is hashed
    and recorded again."""
    put(replica.entry, replica.data)
    first, sums = await replica.start()
    assert first.shared_trusted == 0 and replica.hashed and replica.record() is not None
    second, second_sums = await replica.start()
    assert second.shared_trusted == 1 and replica.hashed == [] and second_sums == sums

    replaced = replica.shared / "replacement"
    put(replaced, replica.data)
    os.rename(replaced, replica.entry)
    third, _ = await replica.start()
    assert third.shared_trusted == 0 and replica.hashed
    fourth, _ = await replica.start()
    assert fourth.shared_trusted == 1 and replica.fake.bytes_served == 0


async def test_a_small_blob_has_no_record_and_is_hashed(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under 8 MiB hashing is cheaper than reading a record from a network filesystem: none is
    written or read, and every new replica hashes."""
    small = Replica(settings, tmp_path, monkeypatch, ramp(3 * BS + 5))
    await small.start()
    assert small.record() is None and not (small.shared / RECORDS).exists()
    hot, _ = await small.start()
    assert hot.shared_trusted == 0 and small.hashed and hot.shared_bytes == len(small.data)


@pytest.mark.parametrize(
    "content",
    ["not json", '{"ino": 1}', "sums out of range", "another block size", "too big"],
)
async def test_a_record_that_is_not_one_is_no_record(
    content: str, replica: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record that cannot be read as one never grants trust (the entry is hashed); one for
    another block size grants it but its checksums are not used (the copy is read back)."""
    put(replica.entry, replica.data)
    await replica.start()
    record = replica.record()
    assert record is not None
    path = replica.shared / RECORDS / f"{replica.digest}.json"
    doc = json.loads(record.to_json())
    if content == "sums out of range":
        doc["sums"][3] = 1 << 64
        path.write_text(json.dumps(doc))
    elif content == "another block size":
        doc["block_size"] = 2 * BS
        doc["sums"] = doc["sums"][:5]
        path.write_text(json.dumps(doc))
    elif content == "too big":
        monkeypatch.setattr("ttfs.blocks.shared._RECORD_LIMIT", 64)
    else:
        path.write_text(content)
    stats, _ = await replica.start()
    if content == "another block size":
        assert stats.shared_trusted == 1 and replica.hashed == [] and not any(replica.copies)
    else:
        assert stats.shared_trusted == 0 and replica.hashed


async def test_an_entry_written_during_a_trusted_copy_goes_to_the_origin(
    replica: Replica, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The copy took its checksums from the record; the entry was written while it ran, so
    neither its bytes nor those checksums can be relied on: the blob is discarded and fetched
    from the origin (the entry is ignored for the rest of the process)."""
    await replica.start()
    real = store_mod.kernel_copy
    calls = [0]

    def writing_meanwhile(src: int, dst: int, offset: int, length: int) -> None:
        calls[0] += 1
        if calls[0] == 2:
            with replica.entry.open("r+b") as f:
                f.seek(7 * BS)
                f.write(b"\xff" * 100)
            time.sleep(0.02)
        real(src, dst, offset, length)

    monkeypatch.setattr(store_mod, "kernel_copy", writing_meanwhile)
    before = len(replica.fake.calls)
    stats, _ = await replica.start()  # checks the blob's bytes and block checksums
    # The written range came from the origin after the discard (a run still copying an
    # unwritten part of the entry may land it; the blob's hash then vouches for every byte).
    assert stats.shared_trusted == 0 and calls[0] >= 2
    again = replica.fake.calls[before:]
    assert any(start <= 7 * BS < end for _, start, end in again), again
    # How it is caught depends on where the copy's runs were when the entry changed, and all
    # three occur: the end-of-copy identity check (the blob discarded without a hash), the hash
    # (a run had found the entry changed before the first block landed: no trust from the
    # start), or a run's open refusing the changed entry (its range from the origin, the rest
    # hashed). Either way nothing unverified is served and the blob above is right.
    assert any(
        text in caplog.text
        for text in (
            "m.bin: its b10cache entry changed while it was copied; discarding",
            "m.bin: sha256 mismatch; discarding",
            "is unusable (cannot open it: [Errno 116] the entry was replaced or changed)",
        )
    ), caplog.text


def test_cleanup_removes_the_records_of_entries_that_are_gone(tmp_path: Path) -> None:
    shared = tmp_path / "b10"
    cache = SharedCache(config(shared))
    data = ramp(BS)
    digest = hashlib.sha256(data).hexdigest()
    entry = put(shared / digest, data)
    key = key_of_open(entry)
    assert key is not None
    record = EntryRecord(key.ino, key.size, key.mtime_ns, BS, (1,))
    for blob_id in (digest, "a" * 64, "b" * 64):
        assert cache.write_record(blob_id, record)
    records = shared / RECORDS
    leftover = records / ".cccc.json.123"
    leftover.write_text("{")
    old = time.time() - 3600
    for path in (records / f"{'a' * 64}.json", leftover, records / f"{digest}.json"):
        os.utime(path, (old, old))
    cache.cleanup({digest: len(data)})
    # The entry's record stays however old; a fresh orphan stays (its entry may be being
    # renamed into place right now); old orphans and old temporary names go.
    assert sorted(p.name for p in records.iterdir()) == sorted(
        [f"{digest}.json", f"{'b' * 64}.json"]
    )


def test_touching_an_entry_sets_its_atime_and_leaves_its_mtime(tmp_path: Path) -> None:
    """The atime refresh must not write the mtime back (os.utime would: a write landing
    between its stat and its utime would get the old mtime, and look unchanged)."""
    path = put(tmp_path / "entry", b"x" * 100)
    os.utime(path, ns=(1_000_000_000, 1_234_567_891))
    touch_atime(path)
    st = os.stat(path)
    assert st.st_mtime_ns == 1_234_567_891 and time.time() - st.st_atime < 60
    SharedCache.touch(path)
    assert os.stat(path).st_mtime_ns == 1_234_567_891
    with pytest.raises(FileNotFoundError):
        touch_atime(tmp_path / "missing")


@pytest.mark.parametrize(
    ("value", "trust"),
    [
        (None, "replicas"),
        ("", "replicas"),
        ("1", "replicas"),
        ("Store", "store"),
        ("0", "off"),
        ("off", "off"),
        ("false", "off"),
    ],
)
def test_shared_trust_setting(value: str | None, trust: str, tmp_path: Path) -> None:
    assert shared_trust(value) == trust
    env = {"TTFS_SHARED_CACHE": str(tmp_path)}
    if value is not None:
        env["TTFS_SHARED_TRUST"] = value
    cfg = SharedCacheConfig.from_env(env)
    assert cfg is not None and cfg.trust == trust


async def test_a_replica_that_cannot_write_records_still_resolves(replica: Replica) -> None:
    """A shared directory the replica may not write records into (here a file where the
    records' directory goes): no record, no error; every replica hashes."""
    put(replica.entry, replica.data)
    (replica.shared / RECORDS).write_text("a file where the directory should be")
    first, _ = await replica.start()
    second, _ = await replica.start()
    assert (first.shared_trusted, second.shared_trusted) == (0, 0) and replica.hashed
    assert replica.record() is None
    cache = SharedCache(config(replica.shared))
    assert not cache.write_record(replica.digest, EntryRecord(1, 2, 3, BS, ()))
