"""The identity of a file's bytes: what the fast path and the b10fs trust rule compare.

A :class:`BlobKey` is ``(dev, ino, size, mtime_ns, ctime_ns)``: a write changes mtime and ctime,
a replacement the inode, a truncation the size, a chmod the ctime; ctime cannot be set back by
anyone but the kernel, so a file whose key equals a recorded one has not been changed since.
:attr:`BlobKey.content` leaves ctime out, for a comparison across one's own metadata change
(an atime touch changes ctime but no byte).
"""

from __future__ import annotations

import os
from dataclasses import astuple, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class BlobKey:
    """What identifies the exact bytes of a file: a change of any field means a change."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> BlobKey:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @classmethod
    def from_record(cls, record: object) -> BlobKey | None:
        """The key an index record holds (a tuple of the five fields), or None."""
        if isinstance(record, tuple | list) and len(record) == 5:
            return cls(*(int(v) for v in record))
        return None

    def record(self) -> tuple[int, ...]:
        """The five fields as a tuple, for the index."""
        return astuple(self)

    @property
    def content(self) -> tuple[int, int, int, int]:
        """Everything but ctime: the same file with the same bytes, metadata aside."""
        return self.dev, self.ino, self.size, self.mtime_ns


def key_of_path(path: Path | str) -> BlobKey | None:
    """The key of the file at ``path`` (symlinks followed), or None when it cannot be stat'ed."""
    try:
        return BlobKey.of(os.stat(path))
    except OSError:
        return None


def key_of_open(path: Path | str) -> BlobKey | None:
    """The key of the file at ``path`` as a fresh open sees it (on NFS an open revalidates the
    cached attributes, a ``stat`` may not), or None when it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return BlobKey.of(os.fstat(fd))
    except OSError:
        return None
    finally:
        os.close(fd)
