"""Fetch scheduler with an in-process fake origin: single-flight, priorities, retries, verify."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from tests.fakes import FakeProvider, pointer_for, ramp
from ttfs.blocks import Blob, BlobSpec, BlockStore
from ttfs.config import Settings
from ttfs.errors import IntegrityError, ObjectNotFound, TransientError
from ttfs.fetch import Fetcher, Priority, Source, open_fetcher
from ttfs.manifest import S3Resolution
from ttfs.providers import HttpProvider, ProviderSet, S3Provider
from ttfs.units import MiB

BS = 2 * MiB


@asynccontextmanager
async def fetcher_for(settings: Settings, fake: FakeProvider) -> AsyncIterator[Fetcher]:
    store = BlockStore(settings.cache_dir, block_size=settings.block_size)
    providers = ProviderSet(settings)
    providers.add("http", fake)
    try:
        async with open_fetcher(store, providers, settings) as fetcher:
            yield fetcher
    finally:
        store.close()


async def test_prepare_makes_one_provider_per_resolution_type_in_the_callers_thread(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount makes its providers in a worker thread before the first read
    (``ProviderSet.prepare``), one per resolution type among the pointers, so the first read
    does not build an HTTP client (and load its TLS context) on the event loop."""
    http = [pointer_for(f"f{i}.bin", b"x") for i in range(3)]
    s3 = dataclasses.replace(http[0], resolution=S3Resolution("b", "k", None), uid="s3")
    made: list[tuple[str, int]] = []
    for cls in (HttpProvider, S3Provider):

        def counting(self: object, *a: object, _init: Any = cls.__init__, **kw: object) -> None:
            made.append((type(self).__name__, threading.get_ident()))
            _init(self, *a, **kw)

        monkeypatch.setattr(cls, "__init__", counting)
    providers = ProviderSet(settings)
    try:
        await trio.to_thread.run_sync(providers.prepare, [*http, s3])
        assert sorted(name for name, _ in made) == ["HttpProvider", "S3Provider"]
        assert all(thread != threading.get_ident() for _, thread in made)
        assert isinstance(providers.for_pointer(http[2]), HttpProvider)
        assert isinstance(providers.for_pointer(s3), S3Provider)
        assert len(made) == 2  # the reads found them made
    finally:
        await providers.aclose()


async def test_concurrent_reads_make_one_request_per_block(settings: Settings) -> None:
    data = ramp(8 * BS)
    fake = FakeProvider({"m.bin": data}, latency=0.05)
    async with fetcher_for(settings, fake) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        results: list[bytes] = []

        async def reader() -> None:
            results.append(await fetcher.read(source, BS + 100, 3 * BS))

        async with trio.open_nursery() as n:
            for _ in range(16):
                n.start_soon(reader)
    assert all(r == data[BS + 100 : 4 * BS + 100] for r in results) and len(results) == 16
    # DEMAND: one request per 2 MiB block, four blocks, nothing more.
    assert sorted(c[1] for c in fake.calls) == [BS, 2 * BS, 3 * BS, 4 * BS]


async def test_cancelled_reader_does_not_cancel_shared_fetch(settings: Settings) -> None:
    data = ramp(BS)
    fake = FakeProvider({"m.bin": data}, gate=trio.Event())
    async with fetcher_for(settings, fake) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        got: list[bytes] = []

        async def patient() -> None:
            got.append(await fetcher.read(source, 0, 10))

        async with trio.open_nursery() as n:
            with trio.move_on_after(0.05):
                await fetcher.read(source, 0, 10)  # gives up while the fetch is gated
            n.start_soon(patient)
            await trio.sleep(0.01)
            assert fake.gate is not None
            fake.gate.set()
    assert got == [data[:10]]
    assert len(fake.calls) == 1


async def test_background_is_coalesced_and_demand_jumps_the_queue(settings: Settings) -> None:
    settings = settings.replace(max_connections=2, demand_reserved=1)
    data = ramp(64 * BS)
    fake = FakeProvider({"m.bin": data}, latency=0.02)
    async with fetcher_for(settings, fake) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        fetcher.request_nowait(source, range(source.blob.n_blocks), Priority.PREFETCH)
        await trio.sleep(0.005)  # the first background run starts
        t0 = trio.current_time()
        assert await fetcher.read(source, 60 * BS, 10) == data[60 * BS : 60 * BS + 10]
        waited = trio.current_time() - t0
        await fetcher.complete(source)
    starts = [c[1] for c in fake.calls]
    # The demand block was fetched alone and long before the background reached it.
    assert (60 * BS, 61 * BS) in [(c[1], c[2]) for c in fake.calls]
    assert starts.index(60 * BS) <= 2
    assert waited < 0.5
    # Background ranges are 16 MiB runs (8 blocks), not one request per block.
    background = [c for c in fake.calls if c[1] != 60 * BS]
    assert max(c[2] - c[1] for c in background) == 16 * MiB
    assert len(fake.calls) <= 64 // 8 + 3


async def test_transient_failures_resume_at_first_missing_byte(settings: Settings) -> None:
    data = ramp(8 * BS)
    fake = FakeProvider({"m.bin": data}, fail_next=2, fail_after=BS + 5)
    async with fetcher_for(settings, fake) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        await fetcher.complete(source)
        assert source.blob.pread(0, len(data)) == data
    # The body breaks after block 0 and one chunk of block 1 landed; the retry starts at the
    # first byte that did not land (mid-block), not at block 1 and not at byte 0.
    assert fake.calls[0][1] == 0
    assert fake.calls[1][1] == BS + fake.chunk
    assert fetcher.retries == 2
    assert fake.bytes_served == len(data)  # not one byte fetched twice


async def test_permanent_failure_reaches_every_waiter(settings: Settings) -> None:
    data = ramp(BS)
    fake = FakeProvider({"m.bin": data}, missing={"m.bin"})
    errors: list[BaseException] = []
    async with fetcher_for(settings, fake) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))

        async def reader() -> None:
            try:
                await fetcher.read(source, 0, 10)
            except ObjectNotFound as e:
                errors.append(e)

        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(reader)
    assert len(errors) == 3 and len(fake.calls) == 1


async def test_retry_budget_exhausted_raises_transient(settings: Settings) -> None:
    data = ramp(BS)
    fake = FakeProvider({"m.bin": data}, fail_next=100)
    async with fetcher_for(settings, fake) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        with pytest.raises(TransientError):
            await fetcher.read(source, 0, 10)
    assert len(fake.calls) == settings.retry.attempts


async def test_hash_mismatch_refetches_once_then_fails(settings: Settings) -> None:
    data = ramp(3 * BS)
    fake = FakeProvider({"m.bin": data}, corrupt_times=1)
    async with fetcher_for(settings, fake) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        await fetcher.complete(source)
        assert source.blob.verified
        assert source.blob.pread(0, len(data)) == data
    assert fake.bytes_served == 2 * len(data)

    bad = pointer_for("m.bin", data, digest=hashlib.sha256(b"other").hexdigest())
    fake2 = FakeProvider({"m.bin": data})
    async with fetcher_for(settings.replace(cache_dir=settings.cache_dir / "x"), fake2) as f2:
        source = await f2.add(bad)
        with pytest.raises(IntegrityError, match="fetched twice"):
            await f2.complete(source)
    assert fake2.bytes_served == 2 * len(data)


async def test_cache_survives_restart(settings: Settings) -> None:
    data = ramp(5 * BS + 3)
    fake = FakeProvider({"m.bin": data})
    async with fetcher_for(settings, fake) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        await fetcher.read(source, 0, 2 * BS)
    async with fetcher_for(settings, fake) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        assert source.blob.bytes_present == 2 * BS
        await fetcher.complete(source)
    assert fake.bytes_served == len(data)  # nothing fetched twice
    async with fetcher_for(settings, fake) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        assert source.done.is_set()  # verified on disk: no refetch, no rehash needed


async def test_non_range_mode_uses_one_stream(settings: Settings) -> None:
    data = ramp(20 * BS + 1)
    fake = FakeProvider({"m.bin": data})
    async with fetcher_for(settings.replace(use_range=False), fake) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        await fetcher.complete(source)
    assert [(c[1], c[2]) for c in fake.calls] == [(0, len(data))]


async def test_empty_and_tiny_blobs(settings: Settings) -> None:
    files = {"empty": b"", "one": b"x"}
    fake = FakeProvider(files)
    async with fetcher_for(settings, fake) as fetcher:
        for name, data in files.items():
            source = await fetcher.add(pointer_for(name, data))
            await fetcher.complete(source)
            assert await fetcher.read(source, 0, 10) == data
    assert [c[0] for c in fake.calls] == ["one"]


async def test_permanent_failure_fails_the_rest_of_the_blob_at_once(settings: Settings) -> None:
    """A 404 on one run must not cost one request (or one retry budget) per remaining run."""
    data = ramp(64 * BS)
    fake = FakeProvider({"m.bin": data}, missing={"m.bin"})
    async with fetcher_for(settings, fake) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        with pytest.raises(ObjectNotFound):
            await fetcher.complete(source)
        assert fetcher.statistics().queued["PREFETCH"] == 0
    assert len(fake.calls) <= settings.max_connections - settings.demand_reserved


async def test_prefetch_pauses_while_a_reader_waits(settings: Settings) -> None:
    settings = settings.replace(max_connections=4, demand_reserved=1)
    big, hot = ramp(64 * BS, 1), ramp(BS, 2)
    gate = trio.Event()
    fake = FakeProvider({"big.bin": big, "hot.bin": hot}, gates={"hot.bin": gate})
    async with fetcher_for(settings, fake) as fetcher:
        big_src = await fetcher.add(pointer_for("big.bin", big))
        hot_src = await fetcher.add(pointer_for("hot.bin", hot))
        async with trio.open_nursery() as n:
            n.start_soon(fetcher.read, hot_src, 0, 10)  # a reader waits (gated origin)
            await trio.sleep(0.05)
            fetcher.request_nowait(big_src, range(big_src.blob.n_blocks), Priority.PREFETCH)
            await trio.sleep(0.2)
            assert [c[0] for c in fake.calls] == ["hot.bin"]  # no prefetch started meanwhile
            gate.set()
        await fetcher.complete(big_src)  # and it resumes once the reader is served
        assert big_src.blob.pread(0, len(big)) == big


async def test_readahead_streams_of_different_shards_share_the_connections(
    settings: Settings,
) -> None:
    """Two loaders stream two shards; the second asks after the first queued its whole window.
    Readahead is served in the order the readers need the bytes (distance ahead of each
    reader), so the second shard's first run starts before the first shard's window ends."""
    settings = settings.replace(max_connections=3, demand_reserved=1)
    a, b = ramp(64 * BS, 1), ramp(64 * BS, 2)
    gate = trio.Event()
    fake = FakeProvider({"a.bin": a, "b.bin": b}, gate=gate)
    async with fetcher_for(settings, fake) as fetcher:
        sa = await fetcher.add(pointer_for("a.bin", a))
        sb = await fetcher.add(pointer_for("b.bin", b))
        fetcher.request_nowait(sa, range(4, 64), Priority.READAHEAD, reader_at=4)
        fetcher.request_nowait(sb, range(4, 64), Priority.READAHEAD, reader_at=4)
        await trio.sleep(0.05)
        gate.set()
        await fetcher.ensure(sa, range(4, 64), Priority.READAHEAD)
        await fetcher.ensure(sb, range(4, 64), Priority.READAHEAD)
    order = [c[0] for c in fake.calls]
    # The shards take turns instead of a.bin's whole window (eight runs) going first; which
    # of two equally urgent runs starts first is up to trio's scheduling.
    assert order[:8].count("a.bin") == order[:8].count("b.bin") == 4, order
    assert order.index("b.bin") <= 1


async def test_demand_preempts_prefetch_elsewhere_not_the_readers_own_stream(
    settings: Settings,
) -> None:
    settings = settings.replace(max_connections=4, demand_reserved=1)
    own, other = ramp(64 * BS, 1), ramp(64 * BS, 2)
    fake = FakeProvider({"own.bin": own, "other.bin": other}, latency=0.02, chunk=16 * 1024)
    async with fetcher_for(settings, fake) as fetcher:
        so = await fetcher.add(pointer_for("own.bin", own))
        st = await fetcher.add(pointer_for("other.bin", other))
        # Prefetch runs in flight: one on the reader's shard just ahead of it, one elsewhere.
        fetcher.request_nowait(so, range(8, 16), Priority.PREFETCH)
        fetcher.request_nowait(st, range(0, 8), Priority.PREFETCH)
        await trio.sleep(0.05)
        assert len(fetcher.queue.preemptible) == 2
        await fetcher.read(so, 7 * BS, 10)  # the reader's first demand of a burst
        await fetcher.ensure(so, range(8, 16), Priority.PREFETCH)
        await fetcher.ensure(st, range(0, 8), Priority.PREFETCH)
    starts = [(c[0], c[1]) for c in fake.calls]
    # The run on the reader's own stream was not cancelled: its blocks were asked for once.
    assert [s for s in starts if s[0] == "own.bin" and s[1] >= 8 * BS] == [("own.bin", 8 * BS)]
    # The run elsewhere was cancelled and resumed where it stopped.
    other_starts = [s[1] for s in starts if s[0] == "other.bin"]
    assert len(other_starts) >= 2 and other_starts[0] == 0 and other_starts[1] > 0, starts


async def test_a_slow_open_does_not_hold_up_other_blobs(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a big partial blob checks its blocks (seconds); a reader of another file, and a
    second opener of the same blob, must not queue behind a global lock for it."""
    slow, fast = ramp(BS, seed=1), ramp(BS, seed=2)
    fake = FakeProvider({"slow.bin": slow, "fast.bin": fast})
    release = threading.Event()
    async with fetcher_for(settings, fake) as fetcher:
        real = fetcher.store.open_blob

        def stalled(spec: BlobSpec) -> Blob:
            if spec.blob_id == hashlib.sha256(slow).hexdigest():
                release.wait(10)
            return real(spec)

        monkeypatch.setattr(fetcher.store, "open_blob", stalled)
        opened: list[Source] = []
        async with trio.open_nursery() as n:
            n.start_soon(lambda: _append(opened, fetcher.add(pointer_for("slow.bin", slow))))
            n.start_soon(lambda: _append(opened, fetcher.add(pointer_for("slow.bin", slow))))
            await trio.sleep(0.1)
            with trio.fail_after(5):
                other = await fetcher.add(pointer_for("fast.bin", fast))
                assert await fetcher.read(other, 0, 100) == fast[:100]
            assert not opened  # both openers of the slow blob are still waiting for it
            release.set()
        assert len(opened) == 2 and opened[0] is opened[1]


async def _append(out: list[Source], pending: Awaitable[Source]) -> None:
    out.append(await pending)


async def test_reads_that_could_wait_on_the_device_leave_the_event_loop(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cached bytes are read on the loop (RWF_NOWAIT); bytes the page cache lost are read in a
    worker thread, so a slow disk never stalls the other FUSE requests."""
    import os

    data = ramp(4 * BS)
    fake = FakeProvider({"m.bin": data})
    async with fetcher_for(settings, fake) as fetcher:
        source = await fetcher.add(pointer_for("m.bin", data))
        assert await fetcher.read(source, 100, BS) == data[100 : BS + 100]  # fetched, cached
        blob = source.blob
        assert blob.pread_cached(100, BS) == data[100 : BS + 100]
        # Written back and dropped from the page cache: the non-blocking read declines.
        with blob.lease() as fd:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        dropped = blob.pread_cached(100, BS) is None
        threads: list[threading.Thread] = []
        real_pread = type(blob).pread

        def spy(self: object, offset: int, length: int) -> bytes:
            threads.append(threading.current_thread())
            return real_pread(self, offset, length)  # type: ignore[arg-type]

        monkeypatch.setattr(type(blob), "pread", spy)
        monkeypatch.setattr(type(blob), "pread_cached", lambda self, offset, length: None)
        assert await fetcher.read(source, 3, 2 * BS) == data[3 : 2 * BS + 3]
    assert threads and all(t is not threading.main_thread() for t in threads)
    if not dropped:  # e.g. tmpfs keeps its pages: the fallback above is still exercised
        pytest.skip("this filesystem does not drop clean pages on POSIX_FADV_DONTNEED")
