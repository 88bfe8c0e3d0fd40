"""The b10fs shared cache: one flat directory of complete blobs that replicas share.

truss-transfer calls it *b10cache*: a network filesystem mounted into every replica of a model,
holding files named exactly ``<hash>``. ttfs keeps that layout and its rules (spec §3.6, §3.11),
so ttfs replicas and truss-transfer replicas can share one directory, and fixes what upstream
gets wrong:

* **Publish copies, never moves.** A complete blob is copied to ``<hash>.incomplete`` (opened
  exclusively, fsync'd) and renamed to ``<hash>``; the local file stays where it is (upstream
  moves the download away when both sit on one filesystem, and the local file disappears).
* **Cross-replica single-flight.** ``<hash>.lock`` is created with ``O_CREAT|O_EXCL`` and holds
  host, pid, boot id and pid namespace of its holder; the holder refreshes its mtime every few
  seconds while it downloads. A lock whose mtime is older than the stale timeout, or that did not
  change for that long as seen by the waiter's own clock (clock skew), or whose holder is a dead
  process on this very host, is broken by renaming it aside first, so two breakers cannot both
  win. Only create-exclusive, rename, open and mtime are used: all of them work on NFS (open
  revalidates attributes, so a cached mtime cannot fake staleness).
* **Checked entries.** An entry is used only when its size is right; the fetch layer hashes it as
  it lands and calls :meth:`SharedCache.mark_corrupt` on a mismatch, which renames it aside as
  ``<hash>.corrupt-<unix time>`` so a good copy replaces it.
* **Verification records.** A replica that verified an entry (hashed it, or published its own
  verified bytes) writes ``.ttfs-verified/<hash>.json`` beside it: the entry's inode, size and
  mtime and its block checksums (:class:`EntryRecord`). Another replica's hot start trusts an
  entry that still has them instead of hashing it again (docs/b10fs.md, "The trust rule").
  Cleanup removes the records of entries that are gone.

Everything here is synchronous and may block on a network filesystem: the fetch layer
(:mod:`ttfs.fetch.tiers`) calls it through ``trio.to_thread``. This module is the storage half of
the tier; scheduling (who waits for whom, which range comes from where) lives in the fetch layer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import (  # the settings half lives with the other settings
    SPEED_CPU_THRESHOLD,
    SharedCacheConfig,
)
from ..errors import CacheError
from ..procs import process_alive
from ..units import GiB, MiB
from .atime import touch_atime
from .identity import BlobKey, key_of_open

log = logging.getLogger(__name__)

INCOMPLETE = ".incomplete"
LOCK = ".lock"
CORRUPT = ".corrupt-"
BROKEN = ".broken-"

# Verification records live in a subdirectory: the cleanup rules, which look only at the
# directory's files, and truss-transfer replicas sharing the directory never see them.
RECORDS = ".ttfs-verified"
# A record holds 8-20 bytes of JSON per block: 64 MiB covers a blob of several TB at 2 MiB
# blocks; anything bigger is not a record we wrote.
_RECORD_LIMIT = 64 * MiB
# Blobs below this size have no replicas' record (docs/b10fs.md): hashing one costs less than
# reading a small file from a network filesystem (8 MiB: ~5 ms of sha256), and a manifest of
# 10^5 small files would otherwise add as many record files to the directory.
RECORDED_FROM = 8 * MiB

_COPY_CHUNK = 64 * MiB
_READ_CHUNK = 8 * MiB
_PROGRESS_SECS = 30.0


_DESIRED_SPEED: float | None = None


def desired_speed(config: SharedCacheConfig) -> float:
    """The read threshold in MiB/s: the configured one, else one random draw per process.

    Upstream draws uniformly from [10, 150) on machines with at most 16 logical CPUs and from
    [10, 600) on bigger ones, on purpose: replicas then disagree, so an overloaded shared cache
    is not abandoned (or stormed) by all of them at once.
    """
    global _DESIRED_SPEED
    if config.speed_mbps is not None:
        return config.speed_mbps
    if _DESIRED_SPEED is None:
        top = 150.0 if (os.cpu_count() or 1) <= SPEED_CPU_THRESHOLD else 600.0
        _DESIRED_SPEED = random.uniform(10.0, top)
    return _DESIRED_SPEED


@dataclass(frozen=True, slots=True)
class SpaceStats:
    """What cleanup found (spec §3.11.3)."""

    available_bytes: int
    cached_bytes: int  # right-sized entries of the current manifest
    deleted_files: int = 0
    deleted_bytes: int = 0
    stale_bytes: int = 0  # entries of other manifests kept


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether this process reads from and writes to the shared cache, and why."""

    read: bool
    write: bool
    speed_mbps: float | None = None
    desired_mbps: float | None = None
    space: SpaceStats | None = None


@dataclass(frozen=True, slots=True)
class SharedFile:
    """A right-sized entry; ``key`` identifies the very file that was checked.

    It holds no descriptor: a mount may know 10^5 entries at once, far more than the open-file
    limit. Each read run opens it with :meth:`SharedCache.open_for_read`, which refuses a file
    that is no longer the one checked.
    """

    path: Path
    key: tuple[int, int, int]  # inode, size, mtime_ns


@dataclass(frozen=True, slots=True)
class EntryRecord:
    """What a replica wrote beside an entry it verified: the entry's inode, size and mtime at
    that moment and the blob's block checksums at ``block_size``.

    Unlike a block store's own record (:class:`~ttfs.blocks.identity.BlobKey`) it leaves out
    dev, which differs per NFS client, and ctime, which every replica's atime touch changes. A
    write through the filesystem still changes mtime, a replacement the inode, a truncation the
    size; setting mtime back takes the entry's owner calling ``utimensat`` on purpose.
    """

    ino: int
    size: int
    mtime_ns: int
    block_size: int
    sums: tuple[int, ...]

    @classmethod
    def of(cls, key: BlobKey, block_size: int, sums: Sequence[int]) -> EntryRecord:
        """The record of the entry with identity ``key`` whose blocks have ``sums``."""
        return cls(key.ino, key.size, key.mtime_ns, block_size, tuple(sums))

    def matches(self, key: BlobKey) -> bool:
        """Whether ``key`` is the very entry this record was written for, unchanged."""
        return (self.ino, self.size, self.mtime_ns) == (key.ino, key.size, key.mtime_ns)

    def sums_for(self, block_size: int, n_blocks: int) -> tuple[int, ...] | None:
        """The block checksums, if they were taken at this block size (else None)."""
        if self.block_size == block_size and len(self.sums) == n_blocks:
            return self.sums
        return None

    def to_json(self) -> str:
        return json.dumps(
            {
                "ino": self.ino,
                "size": self.size,
                "mtime_ns": self.mtime_ns,
                "block_size": self.block_size,
                "sums": list(self.sums),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: bytes) -> EntryRecord | None:
        """The record ``raw`` holds, or None if it is not one (a bad record means a hash)."""
        try:
            doc = json.loads(raw)
            record = cls(
                ino=int(doc["ino"]),
                size=int(doc["size"]),
                mtime_ns=int(doc["mtime_ns"]),
                block_size=int(doc["block_size"]),
                sums=tuple(int(s) for s in doc["sums"]),
            )
        except (ValueError, KeyError, TypeError):
            return None
        if record.block_size <= 0 or not all(0 <= s < 1 << 64 for s in record.sums):
            return None
        return record


@dataclass(slots=True)
class HeldLock:
    """A lock this process created; ``fd`` stays open so refreshes touch our own inode."""

    blob_id: str
    path: Path
    token: str
    ino: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class LockInfo:
    """A lock as a waiter sees it (attributes fetched through ``open``: fresh on NFS)."""

    path: Path
    ino: int
    mtime_ns: int
    owner: dict[str, Any] | None


@dataclass(slots=True)
class _Seen:
    key: tuple[int, int]
    since: float


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass(slots=True)
class _Identity:
    host: str = field(default_factory=socket.gethostname)
    boot: str = field(default_factory=_boot_id)
    pidns: str = field(default_factory=_pid_namespace)

    def same_machine(self, owner: Mapping[str, Any]) -> bool:
        """True only when a pid in ``owner`` means the same process space as ours."""
        return bool(
            self.boot
            and self.pidns
            and owner.get("host") == self.host
            and owner.get("boot") == self.boot
            and owner.get("pidns") == self.pidns
        )


class SharedCache:
    """The directory and its rules. Thread-safe: every method stands alone on the filesystem,
    except the staleness memory of :meth:`lock_stale`, which only the tier's poller uses."""

    def __init__(self, config: SharedCacheConfig) -> None:
        self.config = config
        self.directory = config.directory
        self._me = _Identity()
        self._seen: dict[str, _Seen] = {}

    # -- layout ------------------------------------------------------------------------------
    def path(self, blob_id: str) -> Path:
        return self.directory / blob_id

    def lock_path(self, blob_id: str) -> Path:
        return self.directory / f"{blob_id}{LOCK}"

    def record_path(self, blob_id: str) -> Path:
        return self.directory / RECORDS / f"{blob_id}.json"

    def ensure_dir(self) -> None:
        """``mkdir -p`` the cache directory.

        Raises:
            CacheError: it cannot be created (upstream aborts the resolve the same way).
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"Failed to create b10cache directory {self.directory}: {e}") from e

    # -- cleanup and the decision (once per process, before downloads) ------------------------
    @staticmethod
    def _owner_of(name: str) -> tuple[str, str]:
        """``(blob id, suffix)`` of a directory entry: ``abc.lock`` -> ``("abc", ".lock")``."""
        for marker in (CORRUPT, LOCK + BROKEN):
            base, sep, _ = name.rpartition(marker)
            if sep and base:
                return base, marker
        for suffix in (INCOMPLETE, LOCK):
            if name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)], suffix
        return name, ""

    def cleanup(self, sizes: Mapping[str, int], *, now: float | None = None) -> SpaceStats:
        """Apply the cleanup rules and measure the space (spec §3.11.3).

        ``sizes`` maps every hash of the current manifest to its size; those entries are never
        deleted (a wrong-sized one is reported). Every other regular file is deleted when its
        atime is older than the cleanup hours; of the rest, oldest atime first, until they fit
        the max stale size. The live side files of this manifest (``.lock``, ``.incomplete``)
        and of others (mtime newer than the lock timeout) are left alone: replicas use them. A
        stale lock beside its complete entry (a holder died between publishing and unlocking)
        is broken: nobody waits on it, and the rules above would keep it while this model is
        in use.

        Raises:
            CacheError: the directory cannot be listed or measured (fatal, as upstream).
        """
        now = time.time() if now is None else now
        cfg = self.config
        max_age = cfg.cleanup_hours * 3600.0
        cached = deleted = deleted_bytes = 0
        candidates: list[tuple[float, int, Path]] = []
        present: set[str] = set()
        files: set[str] = set()
        gone: set[str] = set()
        manifest_locks: list[str] = []
        try:
            entries = list(os.scandir(self.directory))
        except OSError as e:
            raise CacheError(f"cannot list b10cache directory {self.directory}: {e}") from e
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished meanwhile (another replica renamed it)
            name = entry.name
            files.add(name)
            if name in sizes:
                if st.st_size == sizes[name]:
                    cached += st.st_size
                    present.add(name)
                else:
                    log.warning(
                        "b10cache entry %s has %d bytes, the manifest says %d: ignored until "
                        "replaced",
                        entry.path,
                        st.st_size,
                        sizes[name],
                    )
                continue
            owner, suffix = self._owner_of(name)
            live_side_file = suffix in (LOCK, INCOMPLETE) and (
                owner in sizes or now - st.st_mtime < cfg.lock_stale_secs
            )
            if live_side_file:
                if suffix == LOCK and owner in sizes:
                    manifest_locks.append(owner)
                continue
            if now - st.st_atime > max_age:
                if self._delete(Path(entry.path), st.st_size, "unused for longer than the limit"):
                    gone.add(name)
                    deleted += 1
                    deleted_bytes += st.st_size
                continue
            candidates.append((st.st_atime, st.st_size, Path(entry.path)))
        for blob_id in manifest_locks:
            if blob_id in present:
                self._break_published_lock(blob_id, now)
        stale = sum(size for _, size, _ in candidates)
        if cfg.max_stale_bytes is not None and stale > cfg.max_stale_bytes:
            for _, size, path in sorted(candidates, key=lambda c: c[0]):
                if stale <= cfg.max_stale_bytes:
                    break
                if self._delete(path, size, "over the max stale cache size"):
                    gone.add(path.name)
                    stale -= size
                    deleted += 1
                    deleted_bytes += size
        self._drop_orphan_records(files - gone, now)
        try:
            vfs = os.statvfs(self.directory)
        except OSError as e:
            raise CacheError(f"cannot measure b10cache directory {self.directory}: {e}") from e
        return SpaceStats(
            available_bytes=vfs.f_bavail * vfs.f_frsize,
            cached_bytes=cached,
            deleted_files=deleted,
            deleted_bytes=deleted_bytes,
            stale_bytes=stale,
        )

    def _break_published_lock(self, blob_id: str, now: float) -> None:
        try:
            info = self.inspect_lock(blob_id)
        except OSError:
            return
        if info is None:
            return
        reason = self.lock_stale(blob_id, info, now=now)
        if reason is not None:
            self.break_lock(blob_id, info, f"its entry is published; {reason}")

    @staticmethod
    def _delete(path: Path, size: int, why: str) -> bool:
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            log.warning("b10cache: cannot delete %s: %s", path, e)
            return False
        log.info("b10cache: deleted %s (%d bytes, %s)", path, size, why)
        return True

    def write_allowed(self, space: SpaceStats, total_bytes: int) -> bool:
        """Upstream's headroom rule: write only if the volume keeps the headroom afterwards."""
        additional = max(0, total_bytes - space.cached_bytes)
        headroom = self.config.min_free_bytes
        args = (
            space.available_bytes / GiB,
            additional / GiB,
            headroom / GiB,
        )
        if space.available_bytes > additional + headroom:
            log.info(
                "Sufficient space for b10cache write: Available on volume: %.2fGB, Additional "
                "for current manifest: %.2fGB, Required headroom: %.0fGB. Enabling write to "
                "b10cache.",
                *args,
            )
            return True
        log.warning(
            "Insufficient space for b10cache write: Available on volume: %.2fGB, Additional for "
            "current manifest: %.2fGB, Required headroom: %.0fGB. Disabling write to b10cache.",
            *args,
        )
        return False

    def measure_read_speed(self, blobs: Iterable[tuple[str, int]]) -> float | None:
        """MiB/s reading the first ``benchmark_bytes`` of the first big right-sized entry.

        Walks ``(hash, size)`` in order and uses the first blob bigger than twice the probe
        whose entry has exactly that size; a failed read tries the next. None: no candidate.
        """
        probe = self.config.benchmark_bytes
        for blob_id, size in blobs:
            if size <= 2 * probe:
                continue
            path = self.path(blob_id)
            try:
                if path.stat().st_size != size:
                    continue
                started = time.monotonic()
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    left = probe
                    while left > 0:
                        chunk = os.read(fd, min(_READ_CHUNK, left))
                        if not chunk:
                            raise OSError(errno.EIO, "file ended early")
                        left -= len(chunk)
                finally:
                    os.close(fd)
                secs = max(time.monotonic() - started, 1e-9)
            except FileNotFoundError:
                continue
            except OSError as e:
                log.warning("b10cache: cannot read %s for the speed check: %s", path, e)
                continue
            return probe / MiB / secs
        return None

    def measure(self, sizes: Mapping[str, int]) -> SpaceStats:
        """Space stats without cleanup: for a caller that does not know its whole manifest,
        where deleting "foreign" entries could delete its own.

        Raises:
            CacheError: the directory cannot be measured.
        """
        cached = sum(size for blob_id, size in sizes.items() if self.has_entry(blob_id, size))
        try:
            vfs = os.statvfs(self.directory)
        except OSError as e:
            raise CacheError(f"cannot measure b10cache directory {self.directory}: {e}") from e
        return SpaceStats(available_bytes=vfs.f_bavail * vfs.f_frsize, cached_bytes=cached)

    def decide(self, blobs: Iterable[tuple[str, int]], *, cleanup: bool = True) -> Decision:
        """Cleanup, then the write (headroom) and read (speed) decisions, logged as upstream.

        ``blobs`` is the manifest's ``(hash, size)`` in the order the speed check walks it;
        ``cleanup=False`` when that may not be the whole manifest (nothing is deleted then).

        Raises:
            CacheError: the directory cannot be created, listed or measured.
        """
        ordered = list(blobs)
        sizes = dict(ordered)
        self.ensure_dir()
        if cleanup:
            space = self.cleanup(sizes)
        else:
            log.info("b10cache: cleanup skipped (this process does not know its whole manifest)")
            space = self.measure(sizes)
        write = self.write_allowed(space, sum(sizes.values()))
        desired = desired_speed(self.config)
        speed: float | None = None
        read = True
        try:
            speed = self.measure_read_speed(ordered)
        except Exception as e:  # the check itself failed: keep reading, as upstream
            log.warning("Failed to check b10cache speed: %s", e)
        if speed is None:
            log.info("Skipping b10cache speed check.")
        else:
            log.warning("b10cache: Read speed of %.2f MB/s, desired: %.2f MB/s", speed, desired)
            read = speed > desired
            if not read:
                log.info("b10cache is slower than downloading. Not reading from b10cache.")
        log.info("b10cache use: Read: %s, Write: %s", read, write)
        return Decision(read, write, speed, desired, space)

    # -- entries -----------------------------------------------------------------------------
    def open_entry(self, blob_id: str, size: int) -> SharedFile | None:
        """Open ``<hash>`` for reading if it exists with exactly ``size`` bytes."""
        path = self.path(blob_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("b10cache: cannot open %s: %s", path, e)
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        if st.st_size != size:
            os.close(fd)
            log.warning(
                "b10cache is inconsistent: %s has %d bytes, expected %d; not using it",
                path,
                st.st_size,
                size,
            )
            return None
        os.close(fd)
        self.touch(path)
        return SharedFile(path, (st.st_ino, st.st_size, st.st_mtime_ns))

    @staticmethod
    def open_for_read(entry: SharedFile) -> int:
        """A read descriptor of ``entry`` (the caller closes it), if it is still that file.

        Raises:
            OSError: it cannot be opened, or was replaced or changed since it was checked.
        """
        fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if (st.st_ino, st.st_size, st.st_mtime_ns) != entry.key:
                raise OSError(errno.ESTALE, "the entry was replaced or changed")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def has_entry(self, blob_id: str, size: int) -> bool:
        try:
            return self.path(blob_id).stat().st_size == size
        except OSError:
            return False

    @staticmethod
    def touch(path: Path) -> None:
        """Refresh the atime that cleanup ages entries by (also on noatime mounts); the mtime
        is left to the kernel (:func:`~ttfs.blocks.atime.touch_atime` says why)."""
        try:
            touch_atime(path)
        except OSError:
            with contextlib.suppress(OSError), open(path, "rb") as f:
                f.read(1)  # not the owner: a read bumps atime where the mount allows it

    def mark_corrupt(self, entry: SharedFile) -> Path | None:
        """Rename a corrupt entry aside (if it is still the file we read); returns the new name."""
        aside = self.directory / f"{entry.path.name}{CORRUPT}{int(time.time())}"
        try:
            st = os.stat(entry.path)
            if (st.st_ino, st.st_size, st.st_mtime_ns) != entry.key:
                return None  # already replaced by someone else
            os.rename(entry.path, aside)
            self.drop_record(entry.path.name)
        except OSError as e:
            if not isinstance(e, FileNotFoundError):
                log.warning("b10cache: cannot move corrupt %s aside: %s", entry.path, e)
            return None
        return aside

    # -- verification records ------------------------------------------------------------------
    def read_record(self, blob_id: str) -> EntryRecord | None:
        """The verification record of ``<hash>``, or None (absent, unreadable or not a record:
        the entry is then hashed, never trusted)."""
        try:
            with open(self.record_path(blob_id), "rb") as f:
                raw = f.read(_RECORD_LIMIT + 1)
        except OSError:
            return None
        return EntryRecord.from_json(raw) if len(raw) <= _RECORD_LIMIT else None

    def write_record(self, blob_id: str, record: EntryRecord) -> bool:
        """Write the record of ``<hash>`` (a temporary name, then a rename: a reader sees the
        old record or the new one, whole). Never raises: a replica that may not write the
        directory still resolves, and the next one hashes. Returns whether it was written."""
        path = self.record_path(blob_id)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "x", encoding="utf-8") as f:
                os.fchmod(f.fileno(), 0o644)
                f.write(record.to_json())
            os.rename(tmp, path)
        except OSError as e:
            log.debug("b10cache: cannot write the record of %s: %s", blob_id, e)
            self._unlink(tmp)
            return False
        return True

    def drop_record(self, blob_id: str) -> None:
        self._unlink(self.record_path(blob_id))

    def _drop_orphan_records(self, alive: set[str], now: float) -> None:
        """Remove the records whose entry is gone (deleted by us, by truss-transfer's cleanup,
        or by hand). A record left behind is harmless (a new entry has another inode or
        mtime) but would pile up. Temporary names older than the lock timeout go too."""
        try:
            names = os.listdir(self.directory / RECORDS)
        except OSError:
            return
        for name in names:
            if not name.startswith(".") and name.removesuffix(".json") in alive:
                continue
            path = self.directory / RECORDS / name
            # Only old ones: an entry renamed into place after our listing gets its record
            # right after, and a temporary name may be a replica writing one now.
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > self.config.lock_stale_secs:
                    self._unlink(path)

    # -- publish -------------------------------------------------------------------------------
    def publish(self, src: Path, blob_id: str, size: int) -> str:
        """Copy the complete local file ``src`` into the cache as ``<hash>``; never moves it.

        Returns ``"present"`` (a right-sized entry existed: atime refreshed), ``"published"``,
        ``"busy"`` (another replica is copying it right now), ``"timeout"`` or ``"failed"``;
        failures are logged as warnings, never raised (the download itself succeeded).
        """
        return self.publish_identified(src, blob_id, size)[0]

    def publish_identified(self, src: Path, blob_id: str, size: int) -> tuple[str, BlobKey | None]:
        """:meth:`publish`, and for ``"published"`` the entry's identity after the final atime
        touch when it is still the file this call wrote (same dev, inode, size and mtime as
        the copy had before its rename), else None: what the trust rule records."""
        dest = self.path(blob_id)
        if self.has_entry(blob_id, size):
            self.touch(dest)
            return "present", None
        incomplete = self.directory / f"{blob_id}{INCOMPLETE}"
        fd = self._create_incomplete(incomplete)
        if fd is None:
            return "busy", None
        started = time.monotonic()
        try:
            try:
                with open(src, "rb") as source:
                    if os.fstat(source.fileno()).st_size != size:
                        raise OSError(errno.EIO, f"local file {src} does not have {size} bytes")
                    done = self._copy(source.fileno(), fd, size, started, blob_id)
                if not done:
                    log.warning(
                        "b10cache: copying %s took longer than %.0fs; local file kept, cache "
                        "not populated",
                        blob_id,
                        self.config.publish_timeout,
                    )
                    self._unlink(incomplete)
                    return "timeout", None
                os.fsync(fd)
                st = os.fstat(fd)
                written_as = BlobKey.of(st).content
            finally:
                os.close(fd)
            written = os.stat(incomplete).st_size
            if written != size:
                log.warning(
                    "b10cache: %s has %d bytes after the copy, expected %d; discarded",
                    incomplete,
                    written,
                    size,
                )
                self._unlink(incomplete)
                return "failed", None
            os.rename(incomplete, dest)
        except OSError as e:
            log.warning(
                "Failed to write %s to b10cache: %s. Maybe b10cache has no storage or "
                "permission issues",
                dest,
                e,
            )
            self._unlink(incomplete)
            return "failed", None
        self.touch(dest)
        log.info(
            "b10cache: published %s (%d bytes in %.2fs)", dest, size, time.monotonic() - started
        )
        now = key_of_open(dest)
        return "published", now if now is not None and now.content == written_as else None

    def _create_incomplete(self, incomplete: Path) -> int | None:
        for _ in range(2):
            try:
                return os.open(
                    incomplete, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
                )
            except FileExistsError:
                try:
                    age = time.time() - os.stat(incomplete).st_mtime
                except FileNotFoundError:
                    continue
                except OSError:
                    return None
                if age < self.config.lock_stale_secs:
                    log.debug("b10cache: %s is being written by another replica", incomplete)
                    return None
                log.info("b10cache: removing abandoned %s (%.0fs old)", incomplete, age)
                self._unlink(incomplete)
            except OSError as e:
                log.warning(
                    "Failed to write %s to b10cache: %s. Maybe b10cache has no storage or "
                    "permission issues",
                    incomplete,
                    e,
                )
                return None
        return None

    def _copy(self, src: int, dst: int, size: int, started: float, blob_id: str) -> bool:
        """Copy ``size`` bytes in-kernel where possible; False when the timeout hit."""
        mode = "copy_file_range"
        offset = 0
        last_log = started
        while offset < size:
            now = time.monotonic()
            if now - started > self.config.publish_timeout:
                return False
            if now - last_log >= _PROGRESS_SECS:
                last_log = now
                log.info(
                    "b10cache: copying %s, %d of %d bytes (%.0f%%)",
                    blob_id,
                    offset,
                    size,
                    100.0 * offset / size,
                )
            n = min(_COPY_CHUNK, size - offset)
            if mode == "copy_file_range":
                try:
                    k = os.copy_file_range(src, dst, n, offset, offset)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    mode = "sendfile"
                    continue
            elif mode == "sendfile":
                try:
                    os.lseek(dst, offset, os.SEEK_SET)
                    k = os.sendfile(dst, src, offset, n)
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    mode = "pread"
                    continue
            else:
                data = os.pread(src, min(n, _READ_CHUNK), offset)
                k = os.pwrite(dst, data, offset) if data else 0
            if k <= 0:
                raise OSError(errno.EIO, f"copy of {blob_id} stopped at {offset} of {size}")
            offset += k
        return True

    @staticmethod
    def _unlink(path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    # -- locks ----------------------------------------------------------------------------------
    def try_lock(self, blob_id: str) -> HeldLock | None:
        """Create ``<hash>.lock`` exclusively; None when someone else holds it."""
        path = self.lock_path(blob_id)
        token = secrets.token_hex(8)
        body = json.dumps(
            {
                "host": self._me.host,
                "pid": os.getpid(),
                "boot": self._me.boot,
                "pidns": self._me.pidns,
                "token": token,
                "time": time.time(),
            }
        ).encode()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return None
        try:
            os.write(fd, body)
            ino = os.fstat(fd).st_ino
        except OSError:
            os.close(fd)
            self._unlink(path)
            raise
        self._seen.pop(blob_id, None)
        return HeldLock(blob_id, path, token, ino, fd)

    def inspect_lock(self, blob_id: str) -> LockInfo | None:
        """The current lock of ``blob_id`` (None: no lock). Opening it revalidates NFS attrs."""
        path = self.lock_path(blob_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
        owner: dict[str, Any] | None
        try:
            parsed = json.loads(raw.decode())
            owner = parsed if isinstance(parsed, dict) else None
        except (UnicodeDecodeError, ValueError):
            owner = None  # being written right now, or foreign: judged by mtime alone
        return LockInfo(path, st.st_ino, st.st_mtime_ns, owner)

    def lock_stale(self, blob_id: str, info: LockInfo, *, now: float | None = None) -> str | None:
        """Why the lock is stale, or None while it is live.

        Stale when its mtime is older than the timeout; or when it did not change for the
        timeout by our monotonic clock (a skewed server clock cannot keep a dead lock alive);
        or when its holder is a dead process in our own pid namespace on this boot.
        """
        limit = self.config.lock_stale_secs
        age = (time.time() if now is None else now) - info.mtime_ns / 1e9
        if age > limit:
            return f"not refreshed for {age:.1f}s"
        mono = time.monotonic()
        key = (info.ino, info.mtime_ns)
        seen = self._seen.get(blob_id)
        if seen is None or seen.key != key:
            self._seen[blob_id] = _Seen(key, mono)
        elif mono - seen.since > limit:
            return f"unchanged for {mono - seen.since:.1f}s"
        owner = info.owner
        if owner is not None and self._me.same_machine(owner):
            pid = owner.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and not process_alive(pid):
                return f"its holder (pid {pid} on this host) is gone"
        return None

    def break_lock(self, blob_id: str, info: LockInfo, reason: str) -> bool:
        """Remove a stale lock. Rename first: of two breakers only one rename succeeds, and a
        breaker that finds it renamed a *fresh* lock (created after its look) puts it back."""
        path = info.path
        aside = path.with_name(f"{path.name}{BROKEN}{secrets.token_hex(4)}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        except OSError as e:
            log.warning("b10cache: cannot break stale lock %s: %s", path, e)
            return False
        try:
            st = os.stat(aside)
            if (st.st_ino, st.st_mtime_ns) != (info.ino, info.mtime_ns):
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)  # not the lock we judged: give it back
                return False
        except OSError:
            return False
        finally:
            self._unlink(aside)
        self._seen.pop(blob_id, None)
        holder = info.owner or {}
        log.warning(
            "b10cache: broke stale lock %s (%s; holder %s pid %s)",
            path,
            reason,
            holder.get("host", "?"),
            holder.get("pid", "?"),
        )
        return True

    def refresh(self, held: HeldLock) -> bool:
        """Touch our lock; False when it is no longer ours (broken by a replica that thought
        we were dead: we keep going, at worst the blob is fetched twice)."""
        try:
            if held.fd is not None:
                os.utime(held.fd)
            st = os.stat(held.path)
        except OSError:
            return False
        return st.st_ino == held.ino

    def release(self, held: HeldLock) -> None:
        """Remove our lock if it still is ours."""
        if held.fd is not None:
            with contextlib.suppress(OSError):
                os.close(held.fd)
            held.fd = None
        try:
            info = self.inspect_lock(held.blob_id)
        except OSError:
            return
        if (
            info is not None
            and info.ino == held.ino
            and (info.owner or {}).get("token")
            in (
                held.token,
                None,
            )
        ):
            self._unlink(held.path)
