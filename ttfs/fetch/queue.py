"""The fetcher's queue: which blocks are wanted, at what priority, and which run goes next.

:class:`BlockQueue` is the bookkeeping half of :class:`~ttfs.fetch.scheduler.Fetcher`, split
from it so that the policy can be read (and tested) apart from fetching and verifying:

* one :class:`BlockState` per wanted block (single-flight: every waiter waits on its event);
* a heap of ``(priority, order, blob id, block)`` entries, stale ones dropped lazily;
* the connection budget's counters (in flight, background, demand) and the PREFETCH runs a
  reader's demand may preempt;
* :meth:`BlockQueue.take`, the dispatch decision: the most urgent entry that may run now,
  coalesced with its queued successors into one run, or the time a held-back prefetch may start.

Nothing here does I/O or awaits: the fetcher calls it from the event loop only, which is what
keeps single-flight (no checkpoint between looking a block up and inserting its state).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import trio

from ..config import Settings
from .source import Source

if TYPE_CHECKING:
    from .tiers import SharedTier

# Seconds after the last demand fetch before new prefetch runs start (stargz waits for a quiet
# period the same way); readahead and demand are never held back.
PREFETCH_QUIET = 0.25

Entry = tuple[int, int, str, int]
"""A heap entry: priority, order within the priority, blob id, block index."""


class Priority(IntEnum):
    DEMAND = 0
    READAHEAD = 1
    PREFETCH = 2


@dataclass(slots=True)
class BlockState:
    """A wanted block: queued (or in flight) once, whoever asks for it."""

    prio: Priority
    inflight: bool = False
    event: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Run:
    """Blocks ``first..last`` of ``source``, claimed by :meth:`BlockQueue.take`."""

    source: Source
    first: int
    last: int
    prio: Priority

    @property
    def background(self) -> bool:
        return self.prio != Priority.DEMAND


class BlockQueue:
    """Wanted blocks, the priority heap and the connection budget of one fetcher."""

    def __init__(self, settings: Settings, unit_blocks: int, per_blob: int) -> None:
        self.settings = settings
        self.unit_blocks = unit_blocks  # blocks per background run
        self.per_blob = per_blob  # background runs one blob may have in flight
        self._blocks: dict[tuple[str, int], BlockState] = {}
        self._heap: list[Entry] = []
        self._seq = itertools.count()
        self.wakeup = trio.Event()  # set on any change the dispatcher should look at
        self.inflight_total = 0
        self.inflight_background = 0
        self.demand_inflight = 0
        self.last_demand = -math.inf
        # In-flight PREFETCH runs a reader's demand may cancel: scope -> (blob id, first block).
        self.preemptible: dict[trio.CancelScope, tuple[str, int]] = {}

    # -- wanting blocks ----------------------------------------------------------------------
    def want(
        self, source: Source, blocks: Iterable[int], prio: Priority, reader_at: int | None
    ) -> None:
        """Queue the missing ``blocks`` at ``prio``, bumping queued ones (never blocks)."""
        blob = source.blob
        bid = blob.blob_id
        changed = False
        for i in blocks:
            if blob.present[i]:
                continue
            key = (bid, i)
            state = self._blocks.get(key)
            if state is None:
                self._blocks[key] = BlockState(prio)
                heapq.heappush(self._heap, (prio, self._order_key(prio, i, reader_at), bid, i))
                changed = True
            elif prio < state.prio and not state.inflight:
                state.prio = prio
                heapq.heappush(self._heap, (prio, self._order_key(prio, i, reader_at), bid, i))
                changed = True
        if changed:
            self.wakeup.set()

    def state(self, blob_id: str, index: int) -> BlockState | None:
        return self._blocks.get((blob_id, index))

    def unpark(self, source: Source) -> None:
        """Put the blob's parked entries back (the shared tier let it go on)."""
        deferred, source.deferred = source.deferred, []
        for entry in deferred:
            heapq.heappush(self._heap, entry)
        self.wakeup.set()

    def _order_key(self, prio: Priority, index: int, reader_at: int | None) -> int:
        """The second element of a heap entry: the order within one priority.

        DEMAND and PREFETCH are first-come first-served, and so is READAHEAD without a reader
        position (a replayed trace, a held mapping of lazy links: ttfs/vfs/lazy.py). READAHEAD
        of a stream is ordered by how far the block lies ahead of its reader
        (``index - reader_at``): several loaders streaming
        different shards (vLLM's loader threads) then take turns at the connection budget in
        the order their readers will need the bytes, instead of the first stream's whole window
        going before the second stream's first block.
        """
        if prio == Priority.READAHEAD and reader_at is not None:
            return max(0, index - reader_at)
        return next(self._seq)

    # -- dispatch ------------------------------------------------------------------------------
    def take(self, tier: SharedTier | None, sources: dict[str, Source]) -> Run | float:
        """The next run to start, claimed and counted; else when to look again (``math.inf``:
        when something changes, i.e. :attr:`wakeup`)."""
        max_total = self.settings.max_connections
        max_background = max_total - self.settings.demand_reserved
        while (entry := self._peek()) is not None:
            prio, _, bid, index = entry
            source = sources[bid]
            if tier is not None and not tier.may_dispatch(source, prio == Priority.DEMAND):
                # The shared tier holds this blob back (looking it up, or another replica
                # fetches it); it re-queues the parked entries when that changes.
                heapq.heappop(self._heap)
                source.deferred.append(entry)
                continue
            allowed = self.inflight_total < max_total and (
                prio == Priority.DEMAND or self.inflight_background < max_background
            )
            # Pause (not cancel) prefetch while a reader waits and for a quiet period after:
            # on a small machine every background stream costs CPU the demand stream needs,
            # and a loader's reads come in bursts with short gaps that would otherwise refill
            # every slot with 16 MiB prefetch runs (first tensor of a 1 GiB shard: 1.85 s with
            # prefetch vs 0.19 s without on the 2-core VM). Readahead keeps going: it serves
            # the reader.
            if allowed and prio == Priority.PREFETCH:
                if self.demand_inflight:
                    # The demand's end wakes us (and starts the quiet period). Waking at the
                    # end of the quiet period, already past while a demand is in flight, spun
                    # the dispatcher and starved the GIL of the threads the demand waited on
                    # (a boto3 client built in a thread took minutes).
                    return math.inf
                quiet_until = self.last_demand + PREFETCH_QUIET
                if trio.current_time() < quiet_until:
                    return quiet_until
            if not allowed:
                return math.inf
            if prio != Priority.DEMAND and source.runs_inflight >= self.per_blob:
                # This blob has its share; park the entry until one of its runs ends.
                heapq.heappop(self._heap)
                source.deferred.append(entry)
                continue
            heapq.heappop(self._heap)
            run = Run(source, index, self._claim(source, index, Priority(prio)), Priority(prio))
            self.inflight_total += 1
            if run.background:
                self.inflight_background += 1
            else:
                # The first demand of a burst (a reader starts after a quiet period) preempts
                # the prefetch runs in flight; later demands of the burst only hold new ones
                # back, so a long load keeps its prefetch connections.
                now = trio.current_time()
                if not self.demand_inflight and now - self.last_demand >= PREFETCH_QUIET:
                    self.preempt(source, index)
                self.demand_inflight += 1
            source.runs_inflight += 1
            return run
        return math.inf

    def background_room(self) -> bool:
        return self.inflight_background < (
            self.settings.max_connections - self.settings.demand_reserved
        )

    def run_ended(self, run: Run, scope: trio.CancelScope) -> None:
        """Release a run's slot (whatever its outcome) and re-queue its blob's parked entries."""
        self.preemptible.pop(scope, None)
        self.inflight_total -= 1
        if run.background:
            self.inflight_background -= 1
        else:
            self.demand_inflight -= 1
            self.last_demand = trio.current_time()
        source = run.source
        source.runs_inflight -= 1
        for entry in source.deferred:
            heapq.heappush(self._heap, entry)
        source.deferred.clear()
        self.wakeup.set()

    def _peek(self) -> Entry | None:
        """The most urgent valid heap entry, dropping stale ones (bumped, landed, claimed)."""
        heap = self._heap
        while heap:
            prio, _, bid, index = heap[0]
            state = self._blocks.get((bid, index))
            if state is None or state.inflight or state.prio != prio:
                heapq.heappop(heap)
                continue
            return heap[0]
        return None

    def _claim(self, source: Source, first: int, prio: Priority) -> int:
        """Mark ``first`` in flight plus, for background work, its queued successors; returns
        the run's last block."""
        bid = source.blob.blob_id
        self._blocks[(bid, first)].inflight = True
        last = first
        if prio == Priority.DEMAND:
            return last
        limit = min(source.blob.n_blocks - 1, first + self.unit_blocks - 1)
        while last < limit:
            state = self._blocks.get((bid, last + 1))
            if state is None or state.inflight or state.prio == Priority.DEMAND:
                break
            state.inflight = True
            last += 1
        return last

    def preempt(self, source: Source, index: int) -> None:
        """Cancel in-flight PREFETCH runs elsewhere (their blocks go back to the queue), never
        a run of the same blob that starts at or ahead of ``index`` within one connection
        budget: that run is the reader's own stream, and cancelling it would make the reader
        wait for the same bytes again. Called for the first demand of a burst, and for a held
        mapping (ttfs/vfs/lazy.py), which needs every connection the prefetch holds."""
        reach = self.settings.max_connections * self.unit_blocks
        bid = source.blob.blob_id
        for scope, (run_bid, first) in list(self.preemptible.items()):
            if run_bid == bid and index <= first <= index + reach:
                continue
            scope.cancel()
            del self.preemptible[scope]

    # -- outcomes ------------------------------------------------------------------------------
    def landed(self, source: Source, blocks: list[int]) -> None:
        """Blocks landed: wake their waiters."""
        bid = source.blob.blob_id
        for index in blocks:
            state = self._blocks.pop((bid, index), None)
            if state is not None:
                state.event.set()

    def requeue(self, source: Source, first: int, last: int) -> None:
        """Put the blocks of a preempted run back in the queue at their priority."""
        bid = source.blob.blob_id
        for index in range(first, last + 1):
            state = self._blocks.get((bid, index))
            if state is not None and state.inflight:
                state.inflight = False
                heapq.heappush(self._heap, (state.prio, next(self._seq), bid, index))

    def fail(self, source: Source, first: int, last: int, error: BaseException) -> None:
        """Fail the run's blocks and every block of the blob still queued: they would fail the
        same way (the object is gone, stale or unreachable after a whole retry budget), so
        they fail now instead of spending a retry budget each. A later request starts afresh."""
        bid = source.blob.blob_id
        doomed = [(bid, index) for index in range(first, last + 1)]
        doomed += [
            key for key, state in self._blocks.items() if key[0] == bid and not state.inflight
        ]
        for key in doomed:
            state = self._blocks.pop(key, None)
            if state is not None:
                state.error = error
                state.event.set()

    # -- questions -----------------------------------------------------------------------------
    def has_background_work(self, source: Source) -> bool:
        """Whether background blocks of ``source`` are queued, parked or in flight."""
        if source.runs_inflight or any(e[0] != Priority.DEMAND for e in source.deferred):
            return True
        bid = source.blob.blob_id
        return any(
            key[0] == bid and state.prio != Priority.DEMAND for key, state in self._blocks.items()
        )

    def queued(self) -> dict[str, int]:
        """Blocks waiting per priority (not in flight). Safe from another thread: the states
        are copied in one C call (atomic under the GIL) before they are counted."""
        counts = {p.name: 0 for p in Priority}
        for state in list(self._blocks.values()):
            if not state.inflight:
                counts[state.prio.name] += 1
        return counts
