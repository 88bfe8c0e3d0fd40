"""ModelFs without a kernel: tree and path mapping, metadata from memory, EROFS, reads through
the fetcher, readahead streams, prefetch order, status and materialize over xattrs."""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
import trio

from tests.fakes import FakeProvider, pointer_for, ramp
from ttfs.blocks import BlockStore
from ttfs.config import RetryPolicy, Settings
from ttfs.control import CONTROL_FILE, MATERIALIZE_XATTR, STATUS_XATTR
from ttfs.errors import DownloadError, ManifestError, ObjectNotFound, TransientError
from ttfs.fetch import open_fetcher
from ttfs.manifest import Pointer
from ttfs.providers import ProviderSet
from ttfs.units import MiB
from ttfs.vfs import (
    ROOT_INODE,
    FsOptions,
    ModelFs,
    ReadaheadConfig,
    StreamTable,
    Tree,
    errno_for,
    mount_paths,
    open_model_fs,
)

BS = 2 * MiB


def named(name: str, data: bytes, file_name: str | None = None) -> Pointer:
    p = pointer_for(name, data)
    return replace(p, file_name=file_name) if file_name else p


class Provider(FakeProvider):
    """FakeProvider keyed by uid, so pointers may carry any file_name (absolute ones too)."""

    async def read_range(self, pointer: Pointer, start: int, end: int, sink: object) -> None:
        await super().read_range(replace(pointer, file_name=pointer.uid), start, end, sink)  # type: ignore[arg-type]


@asynccontextmanager
async def model_fs(
    settings: Settings,
    fake: FakeProvider,
    pointers: Sequence[Pointer],
    *,
    prefetch: bool = False,
    readahead: ReadaheadConfig | None = None,
) -> AsyncIterator[ModelFs]:
    store = BlockStore(settings.cache_dir, block_size=settings.block_size)
    providers = ProviderSet(settings)
    providers.add("http", fake)
    options = FsOptions(prefetch=prefetch, readahead=readahead or ReadaheadConfig())
    try:
        async with (
            open_fetcher(store, providers, settings) as fetcher,
            open_model_fs(Tree.build(pointers), fetcher, options) as fs,
        ):
            yield fs
    finally:
        store.close()


def ino_of(fs: ModelFs, path: str) -> int:
    node = fs.tree.by_path(path)
    assert node is not None, path
    return node.ino


def status(fs: ModelFs, path: str = "") -> dict[str, object]:
    doc = json.loads(fs.getxattr(ino_of(fs, path), STATUS_XATTR))
    assert isinstance(doc, dict)
    return doc


async def wait_state(fs: ModelFs, key: str, states: tuple[str, ...]) -> dict[str, object]:
    with trio.fail_after(20):
        while True:
            doc = status(fs)
            part = doc[key]
            assert isinstance(part, dict)
            if part["state"] in states:
                return doc
            await trio.sleep(0.01)


# -- path mapping -------------------------------------------------------------------------------


def test_relative_names_sit_under_the_root_and_absolute_ones_lose_a_prefix() -> None:
    d = b"x"
    rel = [named("a", d, "llama/config.json"), named("b", d, "./llama//model.safetensors")]
    assert [r for r, _ in mount_paths(rel)] == ["llama/config.json", "llama/model.safetensors"]

    upstream = [
        named("a", d, "/app/model_cache/llama/config.json"),
        named("b", d, "/app/model_cache/llama/sub/w.safetensors"),
    ]
    # Mounted where the manifest points: exactly the named paths.
    paths = mount_paths(upstream, mountpoint="/app/model_cache")
    assert [r for r, _ in paths] == ["llama/config.json", "llama/sub/w.safetensors"]
    # Mounted elsewhere: the common directory is removed.
    assert [r for r, _ in mount_paths(upstream, mountpoint="/models")] == [
        "config.json",
        "sub/w.safetensors",
    ]
    # --root picks the prefix; --root / keeps full paths.
    under_app = [r for r, _ in mount_paths(upstream, prefix="/app")]
    full = [r for r, _ in mount_paths(upstream, prefix="/")]
    assert (under_app[0], full[0]) == (
        "model_cache/llama/config.json",
        "app/model_cache/llama/config.json",
    )
    with pytest.raises(ManifestError, match="not under the mount root prefix"):
        mount_paths(upstream, prefix="/elsewhere")


def test_tree_rejects_collisions() -> None:
    d = b"x"
    with pytest.raises(ManifestError, match="maps to mount path 'a/b'"):
        Tree.build([named("1", d, "a/b"), named("2", d, "/m/a/b")], prefix="/m")
    with pytest.raises(ManifestError, match="is a file in the mount"):
        Tree.build([named("1", d, "a"), named("2", d, "/m/a/b")], prefix="/m")


# -- metadata ------------------------------------------------------------------------------------


async def test_metadata_is_served_from_memory_with_zero_origin_requests(settings: Settings) -> None:
    files = {"config.json": b"{}", "w/model.safetensors": ramp(3 * BS), "w/sub/x.bin": b"abc"}
    fake = Provider(files)
    async with model_fs(settings, fake, [named(n, d) for n, d in files.items()]) as fs:
        root = fs.getattr(ROOT_INODE)
        assert root.is_dir and root.mode & 0o777 == 0o555 and root.nlink == 3
        w = await fs.lookup(ROOT_INODE, "w")
        assert w.is_dir and w.nlink == 3
        m = await fs.lookup(w.ino, "model.safetensors")
        assert (m.size, m.mode & 0o777, m.nlink, m.blocks) == (3 * BS, 0o444, 1, 3 * BS // 512)
        assert m.uid == os.getuid()
        assert [n for n, _, _ in fs.readdir(ROOT_INODE, 0)] == ["config.json", "w"]
        assert [n for n, _, _ in fs.readdir(w.ino, 0)] == ["model.safetensors", "sub"]
        assert [n for n, _, _ in fs.readdir(w.ino, 1)] == ["sub"]  # resumes after an offset
        assert (await fs.lookup(w.ino, "..")).ino == ROOT_INODE
        for bad, code in (((ROOT_INODE, "nope"), errno.ENOENT), ((m.ino, "x"), errno.ENOTDIR)):
            with pytest.raises(OSError) as e:
                await fs.lookup(*bad)
            assert e.value.errno == code
        st = fs.statfs()
        assert st.blocks * st.block_size >= 3 * BS and st.files == 6
        await fs.wait_opened()
    assert fake.calls == []


async def test_everything_that_writes_is_erofs(settings: Settings) -> None:
    fake = Provider({"a": b"data"})
    async with model_fs(settings, fake, [named("a", b"data")]) as fs:
        ino = ino_of(fs, "a")
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND):
            with pytest.raises(OSError) as e:
                await fs.open(ino, flags)
            assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            fs.setxattr(ino, "user.other", b"1")
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            fs.setxattr(ino, MATERIALIZE_XATTR, b"1")  # only on the root
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            fs.access(ino, os.W_OK)
        assert e.value.errno == errno.EROFS
        assert fs.access(ino, os.R_OK) and not fs.access(ino, os.X_OK)
        with pytest.raises(OSError) as e:
            await fs.open(ROOT_INODE, os.O_RDONLY)
        assert e.value.errno == errno.EISDIR
        with pytest.raises(OSError) as e:
            fs.getxattr(ino, "security.selinux")
        assert e.value.errno == errno.ENODATA
        assert fs.listxattr(ROOT_INODE) == [STATUS_XATTR, MATERIALIZE_XATTR]
        assert fs.listxattr(ino) == [STATUS_XATTR]


# -- reads ---------------------------------------------------------------------------------------


async def test_reads_fetch_only_what_they_need_and_share_fetches(settings: Settings) -> None:
    data = ramp(20 * BS, seed=3)
    fake = Provider({"m": data}, latency=0.02)
    async with model_fs(settings, fake, [named("m", data)]) as fs:
        fh = await fs.open(ino_of(fs, "m"), os.O_RDONLY)
        got: list[bytes] = []

        async def reader() -> None:
            got.append(await fs.read(fh, 5 * BS + 7, 100_000))

        async with trio.open_nursery() as n:
            for _ in range(16):
                n.start_soon(reader)
        assert got == [data[5 * BS + 7 : 5 * BS + 7 + 100_000]] * 16
        assert fake.calls == [("m", 5 * BS, 6 * BS)]  # one block, one request
        assert await fs.read(fh, len(data) - 3, 10) == data[-3:]
        assert await fs.read(fh, len(data) + 5, 10) == b""
        doc = status(fs, "m")
        assert doc["reads"] == 17 and doc["bytes_by_source"] == {"cache": 0, "origin": 2 * BS}
        fs.release(fh)
        with pytest.raises(OSError) as e:
            await fs.read(fh, 0, 1)
        assert e.value.errno == errno.EBADF


async def test_sequential_reader_gets_readahead_and_a_lone_read_does_not(
    settings: Settings,
) -> None:
    data = ramp(64 * BS, seed=4)
    fake = Provider({"m": data})
    async with model_fs(settings, fake, [named("m", data)]) as fs:
        fh = await fs.open(ino_of(fs, "m"), os.O_RDONLY)
        # One 4 MiB "tensor" read in 1 MiB requests: below the trigger, no readahead.
        for off in range(40 * BS, 42 * BS, MiB):
            await fs.read(fh, off, MiB)
        await trio.sleep(0.05)
        assert {c[1] for c in fake.calls} == {40 * BS, 41 * BS}
        fake.calls.clear()
        # A stream from 0: after 8 MiB, 8 MiB more is queued ahead at READAHEAD.
        for off in range(0, 9 * MiB, MiB):
            await fs.read(fh, off, MiB)
        await trio.sleep(0.1)  # the readahead is background work: let it run
        assert max(c[2] for c in fake.calls) == 16 * MiB


def test_stream_table_tracks_interleaved_streams_and_grows_the_window() -> None:
    cfg = ReadaheadConfig(initial=8 * MiB, maximum=32 * MiB, trigger=8 * MiB, max_streams=2)
    table = StreamTable(cfg)
    size = 1 << 40
    asks: list[tuple[int, int]] = []
    # Two interleaved sequential readers (two mmap fault streams) far apart.
    for i in range(64):
        for base in (0, 1 << 30):
            ask = table.on_read(base + i * MiB, MiB, size)
            if ask is not None:
                asks.append(ask)
    assert len(table.streams) == 2
    first = [a for a in asks if a[0] < 1 << 30]
    second = [a for a in asks if a[0] >= 1 << 30]
    assert first[0] == (8 * MiB, 16 * MiB)  # triggered after one window was read
    assert second[0] == ((1 << 30) + 8 * MiB, (1 << 30) + 16 * MiB)
    # Windows grow geometrically and stop at the maximum; requests never overlap.
    spans = [b - a for a, b in first]
    assert max(spans) <= 32 * MiB and spans[-1] > spans[0]
    assert all(first[i][1] <= first[i + 1][0] for i in range(len(first) - 1))
    # Lookahead is bounded by one (maximum) window.
    assert first[-1][1] - 64 * MiB <= 32 * MiB
    # A third stream evicts the least recently used one.
    table.on_read(5 << 30, MiB, size)
    assert len(table.streams) == 2
    # Small backward jumps (reordered requests) continue a stream; a far seek does not.
    t = StreamTable(cfg)
    t.on_read(0, MiB, size)
    t.on_read(2 * MiB, MiB, size)  # a forward skip of 1 MiB continues it
    t.on_read(2 * MiB + MiB // 2, MiB // 4, size)  # so does a reordered earlier request
    t.on_read(100 * MiB, MiB, size)
    assert len(t.streams) == 2 and t.streams[0].next == 3 * MiB


def test_mmap_fault_pattern_of_safetensors_load_is_one_stream() -> None:
    """The FUSE reads of ``safetensors.load_file`` (0.8, numpy, 4 MiB tensors, read_ahead_kb
    1024), as recorded through a ttfs mount: per tensor, a read near its end (the kernel's
    read-around of the first fault), then reads filling the megabytes behind it. It must be
    one sequential stream whose window grows, with non-overlapping asks."""
    cfg = ReadaheadConfig.for_budget(28, 16 * MiB)
    table = StreamTable(cfg)
    size = 256 * MiB + MiB
    reads = [(0, MiB)]
    for k in range(63):
        b = k * 4 * MiB
        reads += [(b + 3674112, MiB), (b + MiB, MiB), (b + 2 * MiB, MiB)]
        reads += [(b + 3 * MiB, 528384), (b + 4722688, 520192)]
    asks = [a for off, n in reads if (a := table.on_read(off, n, size)) is not None]
    assert len(table.streams) == 1
    assert asks and asks[0][0] <= 16 * MiB  # readahead starts within the first few tensors
    assert all(asks[i][1] <= asks[i + 1][0] for i in range(len(asks) - 1))  # no overlap
    assert table.streams[0].window >= 64 * MiB  # and grows toward the budget
    assert asks[-1][1] == size  # reaching the end of the file


def test_readahead_window_is_sized_to_the_connection_budget() -> None:
    assert ReadaheadConfig.for_budget(28, 16 * MiB).maximum == 448 * MiB
    assert ReadaheadConfig.for_budget(1, 16 * MiB).maximum == 32 * MiB  # one queued, one running


# -- prefetch and status -----------------------------------------------------------------------


def shard(n_tensors: int, tensor_bytes: int, seed: int) -> bytes:
    header: dict[str, object] = {}
    for i in range(n_tensors):
        header[f"t{i}"] = {
            "dtype": "U8",
            "shape": [tensor_bytes],
            "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes],
        }
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + ramp(n_tensors * tensor_bytes, seed)


async def test_prefetch_fetches_in_loader_order_and_reports_done(settings: Settings) -> None:
    # One connection: the provider sees requests in exactly the scheduler's order.
    settings = settings.replace(max_connections=1, demand_reserved=0)
    s1, s2 = shard(9, BS, 1), shard(9, BS, 2)
    index = {"weight_map": {"a": "s2.safetensors", "b": "s1.safetensors"}}
    files = {
        "s1.safetensors": s1,
        "big.bin": ramp(9 * BS, 3),
        "s2.safetensors": s2,
        "config.json": b"{}",
        "model.safetensors.index.json": json.dumps(index).encode(),
    }
    fake = Provider(files)
    async with model_fs(
        settings, fake, [named(n, d) for n, d in files.items()], prefetch=True
    ) as fs:
        doc = await wait_state(fs, "prefetch", ("done", "failed"))
        assert doc["prefetch"]["state"] == "done"  # type: ignore[index]
        assert doc["done"] == doc["verified"] == doc["complete"] == 5
        assert doc["bytes_local"] == doc["bytes_total"] == sum(map(len, files.values()))
    order = [name for name, start, _ in fake.calls]
    first = {name: order.index(name) for name in files}
    # small files, then both headers (block 0 of each shard), then s2's body, s1's, then big.bin
    assert (
        max(first["config.json"], first["model.safetensors.index.json"]) < first["s1.safetensors"]
    )
    assert first["s1.safetensors"] < first["s2.safetensors"] < first["big.bin"]
    body = [(n, s) for n, s, _ in fake.calls if s > 0 and n.endswith(".safetensors")]
    assert body[0][0] == "s2.safetensors"  # weight_map order for bodies
    last_body = max(i for i, (n, s, _) in enumerate(fake.calls) if n.endswith(".safetensors"))
    assert all(n == "big.bin" for n, _, _ in fake.calls[last_body + 1 :])


async def test_status_reports_bytes_by_source_and_a_remount_reuses_the_cache(
    settings: Settings,
) -> None:
    data = ramp(5 * BS, seed=9)
    fake = Provider({"w/m.bin": data})
    pointers = [named("w/m.bin", data)]
    async with model_fs(settings, fake, pointers) as fs:
        await fs.wait_opened()
        fh = await fs.open(ino_of(fs, "w/m.bin"), os.O_RDONLY)
        await fs.read(fh, 0, 10)
        doc = status(fs, "w/m.bin")
        assert doc["local_bytes"] == BS and not doc["verified"]
        assert doc["bytes_by_source"] == {"cache": 0, "origin": BS}
        fs.setxattr(ROOT_INODE, MATERIALIZE_XATTR, b"1")
        root = await wait_state(fs, "materialize", ("done", "failed"))
        assert root["materialize"]["state"] == "done"  # type: ignore[index]
        assert json.loads(fs.getxattr(ROOT_INODE, MATERIALIZE_XATTR))["generation"] == 1
        doc = status(fs, "w/m.bin")
        assert (doc["verified"], doc["local_pct"], doc["verify"]) == (True, 100.0, "sha256")
    fake.calls.clear()
    async with model_fs(settings, fake, pointers) as fs:
        await fs.wait_opened()
        fh = await fs.open(ino_of(fs, "w/m.bin"), os.O_RDONLY)
        assert await fs.read(fh, 0, len(data)) == data
        doc = status(fs, "w/m.bin")
        assert doc["bytes_by_source"] == {"cache": len(data), "origin": 0} and doc["verified"]
    assert fake.calls == []


async def test_failures_map_to_errnos_and_materialize_names_the_file(settings: Settings) -> None:
    settings = settings.replace(retry=RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02))
    good, gone, flaky = b"good" * 10, ramp(BS, 1), ramp(BS, 2)
    fake = Provider({"good": good, "gone": gone, "flaky": flaky}, missing={"gone"})
    pointers = [named("good", good), named("gone", gone), named("flaky", flaky)]
    async with model_fs(settings, fake, pointers) as fs:
        fh = await fs.open(ino_of(fs, "gone"), os.O_RDONLY)
        with pytest.raises(DownloadError) as e:
            await fs.read(fh, 0, 10)
        assert errno_for(e.value) == errno.ENOENT
        fake.fail_next = 10
        fh2 = await fs.open(ino_of(fs, "flaky"), os.O_RDONLY)
        with pytest.raises(DownloadError) as e:
            await fs.read(fh2, 0, 10)
        assert isinstance(e.value.cause, TransientError)
        assert errno_for(e.value) == errno.EIO  # not EAGAIN: the retry budget is spent
        fake.fail_next = 0
        failures = status(fs)["failures"]
        assert isinstance(failures, list)
        assert {f["file"] for f in failures} == {"gone", "flaky"}
        # The filesystem keeps serving other files.
        fh3 = await fs.open(ino_of(fs, "good"), os.O_RDONLY)
        assert await fs.read(fh3, 0, 100) == good
        fs.setxattr(ROOT_INODE, MATERIALIZE_XATTR, b"1")
        root = await wait_state(fs, "materialize", ("done", "failed"))
        mat = root["materialize"]
        assert isinstance(mat, dict) and mat["state"] == "failed"
        assert [f["file"] for f in mat["failures"]] == ["gone"]
        assert "404" in mat["failures"][0]["reason"]
        assert status(fs, "flaky")["verified"] and not status(fs, "gone")["local_bytes"]
        assert status(fs, "gone")["error"] and status(fs, "flaky")["error"] is None
        assert status(fs)["failure_count"] == 1


async def test_status_file_matches_the_attribute_documents_and_is_not_listed(
    settings: Settings,
) -> None:
    """The status file's per-file documents are the attribute's, byte for byte in meaning,
    in every state: untouched, partial, failed, complete and verified."""
    settings = settings.replace(retry=RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02))
    big, gone, small = ramp(3 * BS, 3), ramp(BS, 4), b'{"a": 1}'
    odd = 's\u00e4 "q"\\x'  # a name JSON must escape
    fake = Provider({"d/big": big, "gone": gone, odd: small}, missing={"gone"})
    pointers = [named("d/big", big), named("gone", gone), named(odd, small)]
    async with model_fs(settings, fake, pointers) as fs:
        await fs.wait_opened()
        fh = await fs.open(ino_of(fs, "d/big"), os.O_RDONLY)
        await fs.read(fh, 0, 10)
        fh = await fs.open(ino_of(fs, "gone"), os.O_RDONLY)
        with pytest.raises(DownloadError):
            await fs.read(fh, 0, 10)
        fh = await fs.open(ino_of(fs, odd), os.O_RDONLY)
        assert await fs.read(fh, 0, 100) == small
        await fs.fetcher.complete(fs.fetcher.source(pointers[2].hash))
        ctl = await fs.lookup(ROOT_INODE, CONTROL_FILE)
        assert ctl.ino == fs.control_ino and ctl.size == 0 and fs.getattr(ctl.ino) == ctl
        assert CONTROL_FILE not in [name for name, _, _ in fs.readdir(ROOT_INODE, 0)]
        with pytest.raises(OSError) as e:
            await fs.lookup(ino_of(fs, "d"), CONTROL_FILE)
        assert e.value.errno == errno.ENOENT
        with pytest.raises(OSError) as e:
            await fs.open(ctl.ino, os.O_WRONLY)
        assert e.value.errno == errno.EROFS
        handle = await fs.open(ctl.ino, os.O_RDONLY)
        raw = b""
        while chunk := await fs.read(handle, len(raw), 1000):
            raw += chunk
        fs.release(handle)
        doc = json.loads(raw)
        assert doc["mount"]["files"] == 3 and doc["mount"]["failure_count"] == 1
        for f in doc["files"]:
            assert f == status(fs, f["path"]), f["path"]
        by_path = {f["path"]: f for f in doc["files"]}
        assert by_path["d/big"]["local_bytes"] == BS and by_path["gone"]["error"]
        assert by_path[odd]["verified"] and by_path[odd]["verify"] == "sha256"
        with pytest.raises(OSError) as e:
            await fs.read(handle, 0, 10)
        assert e.value.errno == errno.EBADF


def test_errno_for_maps_every_exception() -> None:
    assert errno_for(ObjectNotFound("x")) == errno.ENOENT
    assert errno_for(TransientError("x")) == errno.EIO
    assert errno_for(DownloadError("f", TransientError("x"))) == errno.EIO
    assert errno_for(OSError(errno.EROFS, "ro")) == errno.EROFS
    assert errno_for(RuntimeError("bug")) == errno.EIO


# -- fast path (real mounts: tests/test_fastpath.py) ---------------------------------------------


async def test_a_linked_blob_is_pinned_and_survives_eviction(settings: Settings) -> None:
    """Once a verified file is answered as a link, eviction never deletes its blob file, even
    with a cache limit of zero: the mount holds every blob it serves open, and the store never
    evicts an open blob. Once the mount is gone the same blob is evictable again."""
    data, other = ramp(3 * BS, seed=4), ramp(2 * BS, seed=5)
    fake = Provider({"a": data, "b": other})
    pointers = [named("a", data), named("b", other)]
    async with model_fs(settings, fake, pointers) as fs:
        assert (await fs.lookup(ROOT_INODE, "a")).mode & 0o170000 == 0o100000  # not local yet
        fh = await fs.open(ino_of(fs, "a"), os.O_RDONLY)
        assert await fs.read(fh, 0, len(data)) == data
        fs.release(fh)
        source = fs._files[ino_of(fs, "a")].source  # type: ignore[index]
        assert source is not None
        with trio.fail_after(10):
            await source.done.wait()
        attr = await fs.lookup(ROOT_INODE, "a")
        assert attr.mode & 0o170000 == 0o120000, oct(attr.mode)  # a symlink
        target = fs.readlink(attr.ino)
        assert target == os.fsencode(os.path.abspath(source.blob.path))  # noqa: ASYNC240
        store = fs.fetcher.store
        store.max_bytes = 0
        await trio.to_thread.run_sync(store.evict)
        assert store.data_path(pointers[0].hash).exists()
        assert (await fs.lookup(ROOT_INODE, "a")).mode & 0o170000 == 0o120000
    # Unmounted: nothing holds the blob open, so a zero-size cache evicts it.
    store = BlockStore(settings.cache_dir, block_size=settings.block_size, max_bytes=0)
    try:
        store.evict()
        assert not store.data_path(pointers[0].hash).exists()
    finally:
        store.close()
