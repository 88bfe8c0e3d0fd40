"""b10fs hot starts by symlink (``TTFS_SHARED_HOTSTART=symlink``): a resolve answers a usable
entry with a symlink to it, as truss-transfer does, but only once the entry is trusted (a
replica's verification record) or hashed; a corrupt entry is moved aside and the file fetched
from the origin into a plain file (docs/b10fs.md, "Hot start")."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from tests.fakes import FakeProvider, pointer_for, ramp
from tests.test_shared_cache import BS, config, put
from ttfs.blocks import Blob
from ttfs.blocks.identity import key_of_open
from ttfs.blocks.shared import Decision, SharedCache
from ttfs.config import Settings, SharedCacheConfig, shared_hotstart
from ttfs.errors import ConfigError
from ttfs.fetch import links
from ttfs.providers import ProviderSet
from ttfs.resolve import ResolveReport, resolve

DATA = ramp(9 * BS + 5)  # over the 8 MiB below which blobs have no replicas' record
DIGEST = hashlib.sha256(DATA).hexdigest()


class Replicas:
    """Resolves of one model by replicas, each with its own destination and block store."""

    def __init__(self, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.settings, self.tmp_path = settings, tmp_path
        self.shared = tmp_path / "b10"
        self.entry = self.shared / DIGEST
        self.fake = FakeProvider({"m.bin": DATA})
        self.n = 0
        self.hashed = 0  # entries hashed before linking
        self.blob_hashes = 0  # blobs hashed by the fetcher (a copy or a download)
        real_entry, real_blob = links._hash_entry, Blob.hash_blocks

        def hash_entry(*args: object, **kw: object) -> object:
            self.hashed += 1
            return real_entry(*args, **kw)  # type: ignore[arg-type]

        def hash_blocks(blob: Blob, *args: object, **kw: object) -> None:
            self.blob_hashes += 1
            real_blob(blob, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(links, "_hash_entry", hash_entry)
        monkeypatch.setattr(Blob, "hash_blocks", hash_blocks)

    async def resolve(
        self, hotstart: str = "symlink", *, out: Path | None = None, **kw: object
    ) -> tuple[Path, ResolveReport]:
        """One replica's resolve (a new destination and store unless ``out`` is given)."""
        self.hashed = self.blob_hashes = 0
        if out is None:
            self.n += 1
            out = self.tmp_path / f"out{self.n}"
        settings = self.settings.replace(
            cache_dir=out.parent / f"{out.name}-store",
            shared_cache=config(self.shared, hotstart=hotstart, **kw),
        )
        providers = ProviderSet(settings)
        providers.add("http", self.fake)
        pointer = pointer_for("m.bin", DATA)
        report = await resolve([pointer], str(out), settings, providers=providers, progress=False)
        assert (out / "m.bin").read_bytes() == DATA
        return out / "m.bin", report


@pytest.fixture
def replicas(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Replicas:
    return Replicas(settings, tmp_path, monkeypatch)


async def test_a_recorded_entry_is_linked_without_a_hash_or_a_copy(replicas: Replicas) -> None:
    """The publisher downloads, publishes and records; a new replica's output is a symlink to
    the entry (absolute, as upstream), no byte copied, nothing hashed; its next resolve finds
    the link in place."""
    first, cold = await replicas.resolve()
    assert not first.is_symlink() and cold.b10fs_hot_starts_files == 0
    assert replicas.fake.bytes_served == len(DATA)

    out, hot = await replicas.resolve()
    assert out.is_symlink() and os.readlink(out) == str(replicas.entry.resolve())
    assert (replicas.hashed, replicas.blob_hashes, hot.shared_bytes) == (0, 0, 0)
    assert (hot.b10fs_hot_starts_files, hot.b10fs_hot_starts_bytes) == (1, len(DATA))
    assert replicas.fake.bytes_served == len(DATA)
    store = out.parent.parent / f"{out.parent.name}-store"
    stored = sum(p.stat().st_blocks * 512 for p in store.rglob("*") if p.is_file())
    assert stored < 2 * 2**20, "a linked file has no blob"

    _, again = await replicas.resolve(out=out.parent)
    assert again.skipped == 1 and out.is_symlink() and replicas.hashed == 0


async def test_an_entry_without_a_record_is_hashed_once_then_linked_by_everyone(
    replicas: Replicas,
) -> None:
    """An entry truss-transfer wrote: the first replica hashes it, links it and writes the
    records; the next replica links it without hashing."""
    put(replicas.entry, DATA)
    out, first = await replicas.resolve()
    assert out.is_symlink() and replicas.hashed == 1 and first.b10fs_hot_starts_files == 1
    record, key = SharedCache(config(replicas.shared)).read_record(DIGEST), key_of_open(out)
    assert record is not None and key is not None and record.matches(key)
    assert record.sums_for(BS, 10) is not None
    out2, _ = await replicas.resolve()
    assert out2.is_symlink() and replicas.hashed == 0
    assert replicas.fake.bytes_served == 0


async def test_the_record_also_lets_a_copy_skip_its_hash(replicas: Replicas) -> None:
    """The checksums a linking replica took are the blob's: a later replica that copies
    (the default) trusts the record and borrows them."""
    put(replicas.entry, DATA)
    await replicas.resolve()
    out, hot = await replicas.resolve("copy")
    assert not out.is_symlink() and replicas.blob_hashes == 0 and hot.shared_bytes == len(DATA)


@pytest.mark.parametrize("how", ["no record", "written in place"])
async def test_a_corrupt_entry_is_moved_aside_and_the_file_downloaded(
    how: str, replicas: Replicas
) -> None:
    """A same-sized entry with a flipped bit is never linked: hashed, moved aside, the file
    fetched from the origin into a plain file, and the good copy published in its place."""
    if how == "no record":
        bad = bytearray(DATA)
        bad[5 * BS + 9] ^= 0x04
        put(replicas.entry, bytes(bad))
    else:
        await replicas.resolve()  # published and recorded
        await trio.sleep(0.02)  # a later mtime tick
        with replicas.entry.open("r+b") as f:
            f.seek(5 * BS + 9)
            f.write(bytes([DATA[5 * BS + 9] ^ 0x04]))
    served = replicas.fake.bytes_served
    out, report = await replicas.resolve()
    assert not out.is_symlink() and replicas.hashed == 1
    assert replicas.fake.bytes_served == served + len(DATA)
    assert report.b10fs_hot_starts_files == 0
    assert list(replicas.shared.glob(f"{DIGEST}.corrupt-*"))
    assert replicas.entry.read_bytes() == DATA
    out2, _ = await replicas.resolve()
    assert out2.is_symlink() and replicas.hashed == 0  # the new entry came with a record


async def test_a_link_whose_entry_went_bad_is_replaced_by_a_good_file(replicas: Replicas) -> None:
    """A replica's own link outlives a later write to the entry: its next resolve sees the
    changed file behind the link, hashes it, and replaces the link with a verified file."""
    await replicas.resolve()
    out, _ = await replicas.resolve()
    assert out.is_symlink()
    await trio.sleep(0.02)
    with replicas.entry.open("r+b") as f:
        f.write(b"\xff" * 16)
    _, report = await replicas.resolve(out=out.parent)
    assert not out.is_symlink() and report.skipped == 0


async def test_without_verification_the_size_rule_decides_as_upstream(
    replicas: Replicas,
) -> None:
    """``--no-verify``: a right-sized entry is linked unhashed, as truss-transfer does; a
    wrong-sized one never (downloaded, then replaced by the publish)."""
    replicas.settings = replicas.settings.replace(verify=False)
    put(replicas.entry, DATA)
    out, _ = await replicas.resolve()
    assert out.is_symlink() and replicas.hashed == 0
    put(replicas.entry, DATA[:-1])
    out2, report = await replicas.resolve()
    assert not out2.is_symlink() and report.b10fs_hot_starts_files == 0


async def test_trust_off_hashes_every_link(replicas: Replicas) -> None:
    await replicas.resolve()
    out, _ = await replicas.resolve(trust="off")
    assert out.is_symlink() and replicas.hashed == 1


async def test_an_output_link_is_replaced_never_written_through(replicas: Replicas) -> None:
    """Whatever a destination is (here a user's symlink to another file of the right size),
    a resolve replaces it by rename, in either mode; the file it pointed to keeps its bytes."""
    other = put(replicas.tmp_path / "elsewhere", bytes(len(DATA)))
    for mode in ("copy", "symlink"):
        out = replicas.tmp_path / f"{mode}-out"
        (out).mkdir()
        os.symlink(other, out / "m.bin")
        await replicas.resolve(mode, out=out)
        assert other.read_bytes() == bytes(len(DATA))
    assert (replicas.tmp_path / "symlink-out" / "m.bin").is_symlink()  # now to the entry
    assert not (replicas.tmp_path / "copy-out" / "m.bin").is_symlink()


async def test_reads_off_means_no_link(replicas: Replicas, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the upstream decision turns reads off (b10fs slower than the network), nothing is
    linked: the file is downloaded."""
    put(replicas.entry, DATA)
    monkeypatch.setattr(
        SharedCache, "decide", lambda self, blobs, cleanup: Decision(read=False, write=False)
    )
    out, report = await replicas.resolve()
    assert not out.is_symlink() and replicas.fake.bytes_served == len(DATA)
    assert report.b10fs_decision_to_use is False


def test_the_setting() -> None:
    assert shared_hotstart(None) == "copy" and shared_hotstart("") == "copy"
    assert shared_hotstart(" SymLink ") == "symlink" and shared_hotstart("link") == "symlink"
    with pytest.raises(ConfigError, match="TTFS_SHARED_HOTSTART must be copy or symlink"):
        shared_hotstart("hardlink")
    env = {"TTFS_SHARED_CACHE": "/x", "TTFS_SHARED_HOTSTART": "symlink"}
    got = SharedCacheConfig.from_env(env)
    assert got is not None and got.hotstart == "symlink"
    default = SharedCacheConfig.from_env({"TTFS_SHARED_CACHE": "/x"})
    assert default is not None and default.hotstart == "copy"
