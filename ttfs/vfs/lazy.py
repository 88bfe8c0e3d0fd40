"""Answer the reads the gate holds (``--lazy-links``): fetch the range, then let the kernel read.

The gate (:mod:`ttfs.vfs.gate`) hands over one event per ``read()`` or ``mmap()`` of a file in
the view. This is the daemon's side: find the blob by the file's identity, feed the readahead
and the access trace as the daemon's read handler does, wait until the range's blocks are
local, answer. Anything else than "the bytes are there" fails the read with EIO: a file of the
view the mount does not serve (a blob replaced after a failed verification, whose old inode a
reader still holds), or a fetch that failed after the fetcher's retries. Never "allow" without
the bytes: the kernel would read the zeros of a sparse file.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

import trio

from ..blocks.identity import BlobKey
from ..errors import TtfsError
from ..fetch import Fetcher, Priority, Source
from ..procs import nofile_share
from .gate import Event, Gate
from .readahead import ReadaheadConfig, StreamTable
from .trace import Recorder

log = logging.getLogger(__name__)

_BULK_BLOCKS = 4
"""A held range of more blocks than this is fetched as a bulk request, not as demand.

An ``mmap()`` is held until the whole mapped range is local (the kernel asks once, for the whole
range): a ``load_file`` of a 1 GiB shard is one held range of 512 blocks. As demand, those
would go one 2 MiB request each and pause the prefetch of every other shard until the last one
landed, so the loader of the next shard found nothing fetched. As a bulk request they queue
at readahead priority in arrival order behind the streams' readahead (the queue orders
readahead without a reader position first come first served), coalesce into 16 MiB runs on the
background connections (the prefetch runs in flight elsewhere are preempted, as for the first
demand of a burst), and leave the rest of the budget to the prefetch; several loaders
mapping different shards at once get them whole one after the other, so the first can copy
its tensors while the next shard arrives, instead of all of them waiting for the last byte.
"""

MAX_HELD = 4096
"""Held reads taken from the gate at once, at most (see :func:`held_budget`)."""


def held_budget() -> int:
    """How many held reads the daemon takes from the gate at once: a quarter of the soft
    ``RLIMIT_NOFILE`` (every held read holds a descriptor until it is answered; the blob
    descriptors, sockets, the index and the FUSE device need the rest), at most
    :data:`MAX_HELD`. More readers than that wait in the kernel, in order, until one is
    answered: under ``ulimit -n 1024``, 1,200 readers at once otherwise got EPERM (the
    kernel denies a read it cannot open a descriptor for) or EIO (a blob that could not be
    opened)."""
    return nofile_share(MAX_HELD)


class LazyReads:
    """The held reads of one mount, answered from its fetcher."""

    def __init__(
        self,
        gate: Gate,
        fetcher: Fetcher,
        readahead: ReadaheadConfig,
        recorder: Recorder | None,
        rechecking: Callable[[str], trio.Event | None],
    ) -> None:
        self._gate = gate
        self._fetcher = fetcher
        self._readahead = readahead
        self._recorder = recorder
        self._rechecking = rechecking
        self._by_file: dict[tuple[int, int], Source] = {}  # (dev, ino) of a served blob file
        self._streams: dict[str, StreamTable] = {}  # per blob: one file, one set of streams
        self._settled: set[str] = set()  # blobs whose reads are no longer held
        self._budget = held_budget()
        self._room = trio.Event()  # set when one is answered
        self.reads = 0  # held reads let go (the status shows it)
        self.waiting = 0  # taken from the gate, not answered yet (the status shows it too)

    def target(self, blob_path: Path | str) -> str:
        return self._gate.target(blob_path)

    def admit(self, source: Source, key: BlobKey) -> None:
        """Reads of the file ``key`` names are reads of ``source`` (a link now points at it)."""
        self._by_file[(key.dev, key.ino)] = source

    async def forget(self, source: Source) -> None:
        """The fetcher's discard listener: the blob's file was replaced after a failed
        verification, so a reader still holding the old one must get EIO, never its bytes
        (the new file is admitted by the next lookup of a name, which links it)."""
        for key in [k for k, s in self._by_file.items() if s is source]:
            del self._by_file[key]
        self._settled.discard(source.blob.blob_id)  # the new file is held until final again
        self._streams.pop(source.blob.blob_id, None)

    def settle(self, source: Source) -> None:
        """``source``'s blob is final (verified, or whole with nothing to verify): reads of its
        file need no answer any more."""
        try:
            with source.blob.lease() as fd:
                self._gate.settle(fd)
        except (OSError, TtfsError) as e:  # every read then still asks, answered at once
            log.warning("lazy links: %s", e)

    async def run(self) -> None:
        """Answer held reads until cancelled; the ones still held then fail with EIO."""
        async with trio.open_nursery() as nursery:
            while True:
                room = self._budget - self.waiting
                if room <= 0:  # the rest wait in the kernel until one is answered
                    self._room = trio.Event()
                    await self._room.wait()
                    continue
                await trio.lowlevel.wait_readable(self._gate.fd)
                try:
                    events = self._gate.events(room)
                except OSError as e:  # e.g. ENOMEM; the events stay queued for the next try
                    log.warning("lazy links: reading held reads: %s", e)
                    await trio.sleep(0.01)
                    continue
                self.waiting += len(events)
                for event in events:
                    nursery.start_soon(self._answer, event)

    async def _answer(self, event: Event) -> None:
        err = errno.EIO
        try:
            err = await self._fill(event)
        except TtfsError as e:
            log.warning("read of %d bytes at %d failed: %s", event.length, event.offset, e)
        except OSError as e:
            log.warning("cannot answer a held read: %s", e)
        finally:
            try:
                self._gate.answer(event, err)
            except OSError as e:  # the reader is gone (its read was interrupted): nothing waits
                log.debug("answering a held read: %s", e)
            self.waiting -= 1
            self._room.set()

    async def _fill(self, event: Event) -> int:
        """0 once the held range is local; an errno when it never will be."""
        st = os.fstat(event.fd)
        key = (st.st_dev, st.st_ino)
        source = self._by_file.get(key)
        if source is None:  # not served, or replaced after a failed verification (forget)
            log.warning("read of a file this mount does not serve (inode %d): EIO", st.st_ino)
            return errno.EIO
        blob = source.blob
        checking = self._rechecking(blob.blob_id)
        if checking is not None:
            await checking.wait()
        end = min(event.offset + event.length, blob.size)
        if end <= event.offset:
            return 0
        blocks = blob.blocks_for(event.offset, end - event.offset)
        if self._recorder is not None:
            self._recorder.on_read(blob.blob_id, blocks)
        if not blob.complete:
            streams = self._streams.get(blob.blob_id)
            if streams is None:
                streams = self._streams[blob.blob_id] = StreamTable(self._readahead)
            ahead = streams.on_read(event.offset, end - event.offset, blob.size)
            if ahead is not None:
                self._fetcher.request_nowait(
                    source,
                    blob.blocks_for(ahead[0], ahead[1] - ahead[0]),
                    Priority.READAHEAD,
                    reader_at=event.offset // blob.block_size,
                )
            if blob.missing(blocks):
                # A read's few blocks are demand; a whole mapping (or a huge read) is a bulk
                # request, first come first served behind the readers' streams (see
                # _BULK_BLOCKS): fetched in 16 MiB runs without holding prefetch back.
                bulk = len(blocks) > _BULK_BLOCKS
                if bulk:
                    self._fetcher.queue.preempt(source, blocks.start)
                prio = Priority.READAHEAD if bulk else Priority.DEMAND
                await self._fetcher.ensure(source, blocks, prio)
                if key not in self._by_file:  # discarded while we waited: the reader's file
                    return errno.EIO  # holds the bytes that failed verification
        else:
            self._streams.pop(blob.blob_id, None)
            if source.done.is_set() and blob.blob_id not in self._settled:
                # Whole and final though not verified here (--no-verify, a hash that cannot
                # be checked locally): nothing left to wait for.
                self._settled.add(blob.blob_id)
                self.settle(source)
        self.reads += 1
        return 0
