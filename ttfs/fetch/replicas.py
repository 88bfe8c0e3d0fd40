"""Cross-replica single-flight for the shared cache: who fetches a blob for everyone, who waits.

The shared tier (:mod:`ttfs.fetch.tiers`) hands a blob here when it has no entry yet and a
background run wants it (state QUEUED). From then on::

    QUEUED --promoted--> TRYING --lock taken--> ORIGIN   (we fetch it for all replicas)
                           |--entry appeared--> SHARED
                           '--lock elsewhere--> WAITING
    WAITING --entry appeared--> SHARED;  --lock gone or stale (broken)--> QUEUED

A QUEUED blob is *promoted* (its lock tried) only when the dispatcher has idle background
capacity, so a replica takes a lock only for work it is about to do: replicas that start
together, each with its own shuffled order, take different blobs first and then wait for each
other's instead of all fetching everything. A holder refreshes its locks and releases the lock of
a blob it no longer works on (a mount without prefetch), so nobody waits for a publish that
never comes.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import trio

from ..blocks.shared import Decision, HeldLock, SharedCache
from ..config import SharedCacheConfig
from .source import Source, TierHost, TierState

log = logging.getLogger(__name__)

# Ticks of the refresher without background work for a held blob before its lock is released.
_IDLE_TICKS = 2


class ReplicaLocks:
    """The lock queue, the waiters' poller and the holders' refresher of one fetcher."""

    def __init__(
        self,
        host: TierHost,
        cache: SharedCache,
        config: SharedCacheConfig,
        decision: Callable[[], Decision | None],
    ) -> None:
        self.host = host
        self.cache = cache
        self.config = config
        self._decision = decision
        self._queue: deque[Source] = deque()
        self._promoting = False
        self._waiting: dict[str, Source] = {}
        self._held: dict[str, Source] = {}
        self._releasing: list[HeldLock] = []
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._poller)
        nursery.start_soon(self._refresher)

    def close(self) -> None:
        """Release every lock we hold (blocking; at shutdown)."""
        for source in list(self._held.values()):
            st = source.tier
            if st is not None and st.lock is not None:
                with contextlib.suppress(OSError):
                    self.cache.release(st.lock)
                st.lock = None
        releasing, self._releasing = self._releasing, []
        for lock in releasing:
            self._release_now(lock)
        self._held.clear()
        self._waiting.clear()

    # -- called by the tier ----------------------------------------------------------------
    def enqueue(self, source: Source) -> None:
        """A QUEUED blob has parked background work: line it up for a lock."""
        st = source.tier
        assert st is not None
        if not st.queued:
            st.queued = True
            self._queue.append(source)

    def on_idle(self) -> None:
        """The dispatcher has idle background capacity: try the next queued blob's lock."""
        if self._queue and not self._promoting and self._nursery is not None:
            self._promoting = True
            self._nursery.start_soon(self._promote)

    def forget(self, source: Source) -> None:
        """The blob failed or settled: stop waiting for it and drop our lock on it."""
        self._waiting.pop(source.blob.blob_id, None)
        self.unlock(source)

    def unlock(self, source: Source) -> None:
        st = source.tier
        assert st is not None
        self._held.pop(source.blob.blob_id, None)
        lock, st.lock = st.lock, None
        if lock is None:
            return
        if self._nursery is not None:
            # A few metadata operations, but on a network filesystem: never on the event loop.
            # Until the thread ran, close() still releases it (shutdown cancels the task).
            self._releasing.append(lock)
            self._nursery.start_soon(self._release, lock)
        else:
            self._release_now(lock)

    async def _release(self, lock: HeldLock) -> None:
        await trio.to_thread.run_sync(self._release_now, lock)
        with contextlib.suppress(ValueError):
            self._releasing.remove(lock)

    def _release_now(self, lock: HeldLock) -> None:
        try:
            self.cache.release(lock)
        except OSError as e:
            log.warning("b10cache: cannot release %s: %s", lock.path, e)

    # -- tasks -------------------------------------------------------------------------------
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
                    or not source.parked_background()
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
                self.host.unpark(source)
                now: TierState = st.state
                if now is not TierState.WAITING:
                    break  # work for the dispatcher; the next promotion waits for idle capacity
        finally:
            self._promoting = False

    def _acquire(self, source: Source) -> tuple[str, Any]:
        """Blocking: the entry if it appeared, else our lock, else whom to wait for."""
        bid, size = source.blob.blob_id, source.blob.size
        decision = self._decision()
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
                    continue
                if outcome == "wait":
                    continue
                self._waiting.pop(bid, None)
                if outcome == "shared":
                    self._apply(source, "shared", payload)
                else:  # the holder gave up or died: compete for the lock again, first in line
                    st.state = TierState.QUEUED
                    if not st.queued and source.parked_background():
                        st.queued = True
                        self._queue.appendleft(source)
                    freed = True
                self.host.unpark(source)
            if freed:
                self.host.wake()

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
                if self.host.has_background_work(source):
                    st.idle_ticks = 0
                    continue
                st.idle_ticks += 1
                if st.idle_ticks >= _IDLE_TICKS:
                    log.debug("b10cache: no more work on %s; releasing its lock", lock.path)
                    self.unlock(source)
                    st.state = TierState.QUEUED

    def _refresh_all(self, locks: list[HeldLock]) -> list[bool]:
        return [self.cache.refresh(lock) for lock in locks]
