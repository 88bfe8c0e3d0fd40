"""The shared-cache (b10fs) tier of the fetcher: which ranges come from where, and who waits.

Lookup order for a block: page cache → local block store → shared cache → origin. The first two
are the block store's business; this module decides, per blob, between the last two and runs the
cross-replica single-flight. Bytes from the shared cache go through the same scheduler,
single-flight, :class:`~ttfs.blocks.RunWriter` and follower hash as origin bytes: a run of a blob
whose entry is usable simply reads its range with ``pread`` in a worker thread instead of asking
the provider, several runs in parallel, so a shared entry is read in parallel ranges, never as one
sequential stream (anchors lesson 18).

Per blob, a small state machine (:class:`TierState`)::

    UNKNOWN --request--> LOOKING --entry right-sized--> SHARED  (runs read the entry)
                           |--reads off--> ORIGIN
                           '--no entry--> QUEUED --promoted--> TRYING --lock taken--> ORIGIN
                                                                 |--entry appeared--> SHARED
                                                                 '--lock elsewhere--> WAITING
    WAITING --entry appeared--> SHARED;  --lock gone or stale (broken)--> QUEUED

While a blob is LOOKING, every request for it waits (one ``stat``). While it is QUEUED, TRYING
or WAITING, DEMAND runs go to the origin at once (a blocked reader never waits for another
replica) and background runs are parked. A QUEUED blob is *promoted* (its lock tried) only when
the dispatcher has idle background capacity, so a replica takes a lock only for work it is about
to do: replicas that start together, each with its own shuffled order, take different blobs
first and then wait for each other's instead of all fetching everything.

When a blob is complete and verified, it is published (copied, never moved) if this process may
write, and its lock is released; a holder that stops having background work for the blob (a
mount without prefetch) releases its lock too, so nobody waits for a publish that never comes.
A shared entry that fails the blob's hash is reported, moved aside and replaced: the fetcher's
"discard and fetch once more" then goes to the origin.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import heapq
import logging
import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ..blocks.shared import (
    Decision,
    HeldLock,
    SharedCache,
    SharedCacheConfig,
    SharedFile,
)
from ..errors import CacheError, TransientError
from ..manifest import Pointer
from ..providers.base import Sink

if TYPE_CHECKING:
    from .scheduler import Fetcher, Source

log = logging.getLogger(__name__)

# Shared-entry reads: 256 KiB pieces into one reused buffer per run stay in the CPU cache
# between the pread and the block store's pwrite + checksum; measured on the 2-core VM (CPU time
# per byte, page-cache-hot entry): 256 KiB ~420 MiB per CPU-second, 1 MiB ~340, 4 MiB ~190.
_READ_CHUNK = 256 * 1024
# Worker threads reading entries at once (a network filesystem is latency-bound: several reads
# in flight); their own limiter, so they never starve the hashing threads.
_READERS = 16
# Ticks of the refresher without background work for a held blob before its lock is released.
_IDLE_TICKS = 2


class TierState(enum.Enum):
    UNKNOWN = "unknown"
    LOOKING = "looking"
    SHARED = "shared"
    QUEUED = "queued"
    TRYING = "trying"
    WAITING = "waiting"
    ORIGIN = "origin"


_PARKED = (TierState.QUEUED, TierState.TRYING, TierState.WAITING)


@dataclass(slots=True)
class BlobTier:
    """The tier's view of one blob."""

    state: TierState = TierState.UNKNOWN
    entry: SharedFile | None = None
    lock: HeldLock | None = None
    bad: bool = False  # the entry failed a check: ignored for the rest of the process
    queued: bool = False
    settling: bool = False
    settled: trio.Event = field(default_factory=trio.Event)
    idle_ticks: int = 0


class SharedTier:
    """Owns the shared cache for one fetcher. Created by the fetcher when
    ``settings.shared_cache`` is set; :meth:`prepare` runs the upstream decision."""

    def __init__(self, fetcher: Fetcher, config: SharedCacheConfig) -> None:
        self.fetcher = fetcher
        self.config = config
        self.cache = SharedCache(config)
        self.decision: Decision | None = None
        self.corrupt_entries = 0
        self._prepare_lock = trio.Lock()
        self._queue: deque[Source] = deque()
        self._promoting = False
        self._waiting: dict[str, Source] = {}
        self._held: dict[str, Source] = {}
        self._nursery: trio.Nursery | None = None
        self._readers = trio.CapacityLimiter(_READERS)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._poller)
        nursery.start_soon(self._refresher)

    def close(self) -> None:
        """Release every lock we hold and close every entry (blocking; at shutdown)."""
        for source in self.fetcher.sources():
            st = source.tier
            if st is None:
                continue
            if st.lock is not None:
                with contextlib.suppress(OSError):
                    self.cache.release(st.lock)
                st.lock = None
            self._close_entry(st)
        self._held.clear()
        self._waiting.clear()

    def _spawn(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None, "use open_fetcher()"
        self._nursery.start_soon(fn, *args)

    # -- the decision ------------------------------------------------------------------------
    async def prepare(
        self, pointers: Sequence[Pointer], *, strict: bool = True, whole: bool = True
    ) -> Decision:
        """Cleanup, space stats and the read/write decision, once per fetcher (spec §3.6).

        ``resolve`` calls it with the whole manifest before downloading. Otherwise the first
        request prepares it with the blobs the fetcher knows by then (``whole=False``: no
        cleanup, since entries of blobs not opened yet would look foreign), and a failure
        there only turns the tier off (``strict=False``).

        Raises:
            CacheError: (``strict`` only) the directory cannot be created, listed or measured.
        """
        async with self._prepare_lock:
            if self.decision is not None:
                return self.decision
            blobs: dict[str, int] = {}
            for p in pointers:
                blobs.setdefault(p.hash, p.size)
            try:
                decision = await trio.to_thread.run_sync(
                    functools.partial(self.cache.decide, list(blobs.items()), cleanup=whole)
                )
            except CacheError as e:
                if strict:
                    raise
                log.error("b10cache disabled for this process: %s", e)
                decision = Decision(read=False, write=False)
            self.decision = decision
            return decision

    async def _decision(self) -> Decision:
        if self.decision is not None:
            return self.decision
        pointers = [s.pointer for s in self.fetcher.sources()]
        return await self.prepare(pointers, strict=False, whole=False)

    # -- hooks called by the fetcher -----------------------------------------------------------
    def track(self, source: Source) -> BlobTier:
        return BlobTier()

    def may_dispatch(self, source: Source, demand: bool) -> bool:
        """Whether a run of ``source`` may start now (the dispatcher parks it otherwise)."""
        st = source.tier
        if st is None:
            return True
        state = st.state
        if state is TierState.SHARED or state is TierState.ORIGIN:
            return True
        if state is TierState.UNKNOWN:
            st.state = TierState.LOOKING
            self._spawn(self._lookup, source)
            return False
        if state is TierState.LOOKING:
            return False
        if demand:
            return True  # a blocked reader never waits for another replica
        if state is TierState.QUEUED and not st.queued:
            st.queued = True
            self._queue.append(source)
        return False

    def on_idle(self) -> None:
        """The dispatcher has idle background capacity: try the next queued blob's lock."""
        if self._queue and not self._promoting:
            self._promoting = True
            self._spawn(self._promote)

    def shared_entry(self, source: Source) -> SharedFile | None:
        """The entry a run of ``source`` reads from, or None for the origin."""
        st = source.tier
        if st is None or st.state is not TierState.SHARED or st.bad:
            return None
        return st.entry

    async def read_range(
        self, source: Source, entry: SharedFile, start: int, end: int, sink: Sink
    ) -> None:
        """Stream ``[start, end)`` of the shared entry into ``sink`` (pread in a thread).

        Raises:
            TransientError: the entry cannot be read or got shorter; it is then ignored for the
                rest of the process, so the scheduler's retry goes to the origin.
        """
        offset = start
        # One buffer per run, reused: the sink copies it out (pwrite) before the next read.
        buf = bytearray(min(_READ_CHUNK, max(end - start, 1)))
        view = memoryview(buf)
        while offset < end:
            n = min(len(buf), end - offset)
            part = view[:n]
            try:
                got = await trio.to_thread.run_sync(
                    os.preadv, entry.fd, [part], offset, limiter=self._readers
                )
            except OSError as e:
                self._drop(source, f"read failed: {e}")
                raise TransientError(
                    f"b10cache read of {entry.path} failed: {e}", kind="shared_cache"
                ) from e
            if got != n:
                self._drop(source, "it is shorter than expected")
                raise TransientError(
                    f"b10cache entry {entry.path} is shorter than expected", kind="shared_cache"
                )
            sink(part)
            offset += n

    def on_done(self, source: Source) -> None:
        """The blob is complete and verified: publish it (or refresh its atime), then unlock."""
        st = source.tier
        if st is None or st.settling:
            return
        st.settling = True
        self._spawn(self._settle, source)

    def on_failed(self, source: Source) -> None:
        """Fetching the blob failed: let another replica try, look again on the next request."""
        st = source.tier
        if st is None:
            return
        bid = source.blob.blob_id
        self._waiting.pop(bid, None)
        self._unlock(source)
        if st.state is not TierState.LOOKING:
            st.state = TierState.UNKNOWN

    async def on_mismatch(self, source: Source, shared_before: int) -> bool:
        """The blob failed its hash. If shared-cache bytes went into it, blame the entry:
        report it, ignore it from now on, move it aside so a good copy replaces it, and send
        the refetch to the origin. Returns whether the shared cache was involved."""
        st = source.tier
        if st is None or st.entry is None or source.shared_bytes == shared_before:
            return False
        entry = st.entry
        st.bad = True
        st.state = TierState.ORIGIN
        self.corrupt_entries += 1
        checker = source.blob.spec.checker
        log.warning(
            "b10cache entry %s does not match %s %s: not using it, moving it aside and "
            "fetching %s from the origin",
            entry.path,
            checker.algorithm,
            checker.expected,
            source.pointer.file_name,
        )
        aside = await trio.to_thread.run_sync(self.cache.mark_corrupt, entry)
        if aside is not None:
            log.warning("b10cache: corrupt entry moved to %s", aside)
        return True

    async def settled(self, source: Source) -> None:
        """Wait until the blob's publish (if any) is over."""
        st = source.tier
        if st is not None and st.settling:
            await st.settled.wait()

    # -- tasks ---------------------------------------------------------------------------------
    async def _lookup(self, source: Source) -> None:
        st = source.tier
        assert st is not None
        try:
            decision = await self._decision()
            if decision.read and not st.bad:
                entry = st.entry or await trio.to_thread.run_sync(
                    self.cache.open_entry, source.blob.blob_id, source.blob.size
                )
                if entry is not None:
                    st.entry = entry
                    st.state = TierState.SHARED
                    log.debug("b10cache hit: %s", entry.path)
                else:
                    st.state = TierState.QUEUED
            else:
                st.state = TierState.ORIGIN
        except BaseException:
            st.state = TierState.ORIGIN
            raise
        finally:
            self._wake(source)

    async def _promote(self) -> None:
        try:
            while self._queue:
                source = self._queue.popleft()
                st = source.tier
                assert st is not None
                st.queued = False
                if (
                    st.state is not TierState.QUEUED
                    or source.done.is_set()
                    or not self._parked_background(source)
                ):
                    continue
                st.state = TierState.TRYING
                try:
                    outcome, payload = await trio.to_thread.run_sync(self._acquire, source)
                except OSError as e:
                    log.warning("b10cache: cannot lock %s: %s", source.blob.blob_id, e)
                    outcome, payload = "origin", None
                if st.state is not TierState.TRYING:  # failed or reset meanwhile
                    if isinstance(payload, HeldLock):
                        await trio.to_thread.run_sync(self.cache.release, payload)
                    continue
                self._apply(source, outcome, payload)
                self._wake(source)
                now: TierState = st.state
                if now is not TierState.WAITING:
                    break  # work for the dispatcher; the next promotion waits for idle capacity
        finally:
            self._promoting = False

    def _acquire(self, source: Source) -> tuple[str, Any]:
        """Blocking: the entry if it appeared, else our lock, else whom to wait for."""
        bid, size = source.blob.blob_id, source.blob.size
        decision = self.decision
        assert decision is not None and source.tier is not None
        bad = source.tier.bad
        if not bad:
            entry = self.cache.open_entry(bid, size)
            if entry is not None:
                return "shared", entry
        for _ in range(3):
            info = self.cache.inspect_lock(bid)
            if info is None:
                if not decision.write:
                    return "origin", None  # we would never publish: do not make others wait
                held = self.cache.try_lock(bid)
                if held is None:
                    continue  # lost the race to another replica: look at its lock
                entry = None if bad else self.cache.open_entry(bid, size)
                if entry is not None:  # published between our look and our lock
                    self.cache.release(held)
                    return "shared", entry
                return "locked", held
            reason = self.cache.lock_stale(bid, info)
            if reason is None:
                return "waiting", info
            self.cache.break_lock(bid, info, reason)
        return "waiting", None

    def _apply(self, source: Source, outcome: str, payload: Any) -> None:
        st = source.tier
        assert st is not None
        bid = source.blob.blob_id
        if outcome == "shared":
            st.entry = payload
            st.state = TierState.SHARED
            log.debug("b10cache hit: %s", payload.path)
        elif outcome == "locked":
            st.lock = payload
            st.idle_ticks = 0
            self._held[bid] = source
            st.state = TierState.ORIGIN
            log.debug("b10cache: fetching %s from the origin for all replicas", bid)
        elif outcome == "waiting":
            st.state = TierState.WAITING
            self._waiting[bid] = source
            holder = getattr(payload, "owner", None) or {}
            log.info(
                "b10cache: %s is being fetched by %s pid %s; waiting for it",
                source.pointer.file_name,
                holder.get("host", "another replica"),
                holder.get("pid", "?"),
            )
        else:
            st.state = TierState.ORIGIN

    async def _poller(self) -> None:
        """Watch the blobs we wait for: their entry appears, or their lock goes away."""
        while True:
            await trio.sleep(self.config.poll_secs * max(1.0, len(self._waiting) / 200))
            for bid, source in list(self._waiting.items()):
                if source.done.is_set():
                    self._waiting.pop(bid, None)
            if not self._waiting:
                continue
            sources = list(self._waiting.values())
            results = await trio.to_thread.run_sync(self._check_waiting, sources)
            freed = False
            for source, (outcome, payload) in zip(sources, results, strict=True):
                st = source.tier
                assert st is not None
                bid = source.blob.blob_id
                if st.state is not TierState.WAITING:
                    if isinstance(payload, SharedFile):
                        os.close(payload.fd)
                    continue
                if outcome == "wait":
                    continue
                self._waiting.pop(bid, None)
                if outcome == "shared":
                    self._apply(source, "shared", payload)
                else:  # the holder gave up or died: compete for the lock again, first in line
                    st.state = TierState.QUEUED
                    if not st.queued and self._parked_background(source):
                        st.queued = True
                        self._queue.appendleft(source)
                    freed = True
                self._wake(source)
            if freed:
                self.fetcher._wakeup.set()

    def _check_waiting(self, sources: Iterable[Source]) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for source in sources:
            bid = source.blob.blob_id
            assert source.tier is not None
            try:
                entry = None if source.tier.bad else self.cache.open_entry(bid, source.blob.size)
                if entry is not None:
                    out.append(("shared", entry))
                    continue
                info = self.cache.inspect_lock(bid)
                if info is None:
                    out.append(("free", None))
                    continue
                reason = self.cache.lock_stale(bid, info)
                if reason is not None and self.cache.break_lock(bid, info, reason):
                    out.append(("free", None))
                    continue
            except OSError as e:
                log.debug("b10cache: cannot check %s: %s", bid, e)
            out.append(("wait", None))
        return out

    async def _refresher(self) -> None:
        """Keep our locks fresh; release the ones whose blob we no longer work on."""
        while True:
            await trio.sleep(self.config.lock_refresh_secs)
            held = [(s, s.tier.lock) for s in self._held.values() if s.tier and s.tier.lock]
            if not held:
                continue
            ours = await trio.to_thread.run_sync(self._refresh_all, [lock for _, lock in held])
            for (source, lock), still in zip(held, ours, strict=True):
                st = source.tier
                assert st is not None
                if not still and st.lock is lock:
                    log.warning(
                        "b10cache: lock %s was taken over by another replica; continuing",
                        lock.path,
                    )
                if st.settling or st.lock is not lock:
                    continue
                if self.fetcher.has_background_work(source):
                    st.idle_ticks = 0
                    continue
                st.idle_ticks += 1
                if st.idle_ticks >= _IDLE_TICKS:
                    log.debug("b10cache: no more work on %s; releasing its lock", lock.path)
                    self._unlock(source)
                    st.state = TierState.QUEUED

    def _refresh_all(self, locks: list[HeldLock]) -> list[bool]:
        return [self.cache.refresh(lock) for lock in locks]

    async def _settle(self, source: Source) -> None:
        st = source.tier
        assert st is not None
        try:
            decision = await self._decision()
            blob = source.blob
            if decision.write and blob.complete:  # also replaces a corrupt or short entry
                result = await trio.to_thread.run_sync(
                    self.cache.publish, blob.path, blob.blob_id, blob.size
                )
                log.debug("b10cache publish of %s: %s", source.pointer.file_name, result)
            elif st.entry is not None and not st.bad:
                await trio.to_thread.run_sync(self.cache.touch, st.entry.path)
        finally:
            self._unlock(source)
            self._close_entry(st)
            st.settled.set()

    # -- helpers -------------------------------------------------------------------------------
    def _unlock(self, source: Source) -> None:
        st = source.tier
        assert st is not None
        self._held.pop(source.blob.blob_id, None)
        lock, st.lock = st.lock, None
        if lock is not None:
            try:
                self.cache.release(lock)  # a few metadata operations; not worth a thread hop
            except OSError as e:
                log.warning("b10cache: cannot release %s: %s", lock.path, e)

    @staticmethod
    def _close_entry(st: BlobTier) -> None:
        entry, st.entry = st.entry, None
        if entry is not None:
            with contextlib.suppress(OSError):
                os.close(entry.fd)

    def _drop(self, source: Source, why: str) -> None:
        st = source.tier
        assert st is not None
        if not st.bad:
            log.warning(
                "b10cache entry for %s is unusable (%s); using the origin",
                source.pointer.file_name,
                why,
            )
        st.bad = True
        if st.state is TierState.SHARED:
            st.state = TierState.ORIGIN

    @staticmethod
    def _parked_background(source: Source) -> bool:
        return any(entry[0] != 0 for entry in source.deferred)

    def _wake(self, source: Source) -> None:
        """Put the blob's parked entries back in the queue and wake the dispatcher."""
        deferred, source.deferred = source.deferred, []
        heap = self.fetcher._heap
        for entry in deferred:
            heapq.heappush(heap, entry)
        self.fetcher._wakeup.set()
