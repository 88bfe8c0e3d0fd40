"""A bounded LRU of the block store's open file descriptors.

A mount opens every blob of its manifest at start (status must know what is local), and a
manifest may name 10^5 files: holding a data descriptor (plus a journal descriptor) per blob
dies on ``EMFILE`` long before that (1,024 is the default soft limit of a systemd service).
Blobs therefore hold no descriptor of their own; they *lease* one from this table for each
access (a ``pread``, one chunk's ``pwrite`` + journal record, a hash pass in a worker thread).
A descriptor nobody leases is closed when the table is over its limit, least recently used
first, and reopened by the next lease. A leased descriptor is never closed under its user, so
the table may run over its limit by the number of accesses in flight (bounded by the fetcher's
connections and the worker threads).

Closing costs nothing durable: the data is in the page cache either way. Reopening checks that
the path still names the same inode; if the data file was deleted or replaced behind the
store's back, the blob's presence is dropped (its bytes are gone or unknown) and the access
fails with a CacheError, so stale bytes are never served.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from ..errors import CacheError, CacheFull
from ..procs import nofile_share
from . import perms

log = logging.getLogger(__name__)

# Descriptors kept open at most (data + journal). A few hundred cover every blob a loader and
# the fetcher's connections touch at once; reopening costs one open(2) + fstat(2).
MAX_OPEN = 256


class Blob(Protocol):
    """What the table needs of a blob (``ttfs.blocks.store.Blob``; a protocol keeps the import
    pointing one way). The underscored fields belong to the table, under its lock."""

    path: Path
    _fd: int | None
    _journal_fd: int | None
    _leases: int
    _ino: tuple[int, int] | None

    @property
    def size(self) -> int: ...

    def forget_blocks(self) -> None: ...


def default_limit() -> int:
    """:data:`MAX_OPEN`, or a quarter of the soft ``RLIMIT_NOFILE`` when that is lower (sockets,
    the index's SQLite connections and the FUSE device need the rest)."""
    return nofile_share(MAX_OPEN)


class DescriptorTable:
    """The open data and journal descriptors of one store's blobs, at most ``limit`` idle ones.

    Thread-safe: the event loop leases for ``pread``/``pwrite``, worker threads for hashing,
    checking and persisting.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit if limit is not None else default_limit()
        self._lock = threading.Lock()
        self._lru: OrderedDict[Blob, None] = OrderedDict()
        self.open_count = 0  # descriptors open now (data + journal)
        # Descriptors of replaced data files still leased when replaced (see replace_data).
        self._retired: list[tuple[Blob, int]] = []
        self.opens = 0  # data descriptors opened, reopens included (tests, status)

    def acquire(self, blob: Blob) -> int:
        """Lease the blob's data descriptor (opening, and creating, the file if needed).

        Raises:
            CacheError: the data file cannot be opened, or vanished while the blob was open.
        """
        with self._lock:
            if blob._fd is None:
                self._open_data(blob)
            blob._leases += 1
            self._lru[blob] = None
            self._lru.move_to_end(blob)
            if self.open_count > self.limit:
                self._trim()
            assert blob._fd is not None
            return blob._fd

    def release(self, blob: Blob) -> None:
        with self._lock:
            blob._leases -= 1
            if self._retired and blob._leases == 0:
                self._close_retired(blob)
            if blob._leases == 0 and blob not in self._lru:
                self._close(blob)  # forgotten while this lease was out: close it now
            elif self.open_count > self.limit:
                self._trim()

    @contextlib.contextmanager
    def lease(self, blob: Blob) -> Iterator[int]:
        fd = self.acquire(blob)
        try:
            yield fd
        finally:
            self.release(blob)

    def journal(self, blob: Blob) -> int:
        """The blob's journal descriptor (append-only); call with a data lease held, so the
        table cannot close it under the caller.

        Raises:
            OSError: the journal cannot be opened (ENOSPC is the caller's to classify).
        """
        with self._lock:
            if blob._journal_fd is None:
                blob._journal_fd = perms.open_private(
                    f"{blob.path}.journal", os.O_WRONLY | os.O_APPEND | os.O_CREAT
                )
                self.open_count += 1
            return blob._journal_fd

    def replace_data(self, blob: Blob) -> None:
        """Give ``blob`` a fresh sparse data file renamed over its path, and no journal
        (blocking; a discard after a failed verification).

        Never ``ftruncate`` in place: a reader of the old inode (a lease in another thread, a
        hard link, a copy in progress) keeps the bytes it had. A descriptor of the old file
        that is leased right now is closed when its last lease ends, never under its user.
        """
        path = blob.path
        tmp = path.with_name(f"{path.name}.new-{os.getpid()}")
        with self._lock:
            fd = perms.open_private(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            try:
                os.ftruncate(fd, blob.size)
                os.replace(tmp, path)
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            for name in ("_fd", "_journal_fd"):
                old = getattr(blob, name)
                if old is None:
                    continue
                setattr(blob, name, None)
                if blob._leases:
                    self._retired.append((blob, old))  # closed by the last release
                else:
                    self.open_count -= 1
                    with contextlib.suppress(OSError):
                        os.close(old)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}.journal")
            blob._fd = fd
            blob._ino = (st.st_dev, st.st_ino)
            self.open_count += 1
            self.opens += 1
            self._lru[blob] = None

    def forget(self, blob: Blob) -> None:
        """Close the blob's descriptors for good (its last reference is gone); a lease still
        out (a flush persisting it from another thread) closes them when it ends."""
        with self._lock:
            self._lru.pop(blob, None)
            if blob._leases == 0:
                self._close(blob)

    def _close_retired(self, blob: Blob | None) -> None:
        keep = []
        for owner, fd in self._retired:
            if blob is None or owner is blob:
                self.open_count -= 1
                with contextlib.suppress(OSError):
                    os.close(fd)
            else:
                keep.append((owner, fd))
        self._retired = keep

    def close_all(self) -> None:
        with self._lock:
            self._close_retired(None)
            for blob in list(self._lru):
                self._close(blob)
            self._lru.clear()

    # -- under the lock ---------------------------------------------------------------------
    def _open_data(self, blob: Blob) -> None:
        path = blob.path
        first = blob._ino is None
        try:
            if first:
                try:
                    fd = perms.open_private(path, os.O_RDWR | os.O_CREAT)
                except FileNotFoundError:  # its fan-out directory does not exist yet
                    perms.mkdir_private(path.parent)
                    fd = perms.open_private(path, os.O_RDWR | os.O_CREAT)
            else:
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    self._vanished(blob, "was deleted")
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFull(f"no space left for cache file {path}: {e}") from e
            raise CacheError(f"cannot open cache file {path}: {e}") from e
        try:
            st = os.fstat(fd)
            if first:
                if st.st_size != blob.size:
                    # New (or a wrong-sized leftover): the sparse file of the blob's size.
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, blob.size)
            elif (st.st_dev, st.st_ino) != blob._ino:
                os.close(fd)
                self._vanished(blob, "was replaced")
        except OSError as e:
            os.close(fd)
            raise CacheError(f"cannot open cache file {path}: {e}") from e
        blob._ino = (st.st_dev, st.st_ino)
        blob._fd = fd
        self.open_count += 1
        self.opens += 1

    def _vanished(self, blob: Blob, how: str) -> None:
        """The data file changed behind the store: what the blob knew about it is void."""
        log.warning(
            "cache file %s %s while in use; its blocks will be fetched again", blob.path, how
        )
        blob.forget_blocks()
        blob._ino = None  # the next lease creates a fresh sparse file
        raise CacheError(f"cache file {blob.path} {how} while in use")

    def _trim(self) -> None:
        for blob in list(self._lru):
            if self.open_count <= self.limit:
                return
            if blob._leases == 0:
                del self._lru[blob]
                self._close(blob)

    def _close(self, blob: Blob) -> None:
        for name in ("_fd", "_journal_fd"):
            fd = getattr(blob, name)
            if fd is not None:
                setattr(blob, name, None)
                self.open_count -= 1
                with contextlib.suppress(OSError):
                    os.close(fd)
