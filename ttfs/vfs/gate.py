"""Lazy links: the kernel reads files still being fetched, and the daemon fills each range first.

Why (docs/mount.md, "Lazy links"): a file opened before its blob is complete is read through the
daemon for as long as it stays open (the fast path only answers later lookups). A mapped loader
(safetensors, ``torch.load(mmap=True)``) then pays a FUSE round trip per 1 MiB, a second copy of
every page in the page cache, and the kernel's slower fault path on FUSE pages: 2.6 CPU-s per
GiB against 0.85 from a local file on the 2-core VM. With ``--lazy-links`` every file is a
symlink into the blob store from its first lookup, and the blob file (sparse, written by the
fetcher in place) is read by the kernel; nothing but the bytes a read is about to see must be
fetched first.

How: Linux >= 6.14 lets one process hold every read of a file range until it says so (fanotify
pre-content events, made for hierarchical storage managers). The links point into ``view``, a
read-only bind mount of ``<cache>/blobs``; the gate marks that mount (not the store's own path,
so the fetcher's writes, the workers and verification never wait on it) for ``FAN_PRE_ACCESS``.
A ``read()`` through a link is held until the daemon answers its byte range; an ``mmap()`` is
held until the whole mapped range is local (the kernel asks at ``mmap`` time, not per fault).
Once a blob is verified the gate stops asking for it (an ignore mark on its inode): reads are
then plain local reads.

The danger, and the guard: when a fanotify group goes away the kernel *allows* every pending
event, and with the mark gone a read of a range never fetched returns the zeros of the sparse
file. A daemon killed with -9 would hand a loader zeros as model weights. So a small guard
process holds a second descriptor of the group (the group lives while it does) and, once the
daemon is gone, fails every read of a file not verified yet with EIO, as the kernel fails reads
of a FUSE mount whose daemon died (which bytes of a partial file are whole is known only to the
daemon: a run cut mid-page leaves an allocated page with zeros in it); verified blobs are
ignored by the group, so their reads go on. It unmounts the view once no file there is open and
exits. Only a kill of both the daemon and its guard leaves readers of a partial file
unprotected (docs/mount.md).

This module is plain ``ctypes`` and ``os`` (no trio, no ttfs import): run as a script, it is the
guard.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import select
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

_FAN_CLOEXEC = 0x1
_FAN_NONBLOCK = 0x2
_FAN_CLASS_PRE_CONTENT = 0x8
_FAN_UNLIMITED_QUEUE = 0x10
_FAN_MARK_ADD = 0x1
_FAN_MARK_MOUNT = 0x10
_FAN_MARK_IGNORED_MASK = 0x20
_FAN_MARK_IGNORED_SURV_MODIFY = 0x40
_FAN_PRE_ACCESS = 0x00100000
_FAN_ALLOW = 0x1
_FAN_DENY = 0x2
_INFO_RANGE = 6
_AT_FDCWD = -100
_MS_RDONLY = 0x1
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MNT_DETACH = 0x2

_META = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO = struct.Struct("=BBH")  # info_type, pad, len
_RANGE = struct.Struct("=QQ")  # offset, count (after the header and 4 bytes of padding)
_RANGE_RECORD = _INFO.size + 4 + _RANGE.size
_RESPONSE = struct.Struct("=iI")  # fd, response

WHOLE_FILE = 1 << 62
"""The length of an event that names no range: the daemon then fills the whole file, never
nothing (the kernel always sends a range with a pre-content event; this is the safe reading if
it ever does not)."""

VIEW_PREFIX = "view."
"""The view of a daemon is ``<cache>/view.<pid>``: a view a killed daemon's guard still holds
(files open in it) never collides with the next daemon's."""


class Event(NamedTuple):
    """One held read: ``fd`` is the file (opened by the kernel for us), ``pid`` the reader."""

    fd: int
    offset: int
    length: int
    pid: int


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return result


def deny(err: int) -> int:
    """The response that fails the held read with ``err`` (EIO, EAGAIN, ... not any errno)."""
    return _FAN_DENY | ((err & 0xFF) << 24)


def parse(buf: bytes) -> list[Event]:
    """The events in one ``read`` of the group's descriptor."""
    events: list[Event] = []
    off = 0
    while off + _META.size <= len(buf):
        length, _vers, _, meta_len, _mask, fd, pid = _META.unpack_from(buf, off)
        start, count = 0, WHOLE_FILE  # no range record: hold the read for the whole file
        info = off + meta_len
        end = min(off + length, len(buf))
        while info + _INFO.size <= end:
            kind, _, info_len = _INFO.unpack_from(buf, info)
            whole = info_len >= _RANGE_RECORD and info + _RANGE_RECORD <= end
            if kind == _INFO_RANGE and whole:
                start, count = _RANGE.unpack_from(buf, info + 8)
            info += max(info_len, _INFO.size)
        if fd >= 0:
            events.append(Event(fd, start, count, pid))
        off += max(length, _META.size)
    return events


def read_events(fd: int, most: int) -> list[Event]:
    """At most ``most`` pending events of the group ``fd`` (non-blocking: empty when none).

    Each event read arrives with a descriptor opened in the reading process. A read the kernel
    cannot open a descriptor for (EMFILE) is *denied*: its reader gets EPERM. So a process reads
    only as many events as it has descriptors to spare; the rest wait in the group's queue,
    which is unlimited (a queue that overflowed would drop a held read, and a dropped
    pre-content event lets the read through to the zeros of a sparse file).
    """
    try:  # an event is at least its metadata; one with a range twice that
        return parse(os.read(fd, max(most, 2) * _META.size))
    except BlockingIOError:
        return []


def respond(fd: int, event: Event, err: int = 0) -> None:
    """Release the held read: allowed when ``err`` is 0, else failed with ``err``."""
    try:
        os.write(fd, _RESPONSE.pack(event.fd, _FAN_ALLOW if err == 0 else deny(err)))
    finally:
        os.close(event.fd)


def _umount(path: Path, flags: int = 0) -> bool:
    """True once nothing is mounted at ``path`` (EINVAL: not a mount point; ENOENT: gone)."""
    if _libc().umount2(os.fsencode(path), flags) == 0:
        return True
    return ctypes.get_errno() in (errno.EINVAL, errno.ENOENT)


def clean_stale(cache: Path) -> None:
    """Remove the views of daemons that are gone and whose guard unmounted them (or died)."""
    # Imported here: the daemon calls this, the guard (this file run as a plain script, with no
    # package to import from) never does.
    from ..procs import process_alive

    with contextlib.suppress(OSError):
        for entry in os.scandir(cache):
            if not entry.name.startswith(VIEW_PREFIX):
                continue
            pid = entry.name[len(VIEW_PREFIX) :]
            if pid.isdigit() and process_alive(int(pid)):
                continue
            path = Path(entry.path)
            if not os.path.ismount(path) or _umount(path):
                with contextlib.suppress(OSError):
                    path.rmdir()


class Gate:
    """The view mount, the fanotify group that holds reads through it, and the guard.

    Build with :meth:`open`; every call but :meth:`open` and :meth:`close` is non-blocking.
    """

    def __init__(self, fd: int, blobs: Path, view: Path, guard: subprocess.Popen[bytes]) -> None:
        self.fd = fd
        self.blobs = blobs
        self.view = view
        self._guard = guard

    @classmethod
    def open(cls, blobs: Path, cache: Path) -> Gate:
        """Mount the view of ``blobs`` under ``cache``, mark it, start the guard.

        Raises:
            OSError: with the reason lazy links cannot work here (kernel older than 6.14, a
                file system without pre-content events such as tmpfs or NFS, not root).
        """
        cache, blobs = cache.absolute(), blobs.absolute()  # link targets are absolute
        clean_stale(cache)
        libc = _libc()
        view = cache / f"{VIEW_PREFIX}{os.getpid()}"
        blobs.mkdir(parents=True, exist_ok=True)
        view.mkdir(exist_ok=True)
        fd = -1
        try:
            src, dst = os.fsencode(blobs), os.fsencode(view)
            _check(libc.mount(src, dst, None, _MS_BIND, None), "bind mount")
            flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
            _check(libc.mount(None, dst, None, flags, None), "read-only remount")
            fd = _check(
                libc.fanotify_init(
                    _FAN_CLASS_PRE_CONTENT | _FAN_UNLIMITED_QUEUE | _FAN_CLOEXEC | _FAN_NONBLOCK,
                    os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC,
                ),
                "fanotify_init",
            )
            mark = libc.fanotify_mark(
                fd,
                _FAN_MARK_ADD | _FAN_MARK_MOUNT,
                ctypes.c_uint64(_FAN_PRE_ACCESS),
                _AT_FDCWD,
                dst,
            )
            _check(mark, "pre-content mark")
            guard = _spawn_guard(fd, view)
        except OSError:
            if fd >= 0:
                os.close(fd)
            if _umount(view, _MNT_DETACH):
                with contextlib.suppress(OSError):
                    view.rmdir()
            raise
        return cls(fd, blobs, view, guard)

    def target(self, blob_path: Path | str) -> str:
        """The path of ``blob_path`` in the view: what a lazy link points at."""
        return str(self.view / os.path.relpath(blob_path, self.blobs))

    def events(self, most: int) -> list[Event]:
        return read_events(self.fd, most)

    def answer(self, event: Event, err: int = 0) -> None:
        respond(self.fd, event, err)

    def settle(self, fd: int) -> None:
        """Stop holding reads of the file ``fd`` is open on (its blob is verified)."""
        flags = _FAN_MARK_ADD | _FAN_MARK_IGNORED_MASK | _FAN_MARK_IGNORED_SURV_MODIFY
        mask = ctypes.c_uint64(_FAN_PRE_ACCESS)
        _check(_libc().fanotify_mark(self.fd, flags, mask, fd, None), "ignore mark")

    def close(self) -> None:
        """Unmount the view if no file in it is open, and let go of the group: the guard
        answers whatever comes later and unmounts the view once it is free (a guard that was
        killed meanwhile is started again first: the group must outlive this descriptor)."""
        if _umount(self.view):
            with contextlib.suppress(OSError):
                self.view.rmdir()
        elif self._guard.poll() is not None:
            with contextlib.suppress(OSError):
                self._guard = _spawn_guard(self.fd, self.view)
        os.close(self.fd)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._guard.wait(timeout=0)  # reaped when it already exited; else it outlives us


def _spawn_guard(fd: int, view: Path) -> subprocess.Popen[bytes]:
    """Start the guard of group ``fd`` and ``view`` for this process (see :func:`guard`)."""
    max_fd = str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    return subprocess.Popen(
        # This file as a script, isolated and without site: the guard lives as long as the
        # mount and needs nothing but the standard library (13 MB resident, no ttfs import).
        [sys.executable, "-I", "-S", __file__, str(fd), str(view), str(os.getpid()), max_fd],
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C of the daemon's terminal is not the guard's
    )


def _fail_taken(fd: int, max_fd: int) -> None:
    """Fail the reads the daemon had taken from the group but not answered when it died.

    The kernel matches a response to a held read by the descriptor number the read's file got
    in the process that took it; the guard never saw those numbers, but each is below that
    process's descriptor limit, and a response for a number with no held read is refused
    (ENOENT). Once per daemon death: 0.04 s for a limit of 20,000, 2.4 s for 2^20 (measured on
    the 2-core VM while a test suite ran).
    """
    for n in range(max_fd):
        try:
            os.write(fd, _RESPONSE.pack(n, deny(errno.EIO)))
        except OSError:
            pass


def guard(fd: int, view: Path, daemon: int, max_fd: int) -> None:
    """Wait for the daemon to end, then answer for it until the view can be unmounted."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        pidfd = os.pidfd_open(daemon)
    except OSError:
        pidfd = -1
    if pidfd >= 0:
        select.select([pidfd], [], [])
        os.close(pidfd)
    _fail_taken(fd, max_fd)
    delay = 0.02
    while True:
        try:  # a few at a time: each is answered (and its descriptor closed) at once
            events = read_events(fd, 64)
        except OSError:  # never die of it: without the guard, held reads see zeros
            events = []
        for event in events:
            with contextlib.suppress(OSError):  # its reader is gone (interrupted)
                respond(fd, event, errno.EIO)
        if _umount(view):
            with contextlib.suppress(OSError):
                view.rmdir()
            return
        select.select([fd], [], [], delay)
        delay = min(delay * 2, 2.0)


if __name__ == "__main__":  # the guard process (Gate.open starts it)
    guard(int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
