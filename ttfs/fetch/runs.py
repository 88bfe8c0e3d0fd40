"""Executing one run (a contiguous range of blocks of one blob) with retries.

The dispatcher (:mod:`.scheduler`) decides *which* blocks go together and when; this module gets
their bytes into the blob and says which blocks landed. Per attempt the bytes come from one of
three places:

* the **shared cache** (b10fs) entry, when the tier says so: ``pread`` in a thread, written by a
  :class:`~ttfs.blocks.RunWriter` on the event loop;
* a **worker process** (:mod:`ttfs.transfer`), when a pool runs and the provider can say where
  the bytes are (``wire_target``: a resolved URL plus headers): the worker GETs, ``pwrite``s and
  checksums; the coordinator only journals and marks each reported block (one record per block);
* the **provider in process** (httpx over trio): ``--workers 0``, a provider without wire targets
  (test fakes), and the first range of a URL whose redirect is not resolved yet (a Hugging Face
  ``resolve`` URL: that range follows the 302 and caches the CDN URL for every later range).

A broken body is retried from the first block that did not land (mid-block: the journal holds
the partial block), with jittered exponential backoff that honours ``Retry-After``, bounded by
attempts and by time. An expired signed URL (401/403 from a worker) is forgotten and resolved
again once, without costing an attempt.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..blocks import Blob
from ..config import Settings
from ..errors import AccessDenied, Redirected, TransientError
from ..telemetry.metrics import LatencyHistogram
from ..transfer.pool import OnBlock, OnPartial, WorkerPool
from ..transfer.target import WireProvider, WireTarget

if TYPE_CHECKING:
    from .source import Source
    from .tiers import SharedTier

log = logging.getLogger(__name__)

Landed = Callable[["Source", list[int]], None]


@dataclass(slots=True)
class Counters:
    """Bytes and requests by source, for statistics and the summary line."""

    origin_bytes: int = 0
    origin_requests: int = 0
    shared_bytes: int = 0
    shared_requests: int = 0
    worker_requests: int = 0
    retries: int = 0
    # The rest of what --metrics exports (ttfs/telemetry/metrics.py).
    local_bytes: int = 0  # present in the local store when a blob was first opened
    blobs_verified: int = 0
    blobs_failed: int = 0
    shared_trusted: int = 0  # blobs verified by the b10fs trust rule instead of a hash
    errors: Counter[str] = field(default_factory=Counter)  # failed attempts and checks, by kind
    demand_latency: LatencyHistogram = field(default_factory=LatencyHistogram)


class Progress:
    """How far a run got: its next block to land (blocks land in order)."""

    __slots__ = ("blob", "next_block")

    def __init__(self, blob: Blob, first: int) -> None:
        self.blob = blob
        self.next_block = first

    @property
    def pos(self) -> int:
        """First byte not on disk: the next block's start plus its partial prefix."""
        blob = self.blob
        return blob.block_range(self.next_block)[0] + blob.partial.get(self.next_block, 0)


class RunExecutor:
    """Fetches runs for one fetcher; ``landed`` is called for every block that lands."""

    def __init__(
        self,
        settings: Settings,
        counters: Counters,
        landed: Landed,
        tier: SharedTier | None,
        pool: WorkerPool | None,
    ) -> None:
        self.settings = settings
        self.counters = counters
        self.landed = landed
        self.tier = tier
        self.pool = pool

    async def fetch(self, source: Source, progress: Progress, last: int) -> None:
        """Land blocks ``progress.next_block..last``; retries transient errors.

        Raises:
            TtfsError: the run failed for good (a retry budget spent, or a permanent error).
            OSError: the block store could not be written in process.
        """
        policy = self.settings.retry
        attempt = 0
        resigned = False
        started = time.monotonic()
        blob = source.blob
        while progress.next_block <= last:
            end = blob.block_range(last)[1]
            start = progress.pos
            try:
                before = progress.next_block
                await self._attempt(source, progress, last)
                if progress.next_block <= before:
                    raise TransientError(f"{source.pointer.file_name}: range ended early")
            except (AccessDenied, Redirected) as e:
                provider = source.provider
                if resigned or self.pool is None or not isinstance(provider, WireProvider):
                    raise
                # A signed URL a worker used expired, or a URL guessed to be its own target
                # redirected: forget it and resolve again, once.
                resigned = True
                provider.forget_wire_target(source.pointer)
                what = "redirected" if isinstance(e, Redirected) else "refused"
                log.info("URL of %s %s; resolving again", source.pointer.file_name, what)
            except TransientError as e:
                self.counters.errors[e.kind] += 1
                attempt += 1
                elapsed = time.monotonic() - started
                if attempt >= policy.attempts or elapsed >= policy.deadline:
                    raise
                delay = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.5)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, policy.max_delay * 4))
                level = logging.INFO if attempt <= 2 else logging.WARNING
                log.log(
                    level,
                    "retrying %s bytes %d-%d in %.2fs (attempt %d): %s",
                    source.pointer.file_name,
                    start,
                    end - 1,
                    delay,
                    attempt,
                    e,
                )
                self.counters.retries += 1
                await trio.sleep(delay)

    async def _attempt(self, source: Source, progress: Progress, last: int) -> None:
        tier = self.tier
        shared = tier.shared_entry(source) if tier is not None else None
        if shared is not None and tier is not None:
            self.counters.shared_requests += 1
            await self._in_process(source, progress, last, from_shared=True)
            return
        provider = source.provider
        if self.pool is not None and isinstance(provider, WireProvider):
            target = await provider.wire_target(source.pointer)
            if target is not None:
                self.counters.origin_requests += 1
                self.counters.worker_requests += 1
                await self._on_worker(source, progress, last, target)
                return
            # Not resolved yet (a redirect to follow): one block in process resolves it and the
            # rest of the run goes to a worker on the next pass of fetch()'s loop, instead of a
            # whole 16 MiB run on the slow path (over HTTPS ~20 CPU-s per GB, docs/performance).
            last = min(last, progress.next_block)
        self.counters.origin_requests += 1
        await self._in_process(source, progress, last, from_shared=False)

    async def _in_process(
        self, source: Source, progress: Progress, last: int, *, from_shared: bool
    ) -> None:
        blob = source.blob
        writer = blob.writer(progress.next_block)
        start, end = writer.pos, blob.block_range(last)[1]
        counters = self.counters

        def sink(chunk: memoryview) -> None:
            if from_shared:
                source.shared_bytes += len(chunk)
                counters.shared_bytes += len(chunk)
            else:
                source.origin_bytes += len(chunk)
                counters.origin_bytes += len(chunk)
            landed = writer.write(chunk)
            progress.next_block = writer.next_block
            if landed:
                self.landed(source, landed)

        if from_shared:
            tier = self.tier
            entry = tier.shared_entry(source) if tier is not None else None
            assert tier is not None and entry is not None

            def copied(n: int, done: list[tuple[int, int]]) -> None:
                # A kernel copy from the shared cache completed these blocks: land them here,
                # on the event loop, which owns presence.
                for index, digest in done:
                    blob.land(index, digest)
                source.shared_bytes += n
                counters.shared_bytes += n
                progress.next_block = writer.next_block
                if done:
                    self.landed(source, [index for index, _ in done])

            await tier.copy_range(source, entry, writer, end, copied)
        else:
            await source.provider.read_range(source.pointer, start, end, sink)

    async def _on_worker(
        self, source: Source, progress: Progress, last: int, target: WireTarget
    ) -> None:
        blob = source.blob
        counters = self.counters

        def on_block(index: int, digest: int, new: int) -> None:
            source.origin_bytes += new
            counters.origin_bytes += new
            start, end = blob.block_range(index)
            blob.journal(index, end - start, digest)
            blob.land(index, digest)
            progress.next_block = index + 1
            self.landed(source, [index])

        def on_partial(index: int, valid: int, digest: int, new: int) -> None:
            source.origin_bytes += new
            counters.origin_bytes += new
            if blob.present[index]:
                return
            blob.journal(index, valid, digest)
            blob.partial[index] = valid

        assert self.pool is not None
        # The lease keeps the data file open (and created) while the worker writes into it, and
        # lets on_block append journal records; the worker opens the file by path, and the
        # inode proves it is this blob's file.
        with blob.lease() as fd:
            await self._worker_job(source, progress, last, target, fd, on_block, on_partial)

    async def _worker_job(
        self,
        source: Source,
        progress: Progress,
        last: int,
        target: WireTarget,
        fd: int,
        on_block: OnBlock,
        on_partial: OnPartial,
    ) -> None:
        blob = source.blob
        first = progress.next_block
        assert self.pool is not None
        await self.pool.run(
            {
                "path": str(blob.path),
                "ino": os.fstat(fd).st_ino,
                "url": target.url,
                "headers": target.headers,
                "start": progress.pos,
                "end": blob.block_range(last)[1],
                "block": first,
                "prefix": blob.partial.get(first, 0),
                "block_size": blob.block_size,
                "size": blob.size,
                "name": source.pointer.file_name,
            },
            on_block,
            on_partial,
        )
