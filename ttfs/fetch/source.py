"""What the fetcher and its shared-cache tier both know about a blob, and nothing more.

:class:`Source` is the fetcher's per-blob record; :class:`BlobTier` is the shared tier's part of
it; :class:`TierHost` is the narrow face the fetcher shows the tier (the tier never touches the
fetcher's queue itself: it asks the host to put a blob's parked entries back). Keeping these in
a module of their own is what lets ``scheduler`` and ``tiers`` import downwards only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio

from ..blocks import Blob
from ..blocks.identity import BlobKey
from ..blocks.shared import HeldLock, SharedFile
from ..manifest import Pointer

if TYPE_CHECKING:  # providers import httpx: a mount imports them only once it serves
    from ..providers import Provider

# A queue entry: (priority, sequence, blob id, block index).
Entry = tuple[int, int, str, int]


class TierState(enum.Enum):
    UNKNOWN = "unknown"
    LOOKING = "looking"
    SHARED = "shared"
    QUEUED = "queued"
    TRYING = "trying"
    WAITING = "waiting"
    ORIGIN = "origin"


@dataclass(slots=True)
class BlobTier:
    """The shared tier's view of one blob."""

    state: TierState = TierState.UNKNOWN
    entry: SharedFile | None = None
    lock: HeldLock | None = None
    bad: bool = False  # the entry failed a check: ignored for the rest of the process
    queued: bool = False
    settling: bool = False
    settled: trio.Event = field(default_factory=trio.Event)
    idle_ticks: int = 0
    # The entry's (dev, ino, size, mtime, ctime) when it was looked up, and whether a record
    # of a verification of exactly that entry stands in for the hash (the trust rule).
    identity: BlobKey | None = None
    trusted: bool = False
    # A replica's record of the entry (inode, size, mtime) matched it: nobody needs to write one.
    recorded: bool = False
    # The block checksums a trusting copy takes from that record instead of reading its
    # pieces back (None: read back).
    sums: tuple[int, ...] | None = None


@dataclass(slots=True)
class Source:
    """A blob as the fetcher sees it: where its bytes come from and its progress."""

    blob: Blob
    pointer: Pointer
    provider: Provider
    runs_inflight: int = 0
    # Queue entries held back (by the shared tier, or by the per-blob connection cap).
    deferred: list[Entry] = field(default_factory=list)
    verify_attempts: int = 0
    discards: int = 0
    # Replaced (and the old one set) whenever a block lands, the blob is discarded or finishes.
    changed: trio.Event = field(default_factory=trio.Event)
    failure: BaseException | None = None
    done: trio.Event = field(default_factory=trio.Event)
    origin_bytes: int = 0
    shared_bytes: int = 0  # bytes read from the shared cache (b10fs) tier
    tier: BlobTier | None = None  # the shared tier's state for this blob (None: tier off)
    following: bool = False  # its verification follower runs (started by the first request)

    def parked_background(self) -> bool:
        """Whether background (non-DEMAND) entries of this blob are held back."""
        return any(entry[0] != 0 for entry in self.deferred)


class TierHost(Protocol):
    """What the shared tier may ask of the fetcher."""

    def sources(self) -> list[Source]: ...

    def has_background_work(self, source: Source) -> bool: ...

    def unpark(self, source: Source) -> None:
        """Put the blob's parked queue entries back and wake the dispatcher."""
        ...

    def wake(self) -> None:
        """Wake the dispatcher (capacity or a tier state changed)."""
        ...
