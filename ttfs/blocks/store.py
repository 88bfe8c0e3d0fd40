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
the next open replays it, re-checking every record against the data file. Even a partly
received block resumes where it stopped. After a power loss the page cache is gone: journal
records, index bits and data may disagree, so every present block of an unverified blob is
checksummed when the blob is opened and a block that does not match is dropped. A "verified"
flag is trusted only in the boot that wrote it, unless the data was fdatasync'd first (done on
release): after a reboot an unsynced blob is checked again. Syncing is thus kept off the hot
path. If a verified blob's data file changes (size or mtime) it is no longer trusted.

Everything here is synchronous and may block on disk: the fetch layer calls the slow parts
(``open_blob``, ``flush``, ``verify``, ``check_blocks``) through ``trio.to_thread``; ``pread``
and ``RunWriter.write`` touch only the page cache and stay on the event loop thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import struct
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache
import xxhash

from ..errors import CacheError, CacheFull
from .hashing import Checker

log = logging.getLogger(__name__)

INDEX_VERSION = 1
_READ_CHUNK = 8 * 1024 * 1024
# Journal record: block index, bytes of the block written so far, xxh3-64 of those bytes.
_JOURNAL = struct.Struct("<IIQ")


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


def _block_sum(data: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(data)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


BOOT_ID = _boot_id()


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
        fd: int,
        block_size: int,
        present: bytearray,
        sums: array[int],
        verified: bool,
    ) -> None:
        self.store = store
        self.spec = spec
        self.path = path
        self.fd = fd
        self.block_size = block_size
        self.n_blocks = max(1, -(-spec.size // block_size)) if spec.size else 0
        self.present = present
        self.sums = sums
        self.partial: dict[int, int] = {}
        self.journal_fd: int | None = None
        self.verified = verified
        self.n_present = sum(present)
        self.atime = time.time()
        self._dirty = False
        self._synced = False
        self.refs = 0

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
        """Read bytes the caller knows are present (page cache; stays on the event loop)."""
        self.atime = time.time()
        return os.pread(self.fd, length, offset)

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

    def open_journal(self) -> None:
        """Open the journal for appending (once; before worker threads append to it)."""
        if self.journal_fd is None:
            self.journal_fd = os.open(
                f"{self.path}.journal",
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                0o644,
            )

    def journal(self, index: int, length: int, digest: int) -> None:
        """Append one journal record: ``length`` bytes of block ``index`` hash to ``digest``."""
        if self.journal_fd is None:
            self.open_journal()
        assert self.journal_fd is not None
        os.write(self.journal_fd, _JOURNAL.pack(index, length, digest))

    def discard(self) -> None:
        """Forget every block (a failed verification); the space is released by re-truncating."""
        self.present[:] = bytes(len(self.present))
        self.n_present = 0
        self.verified = False
        self.partial.clear()
        try:
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, self.size)
            if self.journal_fd is not None:
                os.ftruncate(self.journal_fd, 0)
        except OSError as e:
            raise CacheError(f"cannot reset {self.path}: {e}") from e
        self._dirty = True

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
                if os.fstat(self.fd).st_size < self.size:
                    return False  # truncated behind our back: not a match, not an I/O error
                raise
        ok = h.hexdigest() == checker.expected
        if ok:
            self.verified = True
            self._dirty = True
        return ok

    def hash_blocks(self, hasher: Any, first: int, end: int) -> None:
        """Feed blocks ``[first, end)`` to ``hasher`` (blocking; the fetcher calls it in order).

        Raises:
            CacheError: the data file could not be read.
        """
        offset, stop = self.block_range(first)[0], self.block_range(end - 1)[1]
        try:
            while offset < stop:
                chunk = os.pread(self.fd, min(_READ_CHUNK, stop - offset), offset)
                if not chunk:
                    raise CacheError(f"{self.path} is shorter than expected")
                hasher.update(chunk)
                offset += len(chunk)
        except OSError as e:
            raise CacheError(f"cannot read {self.path}: {e}") from e

    def check_blocks(self) -> list[int]:
        """Re-read every present block and drop those whose checksum differs; returns them."""
        bad = []
        for i in range(self.n_blocks):
            if not self.present[i]:
                continue
            start, end = self.block_range(i)
            try:
                data = os.pread(self.fd, end - start, start)
            except OSError:
                data = b""
            if len(data) != end - start or _block_sum(data) != self.sums[i]:
                bad.append(i)
                self.present[i] = 0
                self.n_present -= 1
                self.verified = False
        if bad:
            self._dirty = True
            log.warning("blob %s: %d corrupt block(s) dropped: %s", self.blob_id, len(bad), bad[:8])
        return bad

    def stat_key(self) -> tuple[int, int]:
        st = os.fstat(self.fd)
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
            data = os.pread(self.fd, length, start)
            if len(data) != length or _block_sum(data) != digest:
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
        return {
            "v": INDEX_VERSION,
            "size": self.size,
            "block_size": self.block_size,
            "present": bytes(self.present),
            "sums": self.sums.tobytes(),
            "verified": self.verified and self.complete,
            "stat": self.stat_key() if self.verified and self.complete else None,
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
            prefix = os.pread(blob.fd, done, start)
            if len(prefix) == done:
                self._hasher.update(prefix)
            else:
                done = 0
        self.pos = start + done

    @property
    def next_block(self) -> int:
        return self.block

    def copy_from(self, fd: int, length: int) -> list[tuple[int, int]]:
        """Copy the next ``length`` bytes from ``fd`` (same offsets) in the kernel (blocking).

        For a source that holds the blob's bytes at the blob's offsets (a shared-cache entry):
        :func:`kernel_copy` moves them, then each piece is read back from the page cache once
        for its block checksum and journalled, as :meth:`write` does. Returns the blocks it
        completed as ``(index, checksum)``; the caller lands them on its own thread (presence
        is the event loop's state). Call from one worker thread at a time per writer.

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
            try:
                kernel_copy(fd, blob.fd, self.pos, take)
                data = os.pread(blob.fd, take, self.pos)
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
            if self.pos < self._block_end:
                blob.partial[self.block] = written_in_block
            else:
                done.append((self.block, digest))
                self.block += 1
                self._hasher = xxhash.xxh3_64()
                if self.block < blob.n_blocks:
                    self._block_end = blob.block_range(self.block)[1]
        return done

    def write(self, data: bytes | memoryview) -> list[int]:
        done: list[int] = []
        view = memoryview(data)
        blob = self.blob
        while view:
            take = min(len(view), self._block_end - self.pos)
            if take <= 0:
                raise CacheError(f"blob {blob.blob_id}: write past the end of the run")
            piece = view[:take]
            try:
                written = os.pwrite(blob.fd, piece, self.pos)
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

    def __init__(self, root: Path, *, block_size: int, max_bytes: int | None = None) -> None:
        self.root = root
        self.block_size = block_size
        self.max_bytes = max_bytes
        try:
            (root / "blobs").mkdir(parents=True, exist_ok=True)
            # eviction_policy none: diskcache must never drop our index entries on its own.
            self._index = diskcache.Cache(
                str(root / "index"), eviction_policy="none", size_limit=2**62, statistics=False
            )
        except OSError as e:
            raise CacheError(f"cannot use cache directory {root}: {e}") from e
        self._open: dict[str, Blob] = {}
        self._lock = threading.Lock()
        self.pinned: set[str] = set()

    def close(self) -> None:
        self.flush()
        with self._lock:
            for blob in self._open.values():
                with contextlib.suppress(OSError):
                    os.close(blob.fd)
            self._open.clear()
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

        Raises:
            CacheError: the data file cannot be created or opened.
        """
        with self._lock:
            blob = self._open.get(spec.blob_id)
            if blob is not None:
                if blob.size != spec.size:
                    raise CacheError(
                        f"hash {spec.blob_id} is used with two sizes ({blob.size} and {spec.size})"
                    )
                blob.refs += 1
                return blob
            blob = self._load(spec)
            blob.refs += 1
            self._open[spec.blob_id] = blob
            return blob

    def _load(self, spec: BlobSpec) -> Blob:
        path = self.data_path(spec.blob_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise CacheError(f"cannot open cache file {path}: {e}") from e
        try:
            record = self._index.get(spec.blob_id)
            n_blocks = max(1, -(-spec.size // self.block_size)) if spec.size else 0
            usable = (
                isinstance(record, dict)
                and record.get("v") == INDEX_VERSION
                and record.get("size") == spec.size
                and record.get("block_size") == self.block_size
                and len(record.get("present", b"")) == n_blocks
            )
            st = os.fstat(fd)
            if usable and st.st_size != spec.size:
                usable = False  # the data file was truncated or replaced behind our back
            if not usable:
                if record is not None:
                    log.info("blob %s: index entry unusable, starting empty", spec.blob_id)
                if st.st_size != spec.size:
                    # Keep bytes of a same-sized file: the journal may vouch for them.
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, spec.size)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{path}.journal")
                present = bytearray(n_blocks)
                sums = array("Q", bytes(8 * n_blocks))
                verified = False
            else:
                assert isinstance(record, dict)
                present = bytearray(record["present"])
                sums = array("Q")
                sums.frombytes(record["sums"])
                verified = (
                    bool(record.get("verified"))
                    and tuple(record.get("stat") or ()) == (st.st_size, st.st_mtime_ns)
                    and record.get("boot") in (None, BOOT_ID)
                )
            blob = Blob(self, spec, path, fd, self.block_size, present, sums, verified)
            blob._synced = verified and isinstance(record, dict) and record.get("boot") is None
            if not verified:
                if blob.n_present:
                    blob.check_blocks()
                blob.replay_journal()
            if blob._dirty:
                self._persist(blob)
                if not blob.partial:
                    self._reset_journal(blob)
            return blob
        except BaseException:
            os.close(fd)
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
        # A verified blob is synced once, here, so its flag survives a reboot.
        if self._persist(blob, sync=blob.verified and not blob._synced) and not blob.partial:
            self._reset_journal(blob)  # everything it vouched for is in the index now
        if blob.journal_fd is not None:
            with contextlib.suppress(OSError):
                os.close(blob.journal_fd)
        with contextlib.suppress(OSError):
            os.close(blob.fd)

    def _forget(self, blob: Blob) -> None:
        for fd in (blob.journal_fd, blob.fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for path in (blob.path, Path(f"{blob.path}.journal")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(sqlite3.Error, OSError, diskcache.Timeout):
            self._index.delete(blob.blob_id)

    # -- persistence ------------------------------------------------------------------------
    def flush(self) -> None:
        """Persist the presence map of every open blob that changed (no fsync: see module doc).

        The journal is kept while the blob is open, because the event loop may append to it
        while this runs in a worker thread; it is reset when the blob is opened or released.
        """
        with self._lock:
            blobs = list(self._open.values())
        for blob in blobs:
            if blob._dirty:
                self._persist(blob)

    def _persist(self, blob: Blob, *, sync: bool = False) -> bool:
        """Write the blob's index entry (after fdatasync when ``sync``); False if it failed."""
        if sync:
            try:
                os.fdatasync(blob.fd)
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
        try:
            if blob.journal_fd is not None:
                os.ftruncate(blob.journal_fd, 0)
            else:
                os.truncate(f"{blob.path}.journal", 0)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot reset journal of %s: %s", blob.path, e)

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

    # -- bookkeeping --------------------------------------------------------------------------
    def known(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for key in list(self._index.iterkeys()):
            if isinstance(key, str) and not key.startswith("out:"):
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
            total += sum(record["present"]) * record["block_size"]
        return StoreStatistics(blobs=count, bytes_present=total, open_blobs=len(self._open))

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

        Open blobs, pinned blobs and ``keep`` are never evicted.
        """
        if self.max_bytes is None:
            return 0
        keep = set(keep or ()) | self.pinned
        with self._lock:
            keep |= set(self._open)
        records = sorted(self.known(), key=lambda kv: kv[1].get("atime", 0.0))
        total = sum(sum(r["present"]) * r["block_size"] for _, r in records)
        freed = 0
        for blob_id, record in records:
            if total <= self.max_bytes:
                break
            if blob_id in keep:
                continue
            size = sum(record["present"]) * record["block_size"]
            with contextlib.suppress(FileNotFoundError):
                self.data_path(blob_id).unlink()
            self._index.delete(blob_id)
            total -= size
            freed += size
            log.info("evicted blob %s (%d bytes)", blob_id, size)
        return freed
