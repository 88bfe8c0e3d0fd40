"""Sequential-stream detection per inode: how far ahead of a reader to fetch.

The kernel's own readahead (``read_ahead_kb``, a few MiB at most: docs/mount.md) sizes FUSE
requests; it cannot know that a model file is about to be streamed end to end. This module
watches the reads of one inode and, when they are sequential, names the byte range the fetcher
should queue at READAHEAD priority, so a streaming reader finds its blocks already landed.

Why streams and not one cursor per handle: mmap page faults and threaded loaders interleave
reads of one file at several positions through one or many handles (anchors lesson 8;
ollama#10133, gcsfuse#2829). A :class:`StreamTable` keeps a few :class:`Stream` s keyed by the
offset each expects next; a read within ``backward_tolerance`` before or ``forward_tolerance``
after that offset continues the stream (kernel readahead and parallel mmap faults reorder
requests slightly), anything else starts a new stream and the least recently used one goes.

Window growth follows Mountpoint's shape (``prefetch.rs``): nothing is fetched ahead until a
stream has read ``trigger`` bytes in sequence, then ``initial`` bytes; the window doubles each
time the reader has consumed a whole window, up to ``maximum``. The lookahead is refilled when
less than half a window remains, so a streaming reader always has between half and one window
queued.

Why a byte trigger and not "two reads in a row": the kernel's own readahead turns one page
fault into a batch of consecutive FUSE reads, which looks sequential but is only the kernel
reading around one access. A stream must have read one ``initial`` window before one window is
fetched ahead, so a false positive never costs more than was actually read, and a loader that
reads one tensor (or one header) through mmap pays nothing extra; a reader that really streams
loses little, since the kernel keeps reading ahead meanwhile. A lone read of one tensor in the
middle of a shard therefore costs at most the kernel's read-around plus one ``initial`` window
(the lazy-load test asserts it on the origin's counters).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..units import MiB


@dataclass(frozen=True, slots=True)
class ReadaheadConfig:
    """Tuning of the detector; every default is justified in docs/mount.md."""

    # 8 MiB = 4 demand blocks: enough to keep 4 connections busy on a capped CDN while the
    # reader consumes the first one, small enough that a false positive costs ~0.3 s of one
    # 25 MB/s stream.
    initial: int = 8 * MiB
    # 256 MiB in flight per stream is ~10 ranged GETs of 16 MiB at a time (2.7 GB/s at 85 MB/s
    # each): beyond that the global connection budget, not the window, is the limit.
    maximum: int = 256 * MiB
    multiplier: int = 2
    # Mountpoint's tolerances: parallel faults and kernel readahead arrive slightly out of order.
    backward_tolerance: int = 1 * MiB
    forward_tolerance: int = 16 * MiB
    # Threads of one loader reading one shard, plus a few mmap fault streams.
    max_streams: int = 8
    # Sequential bytes a stream must show before anything is fetched ahead: one initial window,
    # so readahead never fetches more than the reader already consumed (module docstring).
    trigger: int = 8 * MiB

    @classmethod
    def for_budget(cls, connections: int, unit: int) -> ReadaheadConfig:
        """The reader is the prefetch: a stream's window may grow until it keeps every
        background connection busy with one ``unit``-sized run each (28 x 16 MiB = 448 MiB
        at the default 32 connections), and never below two units (one in flight, one
        queued)."""
        default = cls()
        return cls(maximum=max(2 * unit, connections * unit, default.initial))

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.multiplier < 1 or self.max_streams < 1:
            raise ValueError(f"inconsistent readahead configuration: {self}")


@dataclass(slots=True)
class Stream:
    """One sequential reader: where it will read next and how far ahead is already queued."""

    start: int
    next: int
    window: int
    queued_until: int
    grown_at: int | None  # where the window last grew; None until the stream triggers
    reads: int
    used: int  # table tick of the last read, for LRU replacement


class StreamTable:
    """The streams of one inode. Pure bookkeeping: never blocks, never fetches."""

    def __init__(self, config: ReadaheadConfig) -> None:
        self.config = config
        self.streams: list[Stream] = []
        self._tick = 0

    def _find(self, offset: int) -> Stream | None:
        """The stream a read at ``offset`` continues: one whose next offset is near, or whose
        span already covers it. The second case is the page-fault pattern of mmap loaders
        (safetensors ``load_file``, ``torch.load(mmap=True)``): the kernel reads around each
        fault, so a tensor arrives as a read near its end followed by reads that fill the
        megabytes behind it. Those are the same sequential stream, not new ones."""
        cfg = self.config
        best: Stream | None = None
        for s in self.streams:
            low = min(s.start, s.next - cfg.backward_tolerance)
            if low <= offset <= s.next + cfg.forward_tolerance and (
                best is None or abs(offset - s.next) < abs(offset - best.next)
            ):
                best = s
        return best

    def on_read(self, offset: int, size: int, file_size: int) -> tuple[int, int] | None:
        """Record a read; return the byte range ``[start, end)`` to queue ahead, if any."""
        cfg = self.config
        self._tick += 1
        end = min(offset + size, file_size)
        s = self._find(offset)
        if s is None:
            s = Stream(offset, end, cfg.initial, end, None, 1, self._tick)
            if len(self.streams) >= cfg.max_streams:
                self.streams.remove(min(self.streams, key=lambda x: x.used))
            self.streams.append(s)
        else:
            s.reads += 1
            s.used = self._tick
            s.start = min(s.start, offset)
            s.next = max(s.next, end)
        if s.next - s.start < cfg.trigger:
            return None
        if s.grown_at is None:
            s.grown_at = s.next
        elif s.next - s.grown_at >= s.window:
            s.window = min(cfg.maximum, s.window * cfg.multiplier)
            s.grown_at = s.next
        if s.queued_until - s.next >= s.window // 2:
            return None
        start = max(s.queued_until, s.next)
        stop = min(file_size, s.next + s.window)
        s.queued_until = max(s.queued_until, stop)
        if stop <= start:
            return None
        return start, stop
