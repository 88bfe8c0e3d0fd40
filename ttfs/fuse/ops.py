"""FuseOps: pyfuse3's ``Operations`` translated onto :class:`~ttfs.vfs.core.ModelFs`.

A translator and nothing else (style anchors G2): each handler converts pyfuse3's types, calls
the core, builds ``EntryAttributes``/``FileInfo`` and passes every exception through the one
:func:`boundary`. pyfuse3 lets only ``FUSEError`` out of a handler; anything else would end
``pyfuse3.main()`` and the mount, so the boundary maps *every* exception to an errno with
:func:`ttfs.vfs.core.errno_for` (``trio.Cancelled`` is a BaseException and passes untouched,
as it must).

Complete, verified files are answered as symlinks into the blob store (the fast path,
:mod:`ttfs.vfs.fastpath`); this layer passes the requester's pid to ``lookup`` and
``readlink`` and gives the core the kernel's entry invalidation.

Mount-wide choices made here (docs/semantics.md): ``keep_cache=True`` and never ``direct_io``
(files are immutable; MAP_SHARED mmap needs the page cache), entry and attribute timeouts of a
day (nothing ever changes under a mount), and every write-type request answers EROFS.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from ..errors import TtfsError
from ..vfs.core import Attr, ModelFs, erofs, errno_for

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Files are immutable by hash for the life of the mount: let the kernel cache entries and
# attributes "forever" (a day; the kernel stores the deadline in jiffies).
TIMEOUT = 24 * 3600.0
# Errors that are ordinary answers, not failures worth a log line above DEBUG.
_QUIET = frozenset(
    {errno.ENOENT, errno.ENODATA, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ESTALE}
)


def boundary(op: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Map every exception of handler ``op`` to ``FUSEError`` (the mount's one error boundary)."""

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(fn)
        async def handler(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(*args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except Exception as e:
                code = errno_for(e)
                if isinstance(e, TtfsError):
                    log.log(e.log_level, "%s failed (%s): %s", op, errno.errorcode.get(code), e)
                elif isinstance(e, OSError):
                    level = logging.DEBUG if code in _QUIET else logging.WARNING
                    log.log(level, "%s: %s", op, e)
                else:
                    log.exception("%s: unexpected error, replying EIO", op)
                raise pyfuse3.FUSEError(code) from e

        return handler

    return decorate


def entry(attr: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = attr.ino
    e.generation = 0
    e.entry_timeout = TIMEOUT
    e.attr_timeout = TIMEOUT
    e.st_mode = attr.mode
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = 0
    e.st_size = attr.size
    e.st_blksize = 1024 * 1024
    e.st_blocks = attr.blocks
    e.st_atime_ns = attr.mtime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.mtime_ns
    return e


def invalidate_entry(parent: int, name: str) -> None:
    """Make the kernel forget ``name`` in ``parent`` (the fast path switched its type).

    Asynchronous: the synchronous call deadlocks when made while the kernel waits on a
    request of ours for that entry. An entry the kernel does not hold is no error."""
    pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


class FuseOps(pyfuse3.Operations):
    """pyfuse3 request handlers for one :class:`ModelFs`."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: ModelFs) -> None:
        super().__init__()
        self.fs = fs
        fs.set_invalidator(invalidate_entry)

    async def invalidate_blob(self, blob_id: str) -> None:
        """Drop the kernel's cached pages of every file whose content is ``blob_id`` (after a
        failed verification discarded it: ``keep_cache`` would otherwise serve the bad bytes).

        In a worker thread: the kernel waits for page locks held by reads in flight, which only
        this event loop can answer.
        """
        for ino in self.fs.inodes_of(blob_id):
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
            except OSError as e:  # ENOENT: the kernel never looked the inode up
                log.debug("invalidate inode %d: %s", ino, e)

    # -- metadata ------------------------------------------------------------------------
    @boundary("lookup")
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return entry(await self.fs.lookup(parent_inode, _name(name), ctx.pid, ctx.uid))

    @boundary("getattr")
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry(self.fs.getattr(inode))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pass  # inodes are static for the life of the mount

    @boundary("opendir")
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.fs.opendir(inode)
        return inode

    @boundary("readdir")
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, attr, next_id in self.fs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry(attr), next_id):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    @boundary("statfs")
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.fs.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = st.block_size
        s.f_blocks = st.blocks
        s.f_bfree = s.f_bavail = 0
        s.f_files = st.files
        s.f_ffree = s.f_favail = 0
        s.f_namemax = st.namemax
        return s

    @boundary("access")
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return self.fs.access(inode, mode)

    @boundary("readlink")
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(inode, ctx.pid, ctx.uid)

    # -- data ----------------------------------------------------------------------------
    @boundary("open")
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh = await self.fs.open(inode, flags)
        if self.fs.is_control(inode):  # made at open, of no size known before: never cached
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=False)
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=True, nonseekable=False)

    @boundary("read")
    # pyfuse3's stub says bytes; its handler takes any contiguous buffer (PyObject_GetBuffer
    # in handlers.pxi), so a bytearray filled by preadv goes to the kernel without a copy.
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:  # type: ignore[override]
        return await self.fs.read(fh, off, size)

    async def flush(self, fh: int) -> None:
        pass

    @boundary("release")
    async def release(self, fh: int) -> None:
        self.fs.release(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    # -- extended attributes (the control protocol) ----------------------------------------
    @boundary("getxattr")
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.getxattr(inode, _name(name))

    @boundary("listxattr")
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return [os.fsencode(n) for n in self.fs.listxattr(inode)]

    @boundary("setxattr")
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self.fs.setxattr(inode, _name(name), value)

    # -- everything that would write: EROFS ------------------------------------------------
    @boundary("removexattr")
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise erofs("removexattr")

    @boundary("setattr")
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise erofs("setattr")

    @boundary("write")
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise erofs("write")

    @boundary("create")
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise erofs(f"create {_name(name)}")

    @boundary("mknod")
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise erofs(f"mknod {_name(name)}")

    @boundary("mkdir")
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise erofs(f"mkdir {_name(name)}")

    @boundary("unlink")
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise erofs(f"unlink {_name(name)}")

    @boundary("rmdir")
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise erofs(f"rmdir {_name(name)}")

    @boundary("symlink")
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise erofs(f"symlink {_name(name)}")

    @boundary("rename")
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise erofs(f"rename {_name(name_old)}")

    @boundary("link")
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise erofs(f"link {_name(new_name)}")
