"""The shared-cache (b10fs) tier of the fetcher: which ranges come from where.

Lookup order for a block: page cache → local block store → shared cache → origin. The first two
are the block store's business; this module decides, per blob, between the last two. Bytes from
the shared cache go through the same scheduler, single-flight, :class:`~ttfs.blocks.RunWriter`
and follower hash as origin bytes: a run of a blob whose entry is usable simply reads its range
with ``pread`` in a worker thread instead of asking the provider, several runs in parallel, so a
shared entry is read in parallel ranges, never as one sequential stream (anchors lesson 18).

Per blob (:class:`~ttfs.fetch.source.TierState`)::

    UNKNOWN --request--> LOOKING --entry right-sized--> SHARED  (runs read the entry)
                           |--reads off--> ORIGIN
                           '--no entry--> QUEUED  (then ttfs.fetch.replicas: lock or wait)

While a blob is LOOKING, every request for it waits (one ``stat``). While it is QUEUED, TRYING
or WAITING, DEMAND runs go to the origin at once (a blocked reader never waits for another
replica) and background runs are parked; :class:`~ttfs.fetch.replicas.ReplicaLocks` decides who
fetches it for everyone.

When a blob is complete and verified, it is published (copied, never moved) if this process may
write, and its lock is released. A shared entry that fails the blob's hash is reported, moved
aside and replaced: the fetcher's "discard and fetch once more" then goes to the origin.

The tier sees the fetcher only through :class:`~ttfs.fetch.source.TierHost`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from ..blocks import Blob, BlockStore, Checker, RunWriter, checker_for
from ..blocks.identity import key_of_open
from ..blocks.shared import RECORDED_FROM, Decision, SharedCache, SharedFile
from ..config import SharedCacheConfig
from ..errors import CacheError, TransientError
from ..manifest import Pointer
from .links import Verdict, check_entry, remember
from .replicas import ReplicaLocks
from .source import BlobTier, Source, TierHost, TierState

log = logging.getLogger(__name__)

# Shared-entry copies: one worker-thread hop per 8 MiB piece (kernel copy + one read back for
# the block checksums); a preempted run waits for at most one piece.
_COPY_PIECE = 8 * 1024 * 1024
# Worker threads reading entries at once (a network filesystem is latency-bound: several reads
# in flight); their own limiter, so they never starve the hashing threads.
_READERS = 16


class SharedTier:
    """Owns the shared cache for one fetcher. Created by the fetcher when
    ``settings.shared_cache`` is set; :meth:`prepare` runs the upstream decision."""

    def __init__(self, host: TierHost, config: SharedCacheConfig) -> None:
        self.host = host
        self.config = config
        self.cache = SharedCache(config)
        self.decision: Decision | None = None
        self.corrupt_entries = 0
        self.replicas = ReplicaLocks(host, self.cache, config, lambda: self.decision)
        self._prepare_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._readers = trio.CapacityLimiter(_READERS)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.replicas.start(nursery)

    def close(self) -> None:
        """Release every lock we hold and close every entry (blocking; at shutdown)."""
        self.replicas.close()
        for source in self.host.sources():
            if source.tier is not None:
                self._close_entry(source.tier)

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
        pointers = [s.pointer for s in self.host.sources()]
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
        if state is TierState.QUEUED:
            self.replicas.enqueue(source)
        return False

    def on_idle(self) -> None:
        """The dispatcher has idle background capacity: try the next queued blob's lock."""
        self.replicas.on_idle()

    def shared_entry(self, source: Source) -> SharedFile | None:
        """The entry a run of ``source`` reads from, or None for the origin."""
        st = source.tier
        if st is None or st.state is not TierState.SHARED or st.bad:
            return None
        return st.entry

    async def copy_range(
        self,
        source: Source,
        entry: SharedFile,
        writer: RunWriter,
        end: int,
        landed: Callable[[int, list[tuple[int, int]]], None],
    ) -> None:
        """Copy ``[writer.pos, end)`` of the shared entry into the blob, in the kernel.

        ``copy_file_range`` in a worker thread, one 8 MiB piece per hop (reflink, NFS
        server-side copy or page-to-page: no byte passes through Python), then the piece is
        read back once for its block checksums, unless a trusted record brought them;
        ``landed(bytes, blocks)`` runs on the event loop after each piece. The follower still
        hashes the blob against the manifest before anything uses it, unless the trust rule
        stands in: a poisoned entry never reaches a reader.

        Raises:
            TransientError: the entry cannot be read or got shorter; it is then ignored for the
                rest of the process, so the scheduler's retry goes to the origin.
            CacheError: writing the local blob failed (CacheFull when the disk is full).
        """
        # One descriptor per run, not per blob: the entries of a big manifest do not fit the
        # open-file limit at once (ttfs/blocks/descriptors.py has the same reason).
        try:
            fd = await trio.to_thread.run_sync(
                self.cache.open_for_read, entry, limiter=self._readers
            )
        except OSError as e:
            self._drop(source, f"cannot open it: {e}")
            raise TransientError(f"b10cache entry {entry.path}: {e}", kind="shared_cache") from e
        st = source.tier
        sums = st.sums if st is not None and self.trusted(source) else None
        try:
            while writer.pos < end:
                n = min(_COPY_PIECE, end - writer.pos)
                try:
                    done = await trio.to_thread.run_sync(
                        writer.copy_from, fd, n, sums, limiter=self._readers
                    )
                except EOFError as e:
                    self._drop(source, "it is shorter than expected")
                    raise TransientError(
                        f"b10cache entry {entry.path} is shorter than expected",
                        kind="shared_cache",
                    ) from e
                except CacheError:
                    raise
                except OSError as e:
                    self._drop(source, f"read failed: {e}")
                    raise TransientError(
                        f"b10cache read of {entry.path} failed: {e}", kind="shared_cache"
                    ) from e
                landed(n, done)
        finally:
            os.close(fd)

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
        self.replicas.forget(source)
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
        aside = await trio.to_thread.run_sync(self.cache.mark_corrupt, entry)
        self._corrupt(entry.path, source.blob.spec.checker, source.pointer.file_name, aside)
        return True

    def _corrupt(self, path: Path, checker: Checker, file_name: str, aside: Path | None) -> None:
        """Count and report an entry that failed its hash (and was moved aside, if ``aside``)."""
        self.corrupt_entries += 1
        log.warning(
            "b10cache entry %s does not match %s %s: not using it, moving it aside and "
            "fetching %s from the origin",
            path,
            checker.algorithm,
            checker.expected,
            file_name,
        )
        if aside is not None:
            log.warning("b10cache: corrupt entry moved to %s", aside)

    async def link_target(
        self, pointer: Pointer, store: BlockStore, *, verify: bool
    ) -> Path | None:
        """The entry a resolve may make ``pointer``'s output a symlink to
        (``TTFS_SHARED_HOTSTART=symlink``; :mod:`ttfs.fetch.links`), or None: fetch it as usual
        (no entry, reads off, written while checked, or corrupt: then moved aside)."""
        if not (await self._decision()).read:
            return None
        check = await trio.to_thread.run_sync(
            functools.partial(
                check_entry, self.cache, self.config.trust, store, pointer, verify=verify
            ),
            limiter=self._readers,
        )
        if check.verdict is Verdict.CORRUPT:
            checker = checker_for(pointer.hashtype, pointer.hash)
            self._corrupt(check.path, checker, pointer.file_name, check.aside)
            return None
        if check.verdict is Verdict.MISSING:
            return None
        if check.hashed:
            log.info("b10cache entry %s hashed and recorded before linking", check.path)
        return check.path

    def trusted(self, source: Source) -> bool:
        """Whether the blob is being copied from an entry this store verified before, with the
        identity it had then (the follower may skip the hash if :meth:`confirm_trust` agrees
        at the end)."""
        st = source.tier
        return st is not None and st.trusted and not st.bad and st.state is TierState.SHARED

    def borrowed_sums(self, source: Source) -> bool:
        """Whether the copy took its block checksums from a replica's record rather than from
        the bytes it wrote (they describe the entry as recorded, not necessarily the blob)."""
        st = source.tier  # bad or not: the checksums the copy already landed are borrowed
        return st is not None and st.trusted and st.sums is not None

    def on_changed(self, source: Source) -> None:
        """A trusted entry changed while it was copied, with borrowed block checksums: the
        blob's bytes and checksums cannot be relied on. Ignore the entry from now on; the
        fetcher discards the blob and fetches it from the origin."""
        if source.tier is not None:
            self._drop(source, "it changed while it was copied")

    async def confirm_trust(self, source: Source) -> bool:
        """At the end of a trusted copy: every byte came from the entry in this attempt and the
        entry still has the recorded identity (so nothing wrote it while it was copied)."""
        st = source.tier
        if not (self.trusted(source) and st is not None and st.entry is not None):
            return False
        if not _all_from_entry(source):
            return False
        now = await trio.to_thread.run_sync(key_of_open, st.entry.path)
        return now is not None and now == st.identity

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
                entry = await trio.to_thread.run_sync(self._open, source)
                if entry is not None:
                    st.entry = entry
                    st.state = TierState.SHARED
                    log.debug("b10cache hit: %s%s", entry.path, " (trusted)" if st.trusted else "")
                else:
                    st.state = TierState.QUEUED
            else:
                st.state = TierState.ORIGIN
        except BaseException:
            st.state = TierState.ORIGIN
            raise
        finally:
            self.host.unpark(source)

    async def _settle(self, source: Source) -> None:
        st = source.tier
        assert st is not None
        try:
            decision = await self._decision()
            blob = source.blob
            if decision.write and blob.complete:  # also replaces a corrupt or short entry
                result, identity = await trio.to_thread.run_sync(
                    self.cache.publish_identified, blob.path, blob.blob_id, blob.size
                )
                log.debug("b10cache publish of %s: %s", source.pointer.file_name, result)
                if identity is not None and blob.verified:  # our verified bytes, as written
                    await trio.to_thread.run_sync(
                        remember, self.cache, blob.store, blob.blob_id, identity, blob.sums
                    )
            elif st.entry is not None and not st.bad:
                await trio.to_thread.run_sync(self.cache.touch, st.entry.path)
            if self._copied_whole(source):
                await trio.to_thread.run_sync(self._record, source)
        finally:
            self.replicas.unlock(source)
            self._close_entry(st)
            st.settled.set()

    # -- helpers -------------------------------------------------------------------------------
    def _open(self, source: Source) -> SharedFile | None:
        """Open the blob's entry (blocking) and apply the trust rule to it: sets ``tier``'s
        ``identity``, ``trusted``, ``recorded`` and ``sums``.

        The entry's identity is read before the open's atime touch (which changes its ctime)
        and compared with the one this store recorded after its own touch last time, and with
        the record a replica wrote beside it (inode, size, mtime); it is read again after the
        touch and kept in ``tier.identity`` for the end of the copy. A write between the two
        reads (mtime) denies trust.
        """
        st = source.tier
        assert st is not None
        blob = source.blob
        if st.entry is not None:
            return st.entry
        before = key_of_open(self.cache.path(blob.blob_id))
        entry = self.cache.open_entry(blob.blob_id, blob.size)
        if entry is None:
            return None
        st.identity = key_of_open(entry.path)
        st.trusted, st.recorded, st.sums = False, False, None
        if before is None or st.identity is None or st.identity.content != before.content:
            return entry
        record = self.cache.read_record(blob.blob_id) if _has_records(blob) else None
        st.recorded = record is not None and record.matches(before)
        trust = self.config.trust
        if trust == "off":
            return entry
        if trust == "replicas" and record is not None and st.recorded:
            st.trusted = True
            st.sums = record.sums_for(blob.block_size, blob.n_blocks)
        else:  # the store's own record, read only when the replicas' does not decide
            st.trusted = blob.store.key_record("shared", blob.blob_id) == before
        return entry

    @staticmethod
    def _copied_whole(source: Source) -> bool:
        """The verified blob is, byte for byte, a copy of its entry made in this attempt."""
        st = source.tier
        return (
            st is not None
            and st.entry is not None
            and st.identity is not None
            and not st.bad
            and source.blob.verified
            and _all_from_entry(source)
        )

    def _record(self, source: Source) -> None:
        """Record the entry's identity as verified (blocking; after our own atime touch), in
        this block store and, unless a matching one is there, beside the entry for the other
        replicas.

        Only if dev, inode, size and mtime are still those it had before the copy: a write
        since the lookup (the bytes we hashed may no longer be the entry's) leaves no record.
        The store's record takes ctime after the touch, which changes it; any later write,
        touch or replacement by anyone changes it again, and this store's next hot start
        hashes unless the replicas' record (no ctime) still matches and is trusted.
        """
        st = source.tier
        assert st is not None and st.entry is not None and st.identity is not None
        blob = source.blob
        now = key_of_open(st.entry.path)
        if now is None or now.content != st.identity.content:
            return
        remember(self.cache, blob.store, blob.blob_id, now, blob.sums, beside=not st.recorded)

    @staticmethod
    def _close_entry(st: BlobTier) -> None:
        st.entry = None  # entries hold no descriptor (SharedFile); runs open their own

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


def _has_records(blob: Blob) -> bool:
    return blob.size >= RECORDED_FROM


def _all_from_entry(source: Source) -> bool:
    """Every byte of the blob was copied from its shared entry in this attempt (none from the
    origin, nothing discarded): what both recording and using the trust rule require."""
    return (
        source.shared_bytes == source.blob.size and not source.origin_bytes and not source.discards
    )
