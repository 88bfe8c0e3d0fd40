"""A blob's verification hash, fed in order by whoever already holds the bytes.

Why: a shared-cache (b10fs) hot start copies each piece of an entry into the local blob in the
kernel and reads it back once for its block checksum. The verification follower then read the
whole blob a second time for the manifest hash (sha256 of a page-cache-hot file: about a third
of a hot start's CPU on the 2-core VM). With this, the copy threads hand each piece they read
back to the blob's :class:`OrderedHash`; pieces at the hash's position are hashed at once,
pieces ahead of it wait (up to a byte budget) until the gap before them is filled, and the
follower reads from disk only what nobody handed in (pieces over budget, origin bytes written by
worker processes). The hash covers exactly the bytes of the data file either way: a piece is
what a read of the file returned after it was written, and blocks are not rewritten while one
verification attempt lasts (a mismatch discards the blob and the next attempt starts a new
hash).

Thread safety: one lock; a copy thread may wait for it while the follower reads and hashes one
chunk (milliseconds).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ..errors import CacheError

_READ_CHUNK = 8 * 1024 * 1024
AHEAD_BUDGET = 64 * 1024 * 1024  # pieces kept for later, per blob (a hot start's memory)


class OrderedHash:
    """``hasher`` over ``[0, size)`` of a blob, advanced by offers and by the follower."""

    def __init__(self, hasher: Any, budget: int | None = None) -> None:
        self.hasher = hasher
        self.pos = 0
        self.budget = AHEAD_BUDGET if budget is None else budget
        self.inline_bytes = 0  # hashed from pieces handed in
        self.read_bytes = 0  # hashed from the follower's own reads
        self._ahead: dict[int, bytes] = {}
        self._ahead_bytes = 0
        self._lock = threading.Lock()

    def offer(self, offset: int, data: bytes) -> None:
        """A piece of the data file at ``offset``, as just read back (blocking: may hash)."""
        with self._lock:
            if offset > self.pos:
                if self._ahead_bytes + len(data) <= self.budget and offset not in self._ahead:
                    self._ahead[offset] = data
                    self._ahead_bytes += len(data)
                return
            self._take(offset, data)
            self._drain()

    def advance(self, stop: int, fd: int) -> None:
        """Hash up to byte ``stop``, reading from ``fd`` what was not handed in (blocking).

        Raises:
            CacheError: the data file could not be read or is shorter than ``stop``.
        """
        with self._lock:
            self._drain()
            buf: memoryview | None = None
            while self.pos < stop:
                upto = min([stop, *(o for o in self._ahead if o > self.pos)])
                if buf is None:
                    buf = memoryview(bytearray(min(_READ_CHUNK, max(upto - self.pos, 1))))
                n = min(len(buf), upto - self.pos)
                try:
                    got = os.preadv(fd, [buf[:n]], self.pos)
                except OSError as e:
                    raise CacheError(f"cannot read a blob to verify it: {e}") from e
                if not got:
                    raise CacheError("a blob is shorter than expected")
                self.hasher.update(buf[:got])
                self.pos += got
                self.read_bytes += got
                self._drain()
            for offset in [o for o in self._ahead if o < self.pos]:
                self._ahead_bytes -= len(self._ahead.pop(offset))

    def hexdigest(self) -> str:
        return str(self.hasher.hexdigest())

    def _take(self, offset: int, data: bytes) -> None:
        skip = self.pos - offset
        if skip >= len(data):
            return
        self.hasher.update(memoryview(data)[skip:])
        self.inline_bytes += len(data) - skip
        self.pos = offset + len(data)

    def _drain(self) -> None:
        while self._ahead:
            ready = [o for o in self._ahead if o <= self.pos]
            if not ready:
                return
            for offset in sorted(ready):
                data = self._ahead.pop(offset)
                self._ahead_bytes -= len(data)
                self._take(offset, data)
