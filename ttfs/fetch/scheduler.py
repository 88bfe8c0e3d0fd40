"""The fetch scheduler: prioritised, single-flight block fetching into the block store.

Every byte ttfs downloads goes through :class:`Fetcher`. Callers say *which blocks of which blob*
they need and at what :class:`Priority`; the fetcher turns queued blocks into ranged requests:

* **Single-flight.** A block is queued or in flight at most once; every caller waiting for it
  waits on the same :class:`trio.Event`. The fetch runs in the fetcher's own nursery, so a
  cancelled waiter (an interrupted FUSE read) never cancels a fetch others wait for.
* **Priorities.** DEMAND (a reader is blocked) < READAHEAD < PREFETCH. A queued block asked for
  at a more urgent priority is bumped. ``demand_reserved`` of the ``max_connections`` slots are
  usable by DEMAND only, so demand never waits behind background work for a connection.
* **Request shape.** DEMAND blocks are fetched one block per request (2 MiB), in parallel, so the
  bytes a reader waits for arrive first even on an origin that caps each connection. Background
  blocks are coalesced at dispatch time with their queued neighbours into runs of up to
  ``background_unit`` (16 MiB), which keeps request overhead low and bounds how long a demand
  read can wait behind one unit.
* **Runs** are executed by :mod:`.runs` (retries, resume mid-block; bytes from a worker process,
  the shared cache or the provider in process) and verified by the follower of :mod:`.follower`.
  Which run goes next (the queue, the budget's counters, preemption, the quiet period) is
  :class:`~ttfs.fetch.queue.BlockQueue`'s bookkeeping; this module connects the pieces: blobs,
  waiting callers, the dispatcher task and the runs' outcomes.
* **Shared cache (b10fs).** With ``settings.shared_cache`` a :class:`~ttfs.fetch.tiers.SharedTier`
  decides per blob whether runs read the shared entry or the origin, parks background runs of
  blobs another replica is fetching, and publishes verified blobs (see ``tiers.py``). Bytes are
  counted by source: ``origin_bytes`` and ``shared_bytes``.

INVARIANT (single-flight): between looking a block up in the queue and inserting its state
there is no checkpoint (:meth:`BlockQueue.want` never awaits); adding one would let two
fetches of one block start.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

if sys.version_info < (3, 11):  # the builtin arrived in 3.11; trio depends on the backport
    from exceptiongroup import BaseExceptionGroup

from ..blocks import BlobSpec, BlockStore, checker_for
from ..config import Settings
from ..errors import CacheError, TransientError, TtfsError
from ..manifest import Pointer
from ..telemetry.metrics import MetricsSnapshot
from ..transfer.pool import WorkerPool
from .follower import Verifier
from .queue import BlockQueue, Priority, Run
from .runs import Counters, Progress, RunExecutor
from .source import Source
from .tiers import SharedTier

if TYPE_CHECKING:  # providers import httpx: a mount imports them only once it serves
    from ..providers import ProviderSet

log = logging.getLogger(__name__)


# Blocks complete() queues at once (x2 with the look-ahead window): 4096 x 2 MiB = 8 GiB.
_COMPLETE_WINDOW = 4096


@dataclass(frozen=True, slots=True)
class FetcherStatistics:
    queued: dict[str, int]
    inflight_requests: int
    origin_bytes: int
    origin_requests: int
    retries: int
    shared_bytes: int = 0
    shared_requests: int = 0
    shared_corrupt: int = 0
    worker_requests: int = 0
    worker_restarts: int = 0
    shared_trusted: int = 0


class Fetcher:
    """Owns the queue, the connection budget and the fetch tasks. Use :func:`open_fetcher`."""

    def __init__(self, store: BlockStore, providers: ProviderSet, settings: Settings) -> None:
        self.store = store
        self.providers = providers
        self.settings = settings
        self._sources: dict[str, Source] = {}
        self._nursery: trio.Nursery | None = None
        self._adding: dict[str, trio.Event] = {}  # blob id → set when its open is over
        self.counters = Counters()
        # Called (as tasks) after a blob was discarded: the mount drops the kernel's pages of
        # its files, which may still hold the bytes that failed verification.
        self.discard_listeners: list[Callable[[Source], Awaitable[None]]] = []
        # Called (plainly, on the event loop) when a blob becomes done: whole and verified.
        # A callback rather than a task per blob waiting on ``done``: a mount of 10^5 files
        # must not park 10^5 tasks (memory grows with the manifest otherwise).
        self.done_listeners: list[Callable[[Source], None]] = []
        shared = settings.shared_cache
        self.tier: SharedTier | None = SharedTier(self, shared) if shared is not None else None
        self.pool: WorkerPool | None = None
        # Workers connect directly; a configured TTFS_PROXY (settings.proxy, what
        # providers.data_proxy returns) keeps bodies on the httpx path, which speaks through it.
        if settings.workers > 0 and settings.proxy is None:
            threads = max(1, -(-settings.max_connections // settings.workers))
            self.pool = WorkerPool(
                settings.workers,
                threads,
                settings.connect_timeout,
                settings.stall_timeout,
                settings.splice,
            )
        self._runs = RunExecutor(settings, self.counters, self._landed, self.tier, self.pool)
        self._verifier = Verifier(
            store,
            self.tier,
            settings.verify,
            self._refetch,
            self._notify,
            self.counters,
            self.done_listeners,
        )
        if settings.use_range:
            unit = max(1, settings.background_unit // store.block_size)
            self.queue = BlockQueue(settings, unit, settings.per_blob_connections)
        else:  # one stream per file, as truss-transfer's non-range mode
            self.queue = BlockQueue(settings, 1 << 62, 1)

    # -- blobs ---------------------------------------------------------------------------
    async def add(self, pointer: Pointer) -> Source:
        """Open the blob behind ``pointer`` (once per hash) and return its source.

        Raises:
            CacheError: the block store cannot hold it.
            ConfigError: no provider serves its resolution type.
        """
        blob_id = pointer.hash
        # Single-flight per blob, not one lock for all: opening a partial blob re-checks its
        # blocks (seconds for a big one), and a reader of another file must not wait for it.
        while (source := self._sources.get(blob_id)) is None and blob_id in self._adding:
            await self._adding[blob_id].wait()
        if source is not None:
            return source
        adding = self._adding[blob_id] = trio.Event()
        try:
            provider = self.providers.for_pointer(pointer)
            spec = BlobSpec(blob_id, pointer.size, checker_for(pointer.hashtype, pointer.hash))
            blob = await trio.to_thread.run_sync(self.store.open_blob, spec)
            source = Source(blob, pointer, provider)
            self._sources[blob_id] = source
            self.counters.local_bytes += blob.bytes_present
            if self.tier is not None:
                source.tier = self.tier.track(source)
            if blob.complete and (blob.verified or not self._verifier.must_verify(source)):
                source.done.set()
                if self.tier is not None:
                    self.tier.on_done(source)  # publish a blob that was already local
            elif blob.complete:
                self._start_follower(source)  # only the hashing is left
            # else: the follower starts with the blob's first request (request_nowait), so an
            # untouched blob of a big manifest costs no parked task.
            return source
        finally:
            del self._adding[blob_id]
            adding.set()

    def source(self, blob_id: str) -> Source:
        return self._sources[blob_id]

    def sources(self) -> list[Source]:
        return list(self._sources.values())

    # Byte and request counters (statistics, resolve's summary line).
    @property
    def origin_bytes(self) -> int:
        return self.counters.origin_bytes

    @property
    def shared_bytes(self) -> int:
        return self.counters.shared_bytes

    @property
    def origin_requests(self) -> int:
        return self.counters.origin_requests

    @property
    def retries(self) -> int:
        return self.counters.retries

    # -- what the shared tier may ask (ttfs.fetch.source.TierHost) ---------------------------
    def unpark(self, source: Source) -> None:
        """Put the blob's parked queue entries back and wake the dispatcher."""
        self.queue.unpark(source)

    def wake(self) -> None:
        self.queue.wakeup.set()

    # -- requests ---------------------------------------------------------------------------
    def request_nowait(
        self,
        source: Source,
        blocks: Iterable[int],
        prio: Priority,
        *,
        reader_at: int | None = None,
    ) -> None:
        """Queue the missing ``blocks`` at ``prio`` (bumping queued ones); never blocks.

        ``reader_at`` (READAHEAD): the block the stream's reader is at (the fair order of
        :class:`~ttfs.fetch.queue.BlockQueue`).
        """
        if not source.following and not source.done.is_set():
            self._start_follower(source)
        self.queue.want(source, blocks, prio, reader_at)

    async def ensure(self, source: Source, blocks: range, prio: Priority = Priority.DEMAND) -> None:
        """Return once every block in ``blocks`` is present.

        Raises:
            TtfsError: the fetch of one of the blocks failed (every waiter sees the same error).
        """
        blob = source.blob
        self.request_nowait(source, blocks, prio)
        for i in blocks:
            if blob.present[i]:
                continue
            state = self.queue.state(blob.blob_id, i)
            if state is None:  # landed between request and here, or failed and was dropped
                if blob.present[i]:
                    continue
                self.request_nowait(source, [i], prio)
                state = self.queue.state(blob.blob_id, i)
                assert state is not None
            await state.event.wait()
            if state.error is not None:
                raise state.error
            if not blob.present[i]:
                # Landed, then discarded by a failed verification: ask again.
                await self.ensure(source, range(i, i + 1), prio)

    async def read(
        self, source: Source, offset: int, length: int, prio: Priority = Priority.DEMAND
    ) -> bytes | bytearray:
        """Bytes ``[offset, offset+length)`` of the blob, fetching missing blocks first.

        Bytes in the page cache are read on the event loop; anything that could wait on the
        device (pages evicted since they landed) is read in a worker thread, so one slow disk
        read never stalls every other FUSE request.
        """
        blob = source.blob
        length = max(0, min(length, blob.size - offset))
        if length == 0:
            return b""
        started = time.perf_counter() if prio == Priority.DEMAND else 0.0
        blocks = blob.blocks_for(offset, length)
        if blob.missing(blocks):
            await self.ensure(source, blocks, prio)
        data: bytes | bytearray | None = blob.pread_cached(offset, length)
        if data is None:
            data = await trio.to_thread.run_sync(blob.pread, offset, length)
        if prio == Priority.DEMAND:
            self.counters.demand_latency.observe(time.perf_counter() - started)
        return data

    async def complete(self, source: Source, prio: Priority = Priority.PREFETCH) -> None:
        """Fetch every missing block; return when the blob is whole and verified.

        Raises:
            IntegrityError: the blob did not match its hash twice in a row.
            TtfsError: a block could not be fetched.
        """
        blob = source.blob
        while not source.done.is_set():
            if source.failure is not None:
                raise source.failure
            generation = source.discards
            # Windows of blocks bound the queue's memory for huge blobs; the next window is
            # queued before waiting for the current one so the connections never run dry.
            window = _COMPLETE_WINDOW
            for start in range(0, blob.n_blocks, window):
                ahead = range(start + window, min(start + 2 * window, blob.n_blocks))
                if ahead:
                    self.request_nowait(source, ahead, prio)
                await self.ensure(source, range(start, min(start + window, blob.n_blocks)), prio)
            while (
                not source.done.is_set()
                and source.failure is None
                and source.discards == generation
            ):
                await source.changed.wait()

    async def recheck(self, source: Source) -> list[int]:
        """The blob's data file changed after it was verified (a write behind the cache's
        back): drop every block whose checksum no longer matches, forget the verification and
        follow the blob again; returns the dropped blocks, which the next reads fetch again.
        """
        blob = source.blob
        bad = await trio.to_thread.run_sync(blob.check_blocks)
        await trio.to_thread.run_sync(self.store.forget_verification, blob)
        if source.done.is_set():
            source.done = trio.Event()
            self._start_follower(source)
        self._notify(source)
        return bad

    def _start_follower(self, source: Source) -> None:
        assert self._nursery is not None
        source.following = True
        self._nursery.start_soon(self._verifier.follow, source)

    # -- landing and verification ------------------------------------------------------------
    def _notify(self, source: Source) -> None:
        event, source.changed = source.changed, trio.Event()
        event.set()

    def _landed(self, source: Source, blocks: list[int]) -> None:
        """Blocks of ``source`` landed: wake their waiters and the blob's follower."""
        self.queue.landed(source, blocks)
        self._notify(source)

    def _refetch(self, source: Source) -> None:
        """A discarded blob (hash mismatch): queue all of it again in the background, and tell
        the listeners (the mount drops the kernel's pages of its files)."""
        self.request_nowait(source, range(source.blob.n_blocks), Priority.PREFETCH)
        # Not awaited: dropping kernel pages can wait on reads that need the refetch.
        assert self._nursery is not None
        for listener in self.discard_listeners:
            self._nursery.start_soon(listener, source)

    # -- dispatch ---------------------------------------------------------------------------
    async def _dispatcher(self) -> None:
        """Start every run the queue allows (:meth:`BlockQueue.take`); otherwise wait for a
        change or for a held-back prefetch's time."""
        assert self._nursery is not None
        queue = self.queue
        while True:
            # A fresh event *before* looking: any change after the look sets this one.
            queue.wakeup = trio.Event()
            run = queue.take(self.tier, self._sources)
            if isinstance(run, Run):
                self._nursery.start_soon(self._run, run)
                continue
            if self.tier is not None and queue.background_room():
                self.tier.on_idle()  # room for background work: maybe lock another blob
            with trio.move_on_at(run):
                await queue.wakeup.wait()

    async def _run(self, run: Run) -> None:
        """Fetch a run's blocks (:mod:`.runs`); wake or fail their waiters.

        A PREFETCH run is cancelled when a demand fetch starts; the blocks it did not land go
        back to the queue, and the journal keeps its partial block, so the preemption wastes
        only what sat in socket buffers.
        """
        source, last = run.source, run.last
        progress = Progress(source.blob, run.first)
        scope = trio.CancelScope()
        if run.prio == Priority.PREFETCH:
            self.queue.preemptible[scope] = (source.blob.blob_id, run.first)
        try:
            with scope:
                await self._runs.fetch(source, progress, last)
            if scope.cancelled_caught:
                self.queue.requeue(source, progress.next_block, last)
        except (TtfsError, OSError) as e:
            error: BaseException = e if isinstance(e, TtfsError) else CacheError(str(e))
            if not isinstance(e, TransientError):  # those were counted at each attempt
                self.counters.errors[type(error).__name__] += 1
            self._fail(source, progress.next_block, last, error)
        except BaseException as e:
            # Cancellation (shutdown) or a bug: release the waiters, then propagate.
            self._fail(source, progress.next_block, last, CacheError(f"fetch aborted: {e!r}"))
            raise
        finally:
            self.queue.run_ended(run, scope)

    def _fail(self, source: Source, first: int, last: int, error: BaseException) -> None:
        log.warning(
            "fetch of %s blocks %d-%d failed: %s", source.pointer.file_name, first, last, error
        )
        self.queue.fail(source, first, last, error)
        if self.tier is not None:
            self.tier.on_failed(source)

    def has_background_work(self, source: Source) -> bool:
        """Whether background blocks of ``source`` are queued, parked or in flight."""
        return self.queue.has_background_work(source)

    async def settled(self, source: Source) -> None:
        """Wait until a complete blob's publish to the shared cache (if any) is over."""
        if self.tier is not None:
            await self.tier.settled(source)

    # -- housekeeping ----------------------------------------------------------------------
    async def _flusher(self) -> None:
        while True:
            await trio.sleep(self.settings.flush_interval)
            await trio.to_thread.run_sync(self.store.flush)

    def statistics(self) -> FetcherStatistics:
        c = self.counters
        return FetcherStatistics(
            self.queue.queued(),
            self.queue.inflight_total,
            c.origin_bytes,
            c.origin_requests,
            c.retries,
            c.shared_bytes,
            c.shared_requests,
            self.tier.corrupt_entries if self.tier is not None else 0,
            c.worker_requests,
            self.pool.restarts if self.pool is not None else 0,
            c.shared_trusted,
        )

    def metrics_snapshot(self) -> MetricsSnapshot:
        """The values one Prometheus scrape exports (ttfs/telemetry/metrics.py).

        Runs in the exporter's thread: containers are copied in one C call each (atomic under
        the GIL) before they are iterated, so the trio thread may change them meanwhile.
        """
        queued = self.queue.queued()
        c = self.counters
        return MetricsSnapshot(
            origin_bytes=c.origin_bytes,
            shared_bytes=c.shared_bytes,
            local_bytes=c.local_bytes,
            origin_requests=c.origin_requests,
            shared_requests=c.shared_requests,
            retries=c.retries,
            errors=dict(c.errors),
            blobs_verified=c.blobs_verified,
            blobs_failed=c.blobs_failed,
            inflight_requests=self.queue.inflight_total,
            queued=queued,
            demand_buckets=c.demand_latency.cumulative(),
            demand_count=c.demand_latency.count,
            demand_sum=c.demand_latency.total,
        )

    async def aclose(self) -> None:
        for source in self._sources.values():
            await trio.to_thread.run_sync(self.store.release, source.blob)
        self._sources.clear()


@asynccontextmanager
async def open_fetcher(
    store: BlockStore, providers: ProviderSet, settings: Settings
) -> AsyncIterator[Fetcher]:
    """Run a :class:`Fetcher` for the duration of the block; close providers and flush after."""
    fetcher = Fetcher(store, providers, settings)
    try:
        async with trio.open_nursery() as nursery:
            fetcher._nursery = nursery
            if fetcher.tier is not None:
                fetcher.tier.start(nursery)
            if fetcher.pool is not None:
                fetcher.pool.start(nursery)
            nursery.start_soon(fetcher._dispatcher)
            nursery.start_soon(fetcher._flusher)
            try:
                yield fetcher
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps whatever the body raised (e.g. resolve's DownloadError); callers
        # catch TtfsError, so hand a lone exception back unwrapped.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        with trio.CancelScope(shield=True):
            if fetcher.pool is not None:
                await fetcher.pool.aclose()
            if fetcher.tier is not None:
                await trio.to_thread.run_sync(fetcher.tier.close)
            await fetcher.aclose()
            await providers.aclose()
            await trio.to_thread.run_sync(store.flush)
