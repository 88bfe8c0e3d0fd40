"""The owner lock of a cache directory: ``flock`` on ``<cache>/owner.lock`` plus a record.

Why ``flock``: the kernel drops it when the holder dies, by ``kill -9`` too, so there is never a
stale owner to break (unlike the b10fs lock files, which must work across hosts on NFS; a block
store is local to one host). The lock file holds one JSON record, rewritten by its holder: pid,
command line and the control socket (:mod:`ttfs.owner.server`), so a process that finds the
cache owned can say by whom and ask the owner for its blobs.

The descriptor is ``O_CLOEXEC``: a child the owner starts never inherits the lock, so the lock
is gone the moment the owner is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from ..blocks import perms
from ..errors import CacheBusy, CacheError

log = logging.getLogger(__name__)

LOCK_NAME = "owner.lock"
SOCKET_NAME = "owner.sock"
# sun_path is 108 bytes; a longer socket path goes to the temp directory under a hashed name.
_MAX_SOCKET_PATH = 100


def this_command() -> str:
    """A short description of this process for the owner record (no secrets: argv only)."""
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    return " ".join(argv)[:200]


def socket_path(cache_dir: Path) -> Path:
    """Where the owner of ``cache_dir`` listens: in the cache directory when the path fits."""
    inside = cache_dir / SOCKET_NAME
    if len(os.fsencode(str(inside))) <= _MAX_SOCKET_PATH:
        return inside
    digest = hashlib.sha256(os.fsencode(str(cache_dir.resolve()))).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"ttfs-owner-{digest}.sock"


@dataclass(frozen=True, slots=True)
class OwnerInfo:
    """Who owns a cache directory (read from its lock file)."""

    pid: int
    command: str
    socket: str | None

    def describe(self) -> str:
        return f"pid {self.pid} ({self.command})"


class OwnerLock:
    """The held lock; :meth:`release` (or process exit) gives the directory up."""

    def __init__(self, cache_dir: Path, fd: int, command: str) -> None:
        self.cache_dir = cache_dir
        self.fd: int | None = fd
        self.info = OwnerInfo(os.getpid(), command, None)
        self._write()

    def advertise(self, socket: Path) -> None:
        """Record the socket the owner now serves clients on."""
        self.info = OwnerInfo(self.info.pid, self.info.command, str(socket))
        self._write()

    def _write(self) -> None:
        assert self.fd is not None
        record = json.dumps(
            {"pid": self.info.pid, "command": self.info.command, "socket": self.info.socket}
        ).encode()
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, record, 0)
        except OSError as e:
            log.warning("cannot write the owner record of %s: %s", self.cache_dir, e)

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # before unlocking: a reader never sees our record unlocked
        with contextlib.suppress(OSError):
            os.close(fd)  # drops the flock

    def __enter__(self) -> OwnerLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _parse(raw: bytes) -> OwnerInfo | None:
    try:
        doc = json.loads(raw)
        return OwnerInfo(int(doc["pid"]), str(doc.get("command", "?")), doc.get("socket"))
    except (ValueError, KeyError, TypeError):
        return None


def read_owner(cache_dir: Path) -> OwnerInfo | None:
    """The current owner of ``cache_dir``, or None when nobody holds it."""
    try:
        fd = os.open(cache_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: read the record below
        else:
            return None  # nobody holds it (our shared lock goes with the descriptor)
        for _ in range(50):  # the holder writes its record right after locking
            info = _parse(os.pread(fd, 4096, 0))
            if info is not None:
                return info
            time.sleep(0.01)
        return OwnerInfo(0, "unknown", None)
    finally:
        os.close(fd)


def claim(cache_dir: Path, command: str | None = None) -> OwnerLock | OwnerInfo:
    """Take the directory (an :class:`OwnerLock`) or say who has it (an :class:`OwnerInfo`).

    Raises:
        CacheError: the directory or its lock file cannot be created.
    """
    command = command or this_command()
    try:
        perms.make_private_dir(cache_dir)  # the cache is private (ttfs/blocks/perms.py)
        fd = perms.open_private(cache_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    except OSError as e:
        raise CacheError(f"cannot use cache directory {cache_dir}: {e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise CacheError(f"cannot lock cache directory {cache_dir}: {e}") from e
        return read_owner(cache_dir) or OwnerInfo(0, "unknown", None)
    return OwnerLock(cache_dir, fd, command)


async def claim_or_wait(cache_dir: Path, wait: float, command: str | None = None) -> OwnerLock:
    """Take the directory, waiting up to ``wait`` seconds for its owner to finish.

    Raises:
        CacheBusy: still owned after ``wait`` seconds (the message names the owner).
        CacheError: the directory cannot be used at all.
    """
    deadline = trio.current_time() + wait
    told = False
    while True:
        got = await trio.to_thread.run_sync(claim, cache_dir, command)
        if isinstance(got, OwnerLock):
            if told:
                log.info("cache directory %s is free now", cache_dir)
            return got
        if trio.current_time() >= deadline:
            raise CacheBusy(
                f"cache directory {cache_dir} is in use by {got.describe()}; "
                f"waited {wait:g}s (TTFS_OWNER_WAIT)"
            )
        if not told:
            log.warning(
                "cache directory %s is in use by %s; waiting up to %gs for it",
                cache_dir,
                got.describe(),
                wait,
            )
            told = True
        await trio.sleep(min(0.25, max(0.0, deadline - trio.current_time())))
