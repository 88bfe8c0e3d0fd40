"""The local block store: one sparse data file per blob plus a crash-safe presence index.

A *blob* is the content behind one manifest hash; two file names with the same hash share it.
Its bytes live in ``<cache>/blobs/<h[:2]>/<h>``, a sparse file ``ftruncate``d to the blob size,
so a complete blob already is a normal file that ``resolve`` can hard-link and b10fs can copy.
The *index* (diskcache: process- and crash-safe SQLite) holds, per blob, which fixed-size blocks
are present, an xxh3-64 checksum per block, whether the whole blob was verified against the
manifest hash, and the last access time for LRU eviction. Only this package imports diskcache.

Crash safety rests on checksums, not on syncing every write (docs/architecture.md)::

    pwrite(chunk) -> journal record (block, bytes valid, xxh3 of that prefix)   every chunk
                  -> presence + checksums persisted in the index                 every flush
    complete blob -> hashed against the manifest -> "verified" persisted with the boot id

The *journal* (``<data>.journal``, 16 bytes per 256 KiB chunk, appended without fsync) is what
makes a killed process lose almost nothing: the kernel keeps both the data and the journal, and
the next open replays it, re-checking every record against the data file (a blob of one block
keeps none: it is refetched whole). Even a partly
received block resumes where it stopped. After a power loss the page cache is gone: journal
records, index bits and data may disagree, so every present block of an unverified blob is
checksummed when the blob is opened and a block that does not match is dropped. A "verified"
flag is trusted only in the boot that wrote it, unless the data was fdatasync'd first (done
once the kernel has had :data:`SYNC_AFTER` seconds to write it back, at release or by a later
flush of any process of the same boot): after a reboot an unsynced blob is checked again. Where
the boot cannot be identified the flag is trusted only by the process that wrote it (and
release syncs at once). Syncing is thus kept off the hot path.
If a verified blob's data file changes (size or mtime) it is no longer trusted.

A complete blob whose hash cannot be checked here (a multipart S3 etag, Azure, ``--no-verify``)
is *intact* once every block was written or checked by this store: it is then trusted by its
data file's size and mtime under the same rules, so it is not re-read at every open.

Blobs hold no file descriptor of their own: each access leases one from the store's
:class:`~ttfs.blocks.descriptors.DescriptorTable`, a bounded LRU, so a manifest of any size
fits under ``RLIMIT_NOFILE``. A blob whose data file does not exist yet costs no descriptor and
no inode: the sparse file is created by its first write. Modes come from :mod:`.perms`.

Everything here is synchronous and may block on disk: the fetch layer calls the slow parts
(``open_blob``, ``flush``, ``verify``, ``check_blocks``, ``discard``, ``pread``) through
``trio.to_thread``. Only ``pread_cached`` (``RWF_NOWAIT``: page cache or nothing) and
``RunWriter.write`` (page cache writes) run on the event loop thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import sqlite3
import struct
import threading
import time
import uuid
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import diskcache
import xxhash

from ..errors import CacheError, CacheFull
from . import perms
from .descriptors import DescriptorTable
from .hashing import Checker
from .identity import BlobKey

log = logging.getLogger(__name__)

INDEX_VERSION = 1
_HASH_CHUNK = 1024 * 1024
# Piece size of the buffered fallback of kernel_copy (a worker thread's buffer).
_READ_CHUNK = 8 * 1024 * 1024
# preadv flag: fail instead of waiting for the device (Linux >= 4.14); 0 where missing.
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
# Journal record: block index, bytes of the block written so far, xxh3-64 of those bytes.
_JOURNAL = struct.Struct("<IIQ")
# Index records beside the blobs' own: file identities (:meth:`BlockStore.key_record`) and
# resolve outputs.
KeyKind = Literal["link", "shared"]
_SIDE_RECORDS = ("out:", "link:", "shared:")


@dataclass(frozen=True, slots=True)
class BlobSpec:
    """What the manifest says about a blob: its id (the manifest hash), size and hash check."""

    blob_id: str
    size: int
    checker: Checker


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    blobs: int
    bytes_present: int
    open_blobs: int


# copy_file_range refuses these file pairs on some kernels and filesystems (cross-filesystem
# before Linux 5.19, FUSE, some network filesystems): copy through a worker thread's buffer.
_NO_KERNEL_COPY = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}
)


def kernel_copy(src: int, dst: int, offset: int, length: int) -> None:
    """Copy ``[offset, offset+length)`` of ``src`` to the same offsets of ``dst`` (blocking).

    ``copy_file_range``: the bytes never enter Python; the kernel reflinks (btrfs, XFS),
    asks the server to copy (NFS 4.2) or copies page to page. Where it is refused, ``pread`` /
    ``pwrite`` in 8 MiB pieces (still in the calling worker thread).

    Raises:
        EOFError: ``src`` ended before ``offset+length``.
        OSError: reading or writing failed.
    """
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src, dst, length - done, offset + done, offset + done)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            break
        if n == 0:
            raise EOFError(f"source ended at {offset + done}")
        done += n
    while done < length:
        data = os.pread(src, min(_READ_CHUNK, length - done), offset + done)
        if not data:
            raise EOFError(f"source ended at {offset + done}")
        os.pwrite(dst, data, offset + done)
        done += len(data)


def block_sum(data: bytes | memoryview) -> int:
    """A block's checksum, as the journal, the index and the verification records keep it."""
    return xxhash.xxh3_64_intdigest(data)


def _boot_id(path: str = "/proc/sys/kernel/random/boot_id") -> str:
    """This boot's id; where it cannot be read, an id of this process alone.

    A flag "trusted in this boot" must never outlive the boot it means: with a fixed fallback
    ("unknown") every later boot would match it. A per-process id errs the safe way: the next
    process checks the blob again.
    """
    try:
        with open(path) as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return boot or f"process-{uuid.uuid4()}"


BOOT_ID = _boot_id()

SYNC_AFTER = 30.0
"""Seconds after its last write at which a complete blob is fdatasync'd (its trust then
survives a reboot): by then the kernel's own writeback (``dirty_expire_centisecs``, 30 s by
default) has most likely written it, so the sync is a cache flush, not a wait for every dirty
page of the file. At the end of a resolve that wait was the last ~2 s of a 1 GiB download on
the development VM (docs/performance.md). Until then its trust is bound to this boot."""


_SYNCS_PER_FLUSH = 64


def _sync_due(blob: Blob, now: float) -> bool:
    """Whether a complete, unsynced blob is to be fdatasync'd now.

    Where the boot cannot be identified a boot-bound flag binds this process only, so it is
    synced at once, as before the deferral."""
    if not blob.complete or blob._synced:
        return False
    return BOOT_ID.startswith("process-") or now - blob._written_at >= SYNC_AFTER


class Blob:
    """An open blob: its sparse data file and the in-memory presence map.

    ``present`` is the truth for readers in this process; the index lags by at most one flush
    interval and the journal covers the gap. ``partial`` maps a block to the bytes of it already
    written (a run that broke, or a process that was killed), so the next run resumes mid-block.
    """

    def __init__(
        self,
        store: BlockStore,
        spec: BlobSpec,
        path: Path,
        block_size: int,
    ) -> None:
        self.store = store
        self.spec = spec
        self.path = path
        self.block_size = block_size
        self.n_blocks = max(1, -(-spec.size // block_size)) if spec.size else 0
        self.present = bytearray(self.n_blocks)
        self.sums = array("Q", bytes(8 * self.n_blocks))
        self.partial: dict[int, int] = {}
        self.verified = False
        self.n_present = 0
        self.atime = time.time()
        self._dirty = False
        self._synced = False
        # Wall-clock time of the last write known to this process (the data file's mtime when
        # loaded, then each landed block): when an fdatasync is due (SYNC_AFTER).
        self._written_at = 0.0
        self.refs = 0
        # Owned by the store's DescriptorTable (under its lock): the descriptors while open,
        # the leases on them, and the data file's (st_dev, st_ino) once it exists.
        self._fd: int | None = None
        self._journal_fd: int | None = None
        self._leases = 0
        self._ino: tuple[int, int] | None = None

    def lease(self) -> contextlib.AbstractContextManager[int]:
        """``with blob.lease() as fd:`` the data descriptor, open for the block's duration.

        Raises:
            CacheError: the data file cannot be opened, or vanished while the blob was open.
        """
        return self.store.fds.lease(self)

    # -- block arithmetic (pure) -------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def blob_id(self) -> str:
        return self.spec.blob_id

    def block_range(self, index: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of block ``index``."""
        start = index * self.block_size
        return start, min(start + self.block_size, self.size)

    def blocks_for(self, offset: int, length: int) -> range:
        """Indices of the blocks covering ``[offset, offset+length)`` clipped to the blob."""
        end = min(offset + length, self.size)
        if end <= offset:
            return range(0)
        return range(offset // self.block_size, (end - 1) // self.block_size + 1)

    @property
    def complete(self) -> bool:
        return self.n_present == self.n_blocks

    @property
    def bytes_present(self) -> int:
        if self.complete:
            return self.size
        full = self.n_present * self.block_size
        if self.n_blocks and self.present[self.n_blocks - 1]:
            full -= self.n_blocks * self.block_size - self.size
        return full

    def missing(self, blocks: range) -> list[int]:
        return [i for i in blocks if not self.present[i]]

    # -- data path ---------------------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        """Read bytes the caller knows are present (blocking: may wait on the device).

        Raises:
            CacheError: the data file vanished (its presence is dropped: fetch again).
        """
        self.atime = time.time()
        fds = self.store.fds
        fd = fds.acquire(self)
        try:
            return os.pread(fd, length, offset)
        finally:
            fds.release(self)

    def pread_cached(self, offset: int, length: int) -> bytearray | None:
        """The bytes if the page cache holds all of them, else None; never waits on the device.

        ``preadv(RWF_NOWAIT)`` fails with EAGAIN (or reads short) instead of starting I/O, so
        the event loop can serve cached bytes itself and send only the rest to a thread.
        Measured on the 2-core VM, 128 KiB page-cache-hot reads: ~11 us CPU against ~8 us for
        a plain ``pread`` (the difference is zero-filling the buffer), far below one FUSE
        round trip. Where the kernel or filesystem lacks RWF_NOWAIT this returns None.

        Raises:
            CacheError: the data file vanished (its presence is dropped: fetch again).
        """
        if not _NOWAIT:
            return None
        buf = bytearray(length)
        try:
            with self.lease() as fd:
                got = os.preadv(fd, [buf], offset, _NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return None
            raise CacheError(f"cannot read {self.path}: {e}") from e
        if got != length:
            return None
        self.atime = time.time()
        return buf

    def writer(self, first_block: int) -> RunWriter:
        return RunWriter(self, first_block)

    def land(self, index: int, checksum: int) -> None:
        """Mark a fully written block present (in memory now; persisted at the next flush)."""
        if not self.present[index]:
            self.present[index] = 1
            self.n_present += 1
        self.sums[index] = checksum
        self.partial.pop(index, None)
        self._dirty = True
        self._written_at = time.time()

    def journal(self, index: int, length: int, digest: int) -> None:
        """Append one journal record: ``length`` bytes of block ``index`` hash to ``digest``.

        Call with a data lease held (``RunWriter.write`` does), so the journal descriptor
        stays open.

        A blob of one block keeps no journal: a crash before its index entry is written costs
        a refetch of at most one block, while a journal file per small file (create, append,
        unlink) cost a fifth of the daemon's CPU on a manifest of 10^4 small files.
        """
        if self.n_blocks == 1:
            return
        os.write(self.store.fds.journal(self), _JOURNAL.pack(index, length, digest))

    def forget_blocks(self) -> None:
        """Drop every block from the presence map (in memory; persisted at the next flush)."""
        self.present[:] = bytes(len(self.present))
        self.n_present = 0
        self.verified = False
        self.partial.clear()
        self._dirty = True

    def discard(self) -> None:
        """Forget every block (a failed verification; blocking).

        The data file is *replaced* by a fresh sparse one renamed into place, never truncated in
        place: anyone still reading the old inode (a ``pread`` racing this, a copy in progress)
        keeps the bytes it had instead of seeing them turn to zeros
        (:meth:`~ttfs.blocks.descriptors.DescriptorTable.replace_data`).
        """
        self.forget_blocks()
        try:
            self.store.fds.replace_data(self)
        except OSError as e:
            raise CacheError(f"cannot reset {self.path}: {e}") from e

    # -- slow paths (call from a worker thread) ------------------------------------------------
    def verify(self) -> bool:
        """Hash the whole blob against the manifest; True when it matches.

        Raises:
            CacheError: the data file could not be read.
        """
        checker = self.spec.checker
        if not checker.checkable:
            return False
        h = checker.new(self.size)
        if self.n_blocks:
            try:
                self.hash_blocks(h, 0, self.n_blocks)
            except CacheError:
                if self.stat_key()[0] < self.size:
                    return False  # truncated behind our back: not a match, not an I/O error
                raise
        ok = h.hexdigest() == checker.expected
        if ok:
            self.verified = True
            self._dirty = True
        return ok

    def hash_blocks(self, hasher: Any, first: int, end: int, *, mapped: bool = False) -> None:
        """Feed blocks ``[first, end)`` to ``hasher`` (blocking; the fetcher calls it in order).

        ``mapped``: hash through a read-only mapping instead of ``preadv`` into a buffer. The
        copy out of the page cache cost 0.1-0.15 CPU-s per GB on the 2-core VM (by the time the
        follower hashes a block it is out of the CPU caches; docs/performance.md). The price is
        that a truncation of the file *during* the hash faults (SIGBUS) instead of raising, so
        only the follower asks for it: it hashes a blob while it downloads, before anything
        links to the file, and ttfs never truncates a data file in place (a discard renames a
        fresh file over it; the mapping keeps the old inode). :meth:`verify` may hash a blob
        that a resolve output hard-links to, which its user may truncate: it reads.

        Raises:
            CacheError: the data file could not be read (or is shorter than the blocks).
        """
        offset, stop = self.block_range(first)[0], self.block_range(end - 1)[1]
        if stop <= offset:
            return
        try:
            with self.lease() as fd:
                if mapped:
                    if os.fstat(fd).st_size < stop:
                        raise CacheError(f"{self.path} is shorter than expected")
                    base = offset - offset % mmap.ALLOCATIONGRANULARITY
                    with (
                        mmap.mmap(fd, stop - base, prot=mmap.PROT_READ, offset=base) as mapping,
                        memoryview(mapping) as view,
                        view[offset - base :] as part,
                    ):
                        hasher.update(part)
                    return
                # One reused buffer: a fresh 8 MiB bytes per read cost page faults on every
                # call (~0.1 CPU-s per GB on the 2-core VM); hashlib reads the view, no copy.
                buf = memoryview(bytearray(min(_HASH_CHUNK, stop - offset)))
                while offset < stop:
                    n = os.preadv(fd, [buf[: min(len(buf), stop - offset)]], offset)
                    if not n:
                        raise CacheError(f"{self.path} is shorter than expected")
                    hasher.update(buf[:n])
                    offset += n
        except OSError as e:
            raise CacheError(f"cannot read {self.path}: {e}") from e

    def check_blocks(self) -> list[int]:
        """Re-read every present block and drop those whose checksum differs; returns them."""
        bad = []
        with self.lease() as fd:
            for i in range(self.n_blocks):
                if not self.present[i]:
                    continue
                start, end = self.block_range(i)
                try:
                    data = os.pread(fd, end - start, start)
                except OSError:
                    data = b""
                if len(data) != end - start or block_sum(data) != self.sums[i]:
                    bad.append(i)
                    self.present[i] = 0
                    self.n_present -= 1
                    self.verified = False
        if bad:
            self._dirty = True
            log.warning("blob %s: %d corrupt block(s) dropped: %s", self.blob_id, len(bad), bad[:8])
        return bad

    def stat_key(self) -> tuple[int, int]:
        """(size, mtime_ns) of the data file: what a trusted flag is bound to."""
        with self.lease() as fd:
            st = os.fstat(fd)
        return st.st_size, st.st_mtime_ns

    def replay_journal(self) -> None:
        """Recover blocks (and partial blocks) written after the last index write.

        Every record is checked against the data file, so a torn or stale journal can only
        cost a refetch. The last record of a block wins.
        """
        try:
            with open(f"{self.path}.journal", "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        last: dict[int, tuple[int, int]] = {}
        for off in range(0, len(raw) - _JOURNAL.size + 1, _JOURNAL.size):
            index, length, digest = _JOURNAL.unpack_from(raw, off)
            if index < self.n_blocks:
                last[index] = (length, digest)
        recovered = 0
        for index, (length, digest) in last.items():
            if self.present[index]:
                continue
            start, end = self.block_range(index)
            if not 0 < length <= end - start:
                continue
            with self.lease() as fd:
                data = os.pread(fd, length, start)
            if len(data) != length or block_sum(data) != digest:
                continue
            if length == end - start:
                self.land(index, digest)
            else:
                self.partial[index] = length
            recovered += length
        if recovered:
            self._dirty = True
            log.info("blob %s: recovered %d bytes from the journal", self.blob_id, recovered)

    def _record(self) -> dict[str, Any]:
        complete = self.complete
        return {
            "v": INDEX_VERSION,
            "size": self.size,
            "block_size": self.block_size,
            "present": bytes(self.present),
            "sums": self.sums.tobytes(),
            "verified": self.verified and complete,
            # Every block was written or checked by us: trusted by stat like "verified".
            "intact": complete,
            "stat": self.stat_key() if complete else None,
            # None once the data is known to be on disk; else the boot it is trusted in.
            "boot": None if self._synced else BOOT_ID,
            "atime": self.atime,
        }


class RunWriter:
    """Streams one contiguous run of blocks into a blob, checksumming each block as it lands.

    Bytes arrive in order (one HTTP body). ``write`` returns the blocks completed by this chunk
    so the scheduler can wake their waiters, and journals every chunk so that progress survives
    a killed process. A run starts where its first block's ``partial`` progress ends: the prefix
    already on disk is re-read once to seed the block's checksum.
    """

    def __init__(self, blob: Blob, first_block: int) -> None:
        self.blob = blob
        self.block = first_block
        start, self._block_end = blob.block_range(first_block)
        self._hasher = xxhash.xxh3_64()
        done = blob.partial.get(first_block, 0)
        if done:
            # Runs start on the event loop: a prefix the page cache lost is fetched again (at
            # most one block) rather than read from the device here.
            if _NOWAIT:
                prefix: bytes | bytearray | None = blob.pread_cached(start, done)
            else:
                with blob.lease() as fd:
                    prefix = os.pread(fd, done, start)
            if prefix is not None and len(prefix) == done:
                self._hasher.update(prefix)
            else:
                done = 0
        self.pos = start + done

    @property
    def next_block(self) -> int:
        return self.block

    def copy_from(
        self, fd: int, length: int, sums: Sequence[int] | None = None
    ) -> list[tuple[int, int]]:
        """Copy the next ``length`` bytes from ``fd`` (same offsets) in the kernel (blocking).

        For a source that holds the blob's bytes at the blob's offsets (a shared-cache entry):
        :func:`kernel_copy` moves them, then each piece is read back from the page cache once
        for its block checksum and journalled, as :meth:`write` does. ``sums``: the blocks'
        checksums, known from a trusted record of the source: nothing is read back (on a
        reflinking filesystem nothing then touches the data at all), and a block is journalled
        when it is whole (a crash mid-block re-copies it). Returns the blocks it completed as
        ``(index, checksum)``; the caller lands them on its own thread (presence is the event
        loop's state). Call from one worker thread at a time per writer.

        Raises:
            EOFError: ``fd`` ended early.
            CacheFull: the cache disk is full.
            OSError: reading ``fd`` or writing the data file failed.
        """
        blob = self.blob
        done: list[tuple[int, int]] = []
        end = self.pos + length
        while self.pos < end:
            take = min(end, self._block_end) - self.pos
            if take <= 0:
                raise CacheError(f"blob {blob.blob_id}: copy past the end of the run")
            fds = blob.store.fds
            dst = fds.acquire(blob)  # a lease: the descriptors stay open while we use them
            if sums is not None:
                try:
                    self._copy_known(fd, dst, take, sums, done)
                finally:
                    fds.release(blob)
                continue
            try:
                try:
                    kernel_copy(fd, dst, self.pos, take)
                    data = os.pread(dst, take, self.pos)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise CacheFull(f"no space left for cache {blob.store.root}: {e}") from e
                    raise
                if len(data) != take:
                    raise CacheError(f"{blob.path}: short read back after a copy")
                self._hasher.update(data)
                self.pos += take
                digest = self._hasher.intdigest()
                written_in_block = self.pos - self.block * blob.block_size
                blob.journal(self.block, written_in_block, digest)
            finally:
                fds.release(blob)
            if self.pos < self._block_end:
                blob.partial[self.block] = written_in_block
            else:
                done.append((self.block, digest))
                self.block += 1
                self._hasher = xxhash.xxh3_64()
                if self.block < blob.n_blocks:
                    self._block_end = blob.block_range(self.block)[1]
        return done

    def _copy_known(
        self, fd: int, dst: int, take: int, sums: Sequence[int], done: list[tuple[int, int]]
    ) -> None:
        """One piece of :meth:`copy_from` whose block checksums are known (no read back)."""
        blob = self.blob
        try:
            kernel_copy(fd, dst, self.pos, take)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFull(f"no space left for cache {blob.store.root}: {e}") from e
            raise
        self.pos += take
        written_in_block = self.pos - self.block * blob.block_size
        if self.pos < self._block_end:
            blob.partial[self.block] = written_in_block
            return
        digest = sums[self.block]
        blob.journal(self.block, written_in_block, digest)
        done.append((self.block, digest))
        self.block += 1
        self._hasher = xxhash.xxh3_64()
        if self.block < blob.n_blocks:
            self._block_end = blob.block_range(self.block)[1]

    def write(self, data: bytes | memoryview) -> list[int]:
        blob = self.blob
        fds = blob.store.fds
        fd = fds.acquire(blob)
        try:
            return self._write(fd, memoryview(data))
        finally:
            fds.release(blob)

    def _write(self, fd: int, view: memoryview) -> list[int]:
        done: list[int] = []
        blob = self.blob
        while view:
            take = min(len(view), self._block_end - self.pos)
            if take <= 0:
                raise CacheError(f"blob {blob.blob_id}: write past the end of the run")
            piece = view[:take]
            try:
                written = os.pwrite(fd, piece, self.pos)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CacheFull(f"no space left for cache {blob.store.root}: {e}") from e
                raise CacheError(f"cannot write {blob.path}: {e}") from e
            if written != take:  # pwrite on a regular file is short only on ENOSPC
                raise CacheFull(
                    f"no space left for cache {blob.store.root}: short write to {blob.path} "
                    f"({written} of {take} bytes)"
                )
            self._hasher.update(piece)
            self.pos += take
            view = view[take:]
            digest = self._hasher.intdigest()
            written_in_block = self.pos - self.block * blob.block_size
            try:
                blob.journal(self.block, written_in_block, digest)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CacheFull(f"no space left for cache {blob.store.root}: {e}") from e
                raise CacheError(f"cannot write journal of {blob.path}: {e}") from e
            if self.pos < self._block_end:
                blob.partial[self.block] = written_in_block
            else:
                blob.land(self.block, digest)
                done.append(self.block)
                self.block += 1
                self._hasher = xxhash.xxh3_64()
                if self.block < blob.n_blocks:
                    self._block_end = blob.block_range(self.block)[1]
        return done


class BlockStore:
    """All blobs under one cache directory. Thread-safe for the calls documented as blocking."""

    def __init__(
        self,
        root: Path,
        *,
        block_size: int,
        max_bytes: int | None = None,
        max_descriptors: int | None = None,
    ) -> None:
        self.root = root
        self.block_size = block_size
        self.max_bytes = max_bytes
        try:
            perms.make_private_dir(root)
            for sub in ("blobs", "index"):
                perms.mkdir_private(root / sub)
                perms.private_dir(root / sub)  # also one an older ttfs created 0755
            # eviction_policy none: diskcache must never drop our index entries on its own.
            self._index = diskcache.Cache(
                str(root / "index"), eviction_policy="none", size_limit=2**62, statistics=False
            )
            for f in (root / "index").iterdir():  # SQLite creates its files with the umask
                if f.is_file() and f.stat().st_mode & 0o077:
                    f.chmod(perms.FILE_MODE)
        except OSError as e:
            raise CacheError(f"cannot use cache directory {root}: {e}") from e
        self.fds = DescriptorTable(max_descriptors)
        self._open: dict[str, Blob] = {}
        self._loading: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.last_usage = 0  # bytes the cache held after the last eviction pass

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._open.clear()
        self.fds.close_all()
        self._index.close()

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def data_path(self, blob_id: str) -> Path:
        return self.root / "blobs" / blob_id[:2] / blob_id

    # -- open -----------------------------------------------------------------------------
    def open_blob(self, spec: BlobSpec) -> Blob:
        """Open (creating if needed) the blob; blocking: may check block checksums.

        Opens of different blobs run in parallel (the slow part, checking a partial blob's
        blocks, holds no store-wide lock); concurrent opens of one blob share one load.

        Raises:
            CacheError: the data file cannot be created or opened.
        """
        while True:
            with self._lock:
                blob = self._open.get(spec.blob_id)
                if blob is not None:
                    if blob.size != spec.size:
                        raise CacheError(
                            f"hash {spec.blob_id} is used with two sizes "
                            f"({blob.size} and {spec.size})"
                        )
                    blob.refs += 1
                    return blob
                loading = self._loading.get(spec.blob_id)
                if loading is None:
                    mine = self._loading[spec.blob_id] = threading.Event()
            if loading is not None:
                loading.wait()  # another thread loads it: then take a reference (or retry)
                continue
            try:
                blob = self._load(spec)
                with self._lock:
                    blob.refs += 1
                    self._open[spec.blob_id] = blob
                return blob
            finally:
                with self._lock:
                    self._loading.pop(spec.blob_id, None)
                mine.set()

    def _load(self, spec: BlobSpec) -> Blob:
        path = self.data_path(spec.blob_id)
        blob = Blob(self, spec, path, self.block_size)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if spec.size == 0:
                with blob.lease():  # an empty blob is complete: its (empty) file must exist
                    pass
            return blob  # nothing local: the sparse file is created by the first write
        except OSError as e:
            raise CacheError(f"cannot open cache file {path}: {e}") from e
        blob._ino = (st.st_dev, st.st_ino)  # a later lease must find this very file
        blob._written_at = st.st_mtime
        try:
            record = self._index.get(spec.blob_id)
            usable = (
                isinstance(record, dict)
                and record.get("v") == INDEX_VERSION
                and record.get("size") == spec.size
                and record.get("block_size") == self.block_size
                and len(record.get("present", b"")) == blob.n_blocks
                and st.st_size == spec.size  # else truncated or replaced behind our back
            )
            if not usable and record is not None:
                log.info("blob %s: index entry unusable, starting empty", spec.blob_id)
            if not usable and st.st_size != spec.size:
                # Bytes of a same-sized file are kept (the journal may vouch for them); a
                # wrong-sized one is dropped and created afresh by the first write.
                self._unlink_files(path)
                blob._ino = None
                if spec.size == 0:
                    with blob.lease():
                        pass
                return blob
            trusted = False
            if usable:
                assert isinstance(record, dict)
                blob.present[:] = record["present"]
                blob.n_present = sum(blob.present)
                blob.sums = array("Q")
                blob.sums.frombytes(record["sums"])
                trusted = (
                    blob.complete
                    and bool(record.get("verified") or record.get("intact"))
                    and tuple(record.get("stat") or ()) == (st.st_size, st.st_mtime_ns)
                    and record.get("boot") in (None, BOOT_ID)
                )
            if trusted:
                assert isinstance(record, dict)
                blob.verified = bool(record.get("verified"))
                blob._synced = record.get("boot") is None
            else:
                if blob.n_present:
                    blob.check_blocks()
                blob.replay_journal()
                # Complete now and every block checked: trusted by stat from here on.
                blob._dirty = blob._dirty or blob.complete
            if blob._dirty:
                self._persist(blob)
                if not blob.partial:
                    self._reset_journal(blob)
            return blob
        except BaseException:
            self.fds.forget(blob)
            raise

    def release(self, blob: Blob) -> None:
        """Drop one reference; the last one persists and closes the data file."""
        with self._lock:
            blob.refs -= 1
            if blob.refs > 0:
                return
            self._open.pop(blob.blob_id, None)
        if blob.n_present == 0 and not blob.partial and blob.size:
            self._forget(blob)  # nothing fetched (e.g. a 404): leave no sparse file behind
            return
        indexed = False
        try:
            # A complete blob is synced once its data has had time to reach the disk anyway
            # (SYNC_AFTER; here or by the flusher of a later process in this boot), so its
            # trust survives a reboot without a wait on the dirty pages of a fresh download.
            sync = _sync_due(blob, time.time())
            indexed = not (blob._dirty or sync) or self._persist(blob, sync=sync)
        except CacheError as e:  # the data file vanished meanwhile: nothing left to keep
            log.warning("blob %s: %s", blob.blob_id, e)
        finally:
            self.fds.forget(blob)
        if indexed and not blob.partial:
            self._reset_journal(blob)  # everything it vouched for is in the index now

    def _forget(self, blob: Blob) -> None:
        self.fds.forget(blob)
        self._unlink_files(blob.path)
        with contextlib.suppress(sqlite3.Error, OSError, diskcache.Timeout):
            self._index.delete(blob.blob_id)

    @staticmethod
    def _unlink_files(path: Path) -> None:
        """Remove a blob's data file and its journal (either may be missing)."""
        for p in (path, Path(f"{path}.journal")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    # -- persistence ------------------------------------------------------------------------
    def flush(self) -> None:
        """Persist the presence map of every open blob that changed (no fsync: see module doc),
        and fdatasync the complete blobs whose last write is :data:`SYNC_AFTER` old.

        The journal is kept while the blob is open, because the event loop may append to it
        while this runs in a worker thread; it is reset when the blob is opened or released.
        """
        now = time.time()
        with self._lock:
            blobs = [b for b in self._open.values() if b._dirty or (b.complete and not b._synced)]
        syncs = 0
        for blob in blobs:
            try:
                # A bounded number per pass: 10^5 small blobs must not hold the flusher (and
                # the presence maps of the others) for minutes of disk flushes.
                sync = syncs < _SYNCS_PER_FLUSH and _sync_due(blob, now)
                syncs += sync
                if blob._dirty or sync:
                    self._persist(blob, sync=sync)
            except CacheError as e:  # its data file vanished: the next access says so
                log.warning("blob %s: %s", blob.blob_id, e)

    def _persist(self, blob: Blob, *, sync: bool = False) -> bool:
        """Write the blob's index entry (after fdatasync when ``sync``); False if it failed.

        Raises:
            CacheError: the data file vanished (the blob's presence is dropped).
        """
        if sync:
            try:
                with blob.lease() as fd:
                    os.fdatasync(fd)
            except OSError as e:
                log.warning("fdatasync %s failed: %s", blob.path, e)
                return False
            blob._synced = True
        blob._dirty = False
        # On failure the entry stays dirty: a later flush retries, a crash re-reads the journal.
        ok = self._index_set(blob.blob_id, blob._record())
        blob._dirty = blob._dirty or not ok
        return ok

    @staticmethod
    def _reset_journal(blob: Blob) -> None:
        """Remove the journal of a blob whose index entry covers it (no descriptor is open on it:
        called while loading, before any write, and after release). Removed, not truncated: a
        cache of 10^5 blobs must not keep 10^5 empty files."""
        assert blob._journal_fd is None
        try:
            os.unlink(f"{blob.path}.journal")
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove the journal of %s: %s", blob.path, e)

    def _index_set(self, key: str, value: object) -> bool:
        """Write one index entry; a full or failing disk is logged, never raised.

        Losing an index write costs a refetch or a re-hash later, never wrong data, so it must
        not replace the error the caller is already handling (typically the same full disk).
        """
        try:
            self._index.set(key, value)
        except (sqlite3.Error, OSError, diskcache.Timeout) as e:
            log.warning("cannot update the cache index in %s: %s", self.root, e)
            return False
        return True

    def mark_verified(self, blob: Blob) -> None:
        """Persist a whole-blob verification (blocking; trusted in this boot until synced)."""
        self._persist(blob)

    def forget_verification(self, blob: Blob) -> None:
        """The data file changed after verification: trust it no more (blocking)."""
        blob.verified = False
        blob._synced = False
        self._persist(blob)

    def key_record(self, kind: KeyKind, blob_id: str) -> BlobKey | None:
        """The file identity recorded for ``blob_id`` under ``kind``, or None (blocking).

        ``"link"``: the data file's key when a mount last served it as a link (the fast path).
        The size+mtime check of a verified blob misses a write that restores mtime; ctime and
        the inode number cannot be restored, so the next mount checks those too.
        ``"shared"``: the key of the shared-cache entry this store last copied the blob from
        and verified (or found unchanged since); a later hot start from an entry with this very
        key needs no hash (docs/b10fs.md, "The trust rule").
        """
        return BlobKey.from_record(self._index.get(f"{kind}:{blob_id}"))

    def record_key(self, kind: KeyKind, blob_id: str, key: BlobKey) -> None:
        """Remember ``key`` for ``blob_id`` under ``kind`` (:meth:`key_record`; blocking)."""
        self._index_set(f"{kind}:{blob_id}", key.record())

    # -- bookkeeping --------------------------------------------------------------------------
    def known(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for key in list(self._index.iterkeys()):
            if isinstance(key, str) and not key.startswith(_SIDE_RECORDS):
                record = self._index.get(key)
                if isinstance(record, dict):
                    yield key, record

    def is_verified(self, blob_id: str, size: int) -> bool:
        """Whether the index says a complete, verified blob with this size is on disk."""
        record = self._index.get(blob_id)
        if not (isinstance(record, dict) and record.get("verified") and record.get("size") == size):
            return False
        if record.get("boot") not in (None, BOOT_ID):
            return False
        try:
            st = os.stat(self.data_path(blob_id))
        except OSError:
            return False
        return tuple(record.get("stat") or ()) == (st.st_size, st.st_mtime_ns)

    def record_output(self, path: Path, blob_id: str) -> None:
        """Remember that ``path`` holds a verified copy of ``blob_id`` (for resolve's skip)."""
        st = os.stat(path)
        self._index_set(f"out:{path}", (blob_id, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))

    def output_matches(self, path: Path, blob_id: str, size: int) -> bool:
        """True when ``path`` is, by inode and mtime, the verified copy we produced earlier."""
        record = self._index.get(f"out:{path}")
        try:
            st = os.stat(path)
        except OSError:
            return False
        return bool(record == (blob_id, st.st_dev, st.st_ino, size, st.st_mtime_ns))

    def statistics(self) -> StoreStatistics:
        total = 0
        count = 0
        for _, record in self.known():
            count += 1
            total += _record_bytes(record)
        return StoreStatistics(blobs=count, bytes_present=total, open_blobs=len(self._open))

    # -- eviction -------------------------------------------------------------------------------
    def usage(self) -> list[tuple[str, float, int]]:
        """``(blob id, last access, bytes it costs)`` of every blob in the index, oldest first.

        A blob's cost is the bytes present in it, except for a data file with more than one
        link: a resolve output hard-linked to it keeps those bytes on disk whatever the cache
        does, so the blob costs nothing beyond the output and deleting it would free nothing.
        """
        rows = []
        for blob_id, record in self.known():
            cost = _record_bytes(record)
            if cost:
                try:
                    if os.stat(self.data_path(blob_id)).st_nlink > 1:
                        cost = 0
                except OSError:
                    cost = 0  # no data file: the record is all that is left
            rows.append((blob_id, float(record.get("atime", 0.0)), cost))
        rows.sort(key=lambda row: row[1])
        return rows

    def drop_unlinked(self) -> int:
        """Delete every closed blob whose data file has no other hard link; returns bytes freed.

        For a store whose blobs are linked into place as the outputs (a resolve's store on the
        destination's filesystem): a blob no output links to any more is a second copy that
        nobody asked for (a replaced or deleted output, a destination that was already right).
        Blocking.
        """
        with self._lock:
            busy = set(self._open)
        freed = 0
        for blob_id, _ in list(self.known()):
            if blob_id in busy:
                continue
            path = self.data_path(blob_id)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            if st is not None and st.st_nlink > 1:
                continue
            for p in (path, Path(f"{path}.journal")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            with contextlib.suppress(sqlite3.Error, OSError, diskcache.Timeout):
                self._index.delete(blob_id)
            freed += st.st_blocks * 512 if st is not None else 0
        return freed

    def evict(self, keep: set[str] | None = None) -> int:
        """Delete least-recently-used blobs until the cache fits ``max_bytes``; returns bytes freed.

        Open blobs (a mount serves them, a resolve fetches them), ``keep`` (a resolve's own
        blobs, after it released them) and blobs hard-linked to a resolve output are never
        evicted. A blob goes with its journal and its index entry. Blocking (an index scan and
        a stat per blob): call it in a thread.
        """
        if self.max_bytes is None:
            return 0
        keep = keep or set()
        rows = self.usage()
        total = sum(cost for _, _, cost in rows)
        freed = 0
        for blob_id, _, cost in rows:
            if total <= self.max_bytes:
                break
            if blob_id in keep or not cost:
                continue
            with self._lock:  # not opened meanwhile, and not opened while it goes
                if blob_id in self._open or blob_id in self._loading:
                    continue
                self._unlink_files(self.data_path(blob_id))
                with contextlib.suppress(sqlite3.Error, OSError, diskcache.Timeout):
                    self._index.delete(blob_id)
                    self._index.delete(f"link:{blob_id}")
            total -= cost
            freed += cost
            log.info("evicted blob %s (%d bytes)", blob_id, cost)
        self.last_usage = total
        if total > self.max_bytes:
            log.info(
                "cache %s holds %d bytes in use, over its limit of %d bytes",
                self.root,
                total,
                self.max_bytes,
            )
        return freed


def _record_bytes(record: dict[str, Any]) -> int:
    """Bytes present according to an index record (whole blocks; the last one clipped)."""
    present = bytes(record.get("present", b""))
    n = sum(present)
    size = int(record.get("size", 0))
    if present and n == len(present):
        return size
    full = n * int(record.get("block_size", 0))
    if present and present[-1]:
        full -= len(present) * int(record.get("block_size", 0)) - size
    return max(0, int(full))
