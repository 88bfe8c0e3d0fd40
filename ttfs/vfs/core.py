"""ModelFs: the read-only model filesystem, without a kernel.

:class:`ModelFs` answers ``lookup``, ``getattr``, ``readdir``, ``open``, ``read``, ``release``,
``statfs`` and the extended attributes of the control protocol in ttfs types (:class:`Attr`,
:data:`HandleId`); ``ttfs/fuse/ops.py`` only translates these to pyfuse3. Everything except
``open`` and ``read`` is answered from the in-memory :class:`~ttfs.vfs.tree.Tree`, so listing
and ``stat`` never reach the origin.

The data path: ``read`` feeds the inode's readahead :class:`~ttfs.vfs.readahead.StreamTable`
(which may queue blocks ahead at READAHEAD), then asks the fetcher for the bytes at DEMAND. The
fetcher's single-flight makes concurrent readers of one block share one request.

Background work, owned by :func:`open_model_fs`'s nursery:

* the *opener* adds every file's blob to the fetcher (no network; it reads the cache index), so
  status knows what is already local;
* the *prefetch pass* (unless ``--no-prefetch``) requests every block in the order of
  :mod:`ttfs.fetch.prefetch` and waits for every blob to be whole and verified;
* a *materialize pass*, started by :meth:`ModelFs.materialize_nowait` (the
  ``user.ttfs.materialize`` attribute), does the same and records the outcome that
  ``ttfs materialize`` waits for;
* the *evictor* (with ``--cache-size``) keeps the cache directory under its size while the
  mount runs: every blob of the mount stays open in the store for the mount's life, so eviction
  only ever removes blobs of other models (docs/semantics.md, "Cache size").

Errors: methods raise :class:`OSError` with an errno for filesystem answers (ENOENT, EROFS,
EISDIR, ...) and let :class:`~ttfs.errors.TtfsError` through for fetch failures;
:func:`errno_for` is the one mapping the FUSE boundary applies to both.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, ItemsView, Iterator, ValuesView
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NewType

import trio

from ..blocks.identity import BlobKey, key_of_path
from ..control import (
    CHILD_STATUS_PREFIX,
    CONTROL_FILE,
    MATERIALIZE_XATTR,
    STATUS_XATTR,
    XATTR_MAX,
)
from ..errors import CacheError, DownloadError, TransientError, TtfsError, UserError
from ..fetch import Fetcher, FetcherStatistics, Priority, Source
from ..fetch.prefetch import SMALL_FILE_LIMIT, Segment, initial_segments, plan
from ..manifest import Pointer
from .fastpath import INODE_SHIFT, readable_by_others, visible_to
from .gate import Gate
from .lazy import LazyReads
from .readahead import ReadaheadConfig, StreamTable
from .trace import SAVE_QUIET, Recorder, Trace, TraceStore, block_counts, manifest_digest
from .tree import ROOT_INODE, Inode, Node, Tree

log = logging.getLogger(__name__)

HandleId = NewType("HandleId", int)

FILE_MODE = stat.S_IFREG | 0o444
LINK_MODE = stat.S_IFLNK | 0o777
DIR_MODE = stat.S_IFDIR | 0o555
# st_blksize: stdio and Python's buffered IO size their buffers from it; 1 MiB is the largest
# FUSE request the kernel sends (max_pages 256), so one buffered read is one request.
BLKSIZE = 1024 * 1024
_MAX_FAILURES_SHOWN = 20
_MAX_REASON = 300
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
_SNAPSHOT_YIELD = 2000  # file documents built between checkpoints (other requests run)
_JSON = {True: "true", False: "false"}
_JS: dict[str | None, str] = {}


def _js(value: str | None) -> str:
    """``json.dumps(value)`` for the few distinct strings every file repeats (memoised)."""
    out = _JS.get(value)
    if out is None:
        if len(_JS) > 1024:
            _JS.clear()
        out = _JS[value] = json.dumps(value)
    return out


# Blobs opened at once by the background opener (each open is a thread hop, a stat and an index
# read; a few in parallel hide the hops' latency, more only contend for the index).
_OPENERS = 4
# How often the evictor looks at the bytes landed since its last pass.
EVICT_INTERVAL = 2.0


def erofs(what: str) -> OSError:
    return OSError(errno.EROFS, f"read-only file system: {what}")


def errno_for(exc: BaseException) -> int:
    """The errno a failed request replies with (docs/semantics.md, "Errors").

    A transient origin error that outlived the retry budget is EIO (EAGAIN would make readers
    spin); a user error found while reading (an unsupported resolution type) is EIO too; every
    other ttfs error carries its own errno; OSErrors keep theirs; anything else is EIO.
    """
    cause = exc.cause if isinstance(exc, DownloadError) else exc
    if isinstance(cause, TransientError | UserError):
        return errno.EIO
    if isinstance(exc, TtfsError):
        return int(getattr(exc, "errno", errno.EIO))
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


@dataclass(frozen=True, slots=True)
class Attr:
    """What ``stat`` shows for one inode."""

    ino: Inode
    mode: int
    size: int
    nlink: int
    uid: int
    gid: int
    mtime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def blocks(self) -> int:  # st_blocks is in 512-byte units: du shows the full size
        return -(-self.size // 512)


@dataclass(frozen=True, slots=True)
class FsStats:
    """``statfs``: a read-only filesystem exactly as big as its files, with nothing free."""

    block_size: int
    blocks: int
    files: int
    namemax: int = 255


@dataclass(frozen=True, slots=True)
class FsOptions:
    prefetch: bool = True
    readahead: ReadaheadConfig = field(default_factory=ReadaheadConfig)
    small_file_limit: int = SMALL_FILE_LIMIT
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    mtime_ns: int = field(default_factory=time.time_ns)
    info: dict[str, Any] = field(default_factory=dict)  # shown in the root status
    traces: TraceStore | None = None  # record and replay access traces (None: off)
    # Serve complete, verified files as symlinks into the blob store (ttfs/vfs/fastpath.py).
    fast_path: bool = True
    # Other users may read the mount (allow_other): links only to blob files all can read.
    shared_readers: bool = False
    # Links for files still being fetched too, their reads held until local (ttfs/vfs/gate.py).
    lazy_links: bool = False


@dataclass(slots=True)
class _File:
    """Per file: its blob once opened, its readahead streams, its counters."""

    node: Node
    pointer: Pointer
    streams: StreamTable | None = None  # made at the first read of a partial blob
    source: Source | None = None
    reads: int = 0
    read_bytes: int = 0
    error: str | None = None
    static_json: str | None = None  # the unchanging head of its status document, encoded once
    link: BlobKey | None = None  # set while served by the kernel as a link (fast path)
    lazy: bool = False  # the link is a lazy one: blob not verified yet, reads held by the gate
    fast_off: str | None = None  # why the fast path does not serve this file, once known
    looked_up: bool = False  # the kernel may hold a dentry for the regular file
    served_before: BlobKey | None = None  # blob file identity when a mount last linked it

    @property
    def link_ino(self) -> Inode:
        return Inode(self.node.ino + INODE_SHIFT)


class _Files:
    """The per-file state of a mount, by inode, made on first use: a 10^5-file mount is ready
    (its tree visible) before 10^5 of them exist (0.2-0.3 CPU-s of its start). Once every one
    is asked for (:meth:`values`, :meth:`items`: prefetch planning, status, statfs) they are
    kept in manifest order, as the tree lists its files."""

    def __init__(self, tree: Tree) -> None:
        self._tree = tree
        self._made: dict[Inode, _File] = {}
        self._complete = False

    def get(self, ino: Inode) -> _File | None:
        f = self._made.get(ino)
        if f is None and not self._complete:
            node = self._tree.node(ino)
            if node is None or node.pointer is None:
                return None
            f = self._made[ino] = _File(node, node.pointer)
        return f

    def __getitem__(self, ino: Inode) -> _File:
        f = self.get(ino)
        if f is None:
            raise KeyError(ino)
        return f

    def __len__(self) -> int:
        return self._tree.file_count

    def _all(self) -> dict[Inode, _File]:
        if not self._complete:
            made = self._made
            self._made = {
                n.ino: made.get(n.ino) or _File(n, n.pointer)
                for n in self._tree.files()
                if n.pointer is not None
            }
            self._complete = True
        return self._made

    def values(self) -> ValuesView[_File]:
        return self._all().values()

    def items(self) -> ItemsView[Inode, _File]:
        return self._all().items()


@dataclass(slots=True)
class _Pass:
    """One prefetch or materialize pass over every file."""

    kind: str
    state: str = "waiting"  # waiting → planning → running → done | failed
    failures: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


class ModelFs:
    """The filesystem of one mount. Build with :func:`open_model_fs`."""

    def __init__(self, tree: Tree, fetcher: Fetcher | None, options: FsOptions) -> None:
        self.tree = tree
        self._fetcher = fetcher
        self.options = options
        self._files = _Files(tree)
        # A mount answers lookups from the tree before its block store and fetcher exist
        # (serve attaches them once the mount is ready); open and read wait for this.
        self._attached = trio.Event()
        self._backend_error: TtfsError | None = None
        # Created now, not when the trace task starts: a loader's first reads (the ones a trace
        # is for) may arrive before that task has computed the manifest's digest.
        self._recorder: Recorder | None = Recorder() if options.traces is not None else None
        self._replayed = trio.Event()  # the trace (if any) is queued; prefetch plans after it
        self._trace_doc: dict[str, Any] = {"state": "off" if options.traces is None else "waiting"}
        if fetcher is not None:
            self._attached.set()
        self._handles: dict[HandleId, _File] = {}
        self._next_handle = 1
        self._cache_bytes: dict[str, int] = {}  # blob id → bytes local when first opened
        self._opened = trio.Event()
        self._serving = trio.Event()
        self._prefetch: _Pass | None = _Pass("prefetch") if options.prefetch else None
        self._materialize: _Pass | None = None
        self._generation = 0
        self._nursery: trio.Nursery | None = None
        self._failures: dict[str, str] = {}
        # The status file (docs/semantics.md, "Control protocol"): one inode past the tree's,
        # not listed, shadowed by a manifest file of the same name.
        self.control_ino = Inode(len(tree) + 1)
        self._snapshots: dict[HandleId, bytes] = {}
        # Fast path: why it is off for the whole mount (None: on), the kernel notifier the FUSE
        # layer installs, blobs being checked again after a change.
        self._fast_disabled: str | None = None if options.fast_path else "off (--no-fast-path)"
        self._invalidate: Callable[[Inode, str], None] | None = None
        self._rechecking: dict[str, trio.Event] = {}  # set once changed blocks are dropped
        # Files waiting for their blob to be done before the fast path can serve them (granted
        # by the fetcher's done listener: no task per file, so 10^5 files park nothing).
        self._awaiting_done: dict[str, list[_File]] = {}
        # Lazy links (docs/mount.md): the held reads' answerer once a gate is attached, else why
        # they are off.
        self._lazy: LazyReads | None = None
        self._lazy_off: str = "on, waiting for the cache" if options.lazy_links else "off"

    @property
    def file_count(self) -> int:
        return len(self._files)

    @property
    def attached(self) -> Fetcher | None:
        """The fetcher once attached, else None (for readers that must not wait, e.g. the
        metrics endpoint, which is up before the mount)."""
        return self._fetcher

    @property
    def fetcher(self) -> Fetcher:
        """The fetcher; only valid once attached (every caller waits for that first)."""
        assert self._fetcher is not None, "the fetcher is not attached yet"
        return self._fetcher

    def attach(self, fetcher: Fetcher, gate: Gate | None = None) -> None:
        """Give the mount its fetcher (serve does so right after the mount is ready), and the
        gate of lazy links when they are on and could be set up."""
        self._fetcher = fetcher
        if gate is not None:
            self._lazy = LazyReads(
                gate, fetcher, self.options.readahead, self._recorder, self._rechecking.get
            )
            fetcher.discard_listeners.append(self._lazy.forget)
            self._lazy_off = "on"
        self._attached.set()

    def lazy_links_off(self, reason: str) -> None:
        """Lazy links were asked for and cannot work here: say why in the status."""
        log.warning("lazy links off: %s", reason)
        self._lazy_off = f"off: {reason}"

    def fail(self, error: TtfsError) -> None:
        """The fetcher cannot be made (unusable cache): every open fails with ``error``."""
        self._backend_error = error
        self._failures["(all)"] = _short(error)
        self._attached.set()
        self._opened.set()

    # -- metadata (memory only; never blocks) ---------------------------------------------
    def _node(self, ino: int) -> Node:
        node = self.tree.node(ino)
        if node is None:
            raise OSError(errno.ENOENT, f"no inode {ino}")
        return node

    def _attr(self, node: Node) -> Attr:
        opts = self.options
        if node.is_dir:
            return Attr(node.ino, DIR_MODE, 0, 2 + node.subdirs, opts.uid, opts.gid, opts.mtime_ns)
        return Attr(node.ino, FILE_MODE, node.size, 1, opts.uid, opts.gid, opts.mtime_ns)

    def _control_attr(self) -> Attr:
        # Size 0: the content is made at open and read with direct I/O, past any size.
        opts = self.options
        return Attr(self.control_ino, FILE_MODE, 0, 1, opts.uid, opts.gid, opts.mtime_ns)

    def is_control(self, ino: int) -> bool:
        """Whether ``ino`` is the status file (opened with direct I/O, never cached)."""
        return ino == self.control_ino

    def getattr(self, ino: int) -> Attr:
        if ino == self.control_ino:
            return self._control_attr()
        f = self._link_file(ino)
        if f is not None:
            return self._link_attr(f)
        return self._attr(self._node(ino))

    async def lookup(self, parent: int, name: str, pid: int = 0, uid: int | None = None) -> Attr:
        """The entry ``name`` of directory ``parent``, as seen by process ``pid`` of ``uid``.

        A complete, verified file is answered as a symlink into the blob store (the fast path);
        with the fast path on, the lookup of a file opens its blob first (reading the cache
        index, no network), so a remount on a warm cache serves links from the first lookup.
        """
        node = self._node(parent)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, node.path)
        child = self.tree.child(node, name)
        if child is None:
            if node.ino == ROOT_INODE and name == CONTROL_FILE:
                return self._control_attr()
            raise OSError(errno.ENOENT, name)
        if child.pointer is None:
            return self._attr(child)
        f = self._files[child.ino]
        if self._fast_disabled is None and f.source is None:
            try:
                await self._source(f)
            except DownloadError:
                pass  # served (and reported) by the daemon path
        if self._serves_link(f, pid, uid):
            return self._link_attr(f)
        f.looked_up = True
        return self._attr(child)

    def opendir(self, ino: int) -> None:
        if ino == self.control_ino:
            raise OSError(errno.ENOTDIR, CONTROL_FILE)
        if not self._node(ino).is_dir:
            raise OSError(errno.ENOTDIR, self._node(ino).path)

    def readdir(self, ino: int, start: int) -> Iterator[tuple[str, Attr, int]]:
        """Entries after the ``start``-th, each with the offset that resumes after it."""
        node = self._node(ino)
        if node.children is None:
            raise OSError(errno.ENOTDIR, node.path)
        for i in range(start, len(node.entries)):
            name = node.entries[i]
            child = self.tree.node(node.children[name])
            assert child is not None
            f = self._files.get(child.ino) if child.pointer is not None else None
            if f is not None and self._serves_link(f):
                yield name, self._link_attr(f), i + 1
                continue
            if f is not None:
                f.looked_up = True  # readdirplus makes dentries too
            yield name, self._attr(child), i + 1

    def access(self, ino: int, mode: int) -> bool:
        if ino == self.control_ino:
            if mode & os.W_OK:
                raise erofs(CONTROL_FILE)
            return not mode & os.X_OK
        if self._link_file(ino) is not None:
            return not mode & os.W_OK
        node = self._node(ino)
        if mode & os.W_OK:
            raise erofs(node.path or "/")
        return not (mode & os.X_OK and not node.is_dir)

    def statfs(self) -> FsStats:
        total = sum(f.pointer.size for f in self._files.values())
        return FsStats(block_size=4096, blocks=-(-total // 4096), files=len(self.tree))

    def inodes_of(self, blob_id: str) -> list[int]:
        """The inodes whose content is ``blob_id`` (two names with one hash share a blob)."""
        return [int(ino) for ino, f in self._files.items() if f.pointer.hash == blob_id]

    # -- data -------------------------------------------------------------------------------
    async def _source(self, f: _File) -> Source:
        if f.source is None:
            await self._attached.wait()
            if self._backend_error is not None:
                raise DownloadError(f.pointer.file_name, self._backend_error)
            try:
                source = await self.fetcher.add(f.pointer)
            except TtfsError as e:
                f.error = _short(e)
                self._failures[f.node.path] = f.error
                raise DownloadError(f.pointer.file_name, e) from e
            self._cache_bytes.setdefault(source.blob.blob_id, source.blob.bytes_present)
            if self._fast_disabled is None and source.blob.verified:
                f.served_before = await trio.to_thread.run_sync(
                    self.fetcher.store.key_record, "link", source.blob.blob_id
                )
            f.source = source
        return f.source

    async def open(self, ino: int, flags: int) -> HandleId:
        """Open a file for reading.

        Raises:
            OSError: EROFS for any write intent, EISDIR for a directory, ENOENT.
            DownloadError: the file's blob cannot be opened in the cache.
        """
        if ino == self.control_ino:
            if flags & _WRITE_FLAGS:
                raise erofs(CONTROL_FILE)
            fh = HandleId(self._next_handle)
            self._next_handle += 1
            self._snapshots[fh] = await self.status_snapshot()
            return fh
        node = self._node(ino)
        if flags & _WRITE_FLAGS:
            raise erofs(node.path)
        if node.is_dir:
            raise OSError(errno.EISDIR, node.path)
        f = self._files[node.ino]
        await self._source(f)
        fh = HandleId(self._next_handle)
        self._next_handle += 1
        self._handles[fh] = f
        return fh

    async def read(self, fh: int, offset: int, size: int) -> bytes | bytearray:
        """``size`` bytes at ``offset`` (fewer at the end of the file).

        Raises:
            OSError: EBADF for an unknown handle.
            DownloadError: the bytes could not be fetched (after the fetcher's retries).
        """
        f = self._handles.get(HandleId(fh))
        if f is None:
            snapshot = self._snapshots.get(HandleId(fh))
            if snapshot is None:
                raise OSError(errno.EBADF, f"no handle {fh}")
            return snapshot[offset : offset + max(0, size)]
        source = f.source
        assert source is not None
        blob = source.blob
        checking = self._rechecking.get(blob.blob_id)
        if checking is not None:  # changed behind our back: serve only re-checked blocks
            await checking.wait()
        if offset >= blob.size or size <= 0:
            return b""
        # A whole blob needs no readahead: skip the bookkeeping on the warm path.
        if self._recorder is not None:
            self._recorder.on_read(
                blob.blob_id, blob.blocks_for(offset, min(size, blob.size - offset))
            )
        ahead = None
        if not blob.complete:
            if f.streams is None:
                f.streams = StreamTable(self.options.readahead)
            ahead = f.streams.on_read(offset, size, blob.size)
        if ahead is not None:
            self.fetcher.request_nowait(
                source,
                blob.blocks_for(ahead[0], ahead[1] - ahead[0]),
                Priority.READAHEAD,
                reader_at=offset // blob.block_size,
            )
        try:
            data = await self.fetcher.read(source, offset, size, Priority.DEMAND)
        except TtfsError as e:
            f.error = _short(e)
            raise DownloadError(f.pointer.file_name, e) from e
        f.reads += 1
        f.read_bytes += len(data)
        f.error = None  # the origin answered again
        return data

    def release(self, fh: int) -> None:
        self._handles.pop(HandleId(fh), None)
        self._snapshots.pop(HandleId(fh), None)

    # -- the fast path: verified files as links into the blob store (fastpath.py) -----------
    def set_invalidator(self, invalidate: Callable[[Inode, str], None]) -> None:
        """Install the FUSE layer's "forget the entry ``name`` of directory ``parent``" call.

        A name that turns from file into link (or back) must be dropped from the kernel's
        dentry cache, which otherwise trusts the old answer for the entry timeout (a day)."""
        self._invalidate = invalidate

    def _link_file(self, ino: int) -> _File | None:
        """The file whose link inode ``ino`` is, or None for any other inode."""
        if ino <= INODE_SHIFT:
            return None
        f = self._files.get(Inode(ino - INODE_SHIFT))
        if f is None:
            raise OSError(errno.ENOENT, f"no inode {ino}")
        return f

    def _target(self, f: _File) -> str:
        assert f.source is not None
        if self._lazy is not None:  # every link goes through the view (ttfs/vfs/gate.py)
            return self._lazy.target(f.source.blob.path)
        return os.path.abspath(f.source.blob.path)

    def _link_attr(self, f: _File) -> Attr:
        size = len(os.fsencode(self._target(f))) if f.source is not None else 0
        opts = self.options
        return Attr(f.link_ino, LINK_MODE, size, 1, opts.uid, opts.gid, opts.mtime_ns)

    def _notify_entry(self, f: _File) -> None:
        if self._invalidate is not None:
            self._invalidate(f.node.parent, f.node.name)

    def _grant(self, f: _File) -> bool:
        """Serve ``f`` as a link if every condition of the fast path holds (module fastpath)."""
        source = f.source
        if self._fast_disabled is not None or source is None:
            return f.link is not None
        if f.link is not None and not f.lazy:
            return True
        blob = source.blob
        if not (blob.complete and blob.verified and source.done.is_set()):
            if f.lazy:
                return True
            if self._lazy is not None and blob.blob_id not in self._rechecking:
                return self._grant_lazy(f, source)
            f.fast_off = "not verified" if blob.complete else "not complete"
            return False
        if blob.blob_id in self._rechecking:
            f.fast_off = "blob file changed after verification; checking it again"
            return False
        held = self._held_key(f)
        if held is None:
            return False
        if self._lazy is not None:
            self._lazy.admit(source, held)
            self._lazy.settle(source)
        if key_of_path(blob.path) != held:
            f.fast_off = "the blob file at its path is not the verified one"
            return False
        if f.lazy and f.link is not None and f.link.ino != held.ino:
            self._revoke(f, "blob file replaced")  # a reader holds the old one: EIO for it
        if f.served_before is not None and f.served_before != held:
            # Changed since a mount last served it, yet size and mtime match the index.
            self._changed(f)
            return False
        # Pinned against eviction: the mount holds every blob it serves open until it stops,
        # and the store never evicts an open blob (BlockStore.evict).
        if f.served_before is None:
            assert self._nursery is not None
            try:
                self._nursery.start_soon(self._record_link, blob.blob_id, held)
            except RuntimeError:
                # Shutting down: a blob verified in the last moments is not linked (nothing
                # may start in a closed nursery); the next mount checks it and links it then.
                return False
        f.served_before = held
        f.link = held
        f.lazy = False
        f.fast_off = None
        if f.looked_up:
            f.looked_up = False
            self._notify_entry(f)
        return True

    @staticmethod
    def _held_key(f: _File) -> BlobKey | None:
        """The identity of the blob file the daemon holds open for ``f`` (None, with the reason
        in ``f.fast_off``, when it cannot be had)."""
        assert f.source is not None
        try:
            with f.source.blob.lease() as fd:
                return BlobKey.of(os.fstat(fd))
        except (OSError, CacheError) as e:
            f.fast_off = f"cannot stat the blob file: {e}"
            return None

    def _grant_lazy(self, f: _File, source: Source) -> bool:
        """Serve ``f`` as a link before its blob is whole: the gate holds every read of a range
        until it is local (ttfs/vfs/gate.py); verified later, the link stays and reads stop
        asking (:meth:`_on_done` grants it again)."""
        assert self._lazy is not None
        blob = source.blob
        held = self._held_key(f)
        if held is None:
            return False
        now = key_of_path(blob.path)
        if now is None or (now.dev, now.ino) != (held.dev, held.ino):
            f.fast_off = "the blob file at its path is not the one being fetched"
            return False
        self._lazy.admit(source, held)
        f.link = held
        f.lazy = True
        f.fast_off = None
        self._awaiting_done.setdefault(blob.blob_id, []).append(f)
        if f.looked_up:
            f.looked_up = False
            self._notify_entry(f)
        return True

    def _check_link(self, f: _File) -> bool:
        """True while ``f`` is served as a link to its unchanged, verified blob file, or (a lazy
        link) to the very file its blob is being fetched into.

        A blob file whose identity changed (a write, a truncate, a chmod, a replacement) loses
        the fast path at once, and its blob is checked again (:meth:`_changed`); a lazy link
        whose file was replaced (a failed verification) is dropped, and the next lookup links
        the new file."""
        if f.link is None:
            return False
        key = key_of_path(self._target(f))
        if f.lazy:  # being written: only the file itself must be the same
            if key is not None and (key.dev, key.ino) == (f.link.dev, f.link.ino):
                return True
            self._revoke(f, "blob file replaced while fetched")
            return False
        if key == f.link:
            return True
        self._changed(f)
        return False

    def _serves_link(self, f: _File, pid: int = 0, uid: int | None = None) -> bool:
        """Whether to answer ``f`` as a link to process ``pid`` of user ``uid`` now (0 and
        None: unknown, as in readdir).

        The kernel shares one dentry among every reader of the mount, so a reader who could
        not follow the link (another mount namespace without the cache, another user without
        read access to it) turns the fast path off for the whole mount."""
        if self._fast_disabled is not None:
            return False
        if f.link is None and not self._grant(f):
            return False
        if not self._check_link(f):
            return False
        assert f.link is not None
        target = self._target(f)
        cache = os.path.dirname(os.path.dirname(os.path.dirname(target)))
        if (
            uid is not None
            and self.options.shared_readers
            and uid not in (0, os.geteuid())
            and not readable_by_others(Path(target))
        ):
            self.disable_fast_path(
                f"user {uid} cannot read the cache {cache} (links need o+r files and o+x "
                "directories when other users read the mount)"
            )
            return False
        if not visible_to(pid, target, f.link):
            self.disable_fast_path(
                f"process {pid} does not see the cache {cache} at that path (a container?)"
            )
            return False
        return True

    def _revoke(self, f: _File, reason: str) -> None:
        if f.link is not None:
            f.link = None
            f.lazy = False
            self._notify_entry(f)
        f.fast_off = reason

    def disable_fast_path(self, reason: str) -> None:
        """Serve every file through the daemon from now on (links already open keep working)."""
        if self._fast_disabled is not None:
            return
        log.warning("fast path off for this mount: %s", reason)
        self._fast_disabled = reason
        for f in self._files.values():
            self._revoke(f, reason)

    def _changed(self, f: _File) -> None:
        """The blob file behind ``f``'s link changed after verification: stop serving it as a
        link (every name of that blob) and check it again in the background."""
        assert f.source is not None
        blob_id = f.source.blob.blob_id
        reason = "blob file changed after verification; checking it again"
        log.warning("%s: %s", f.pointer.file_name, reason)
        for g in self._files.values():
            if g.source is not None and g.source.blob.blob_id == blob_id:
                self._revoke(g, reason)
        if blob_id not in self._rechecking and self._nursery is not None:
            self._rechecking[blob_id] = dropped = trio.Event()
            self._nursery.start_soon(self._recheck, f.source, dropped)

    async def _record_link(self, blob_id: str, key: BlobKey) -> None:
        await trio.to_thread.run_sync(self.fetcher.store.record_key, "link", blob_id, key)

    async def _recheck(self, source: Source, dropped: trio.Event) -> None:
        """Drop the changed blocks (reads wait for that), refetch them, verify, link again."""
        blob_id = source.blob.blob_id
        try:
            try:
                bad = await self.fetcher.recheck(source)
            finally:
                dropped.set()
            log.warning("%s: %d changed block(s) dropped", source.pointer.file_name, len(bad))
            await self.fetcher.complete(source, Priority.PREFETCH)
        except TtfsError as e:
            log.error("%s: checking the changed blob again failed: %s", source.pointer.file_name, e)
            return
        finally:
            self._rechecking.pop(blob_id, None)
        for g in self._files.values():
            if g.source is source:
                g.served_before = None
                self._grant(g)

    def _watch(self, f: _File, source: Source) -> None:
        """Switch ``f`` to the fast path now, or once its blob is whole and verified.

        With lazy links, a name the kernel already holds as a regular file (listed by
        readdirplus before its blob was opened) becomes a lazy link now; any other name gets
        its link at its first lookup, which creates the blob's cache file (doing so here for
        every file made the opener of a 10^5-file mount 2x slower)."""
        if source.done.is_set():
            self._grant(f)
        elif self._lazy is None or not f.looked_up or not self._grant(f):
            self._awaiting_done.setdefault(source.blob.blob_id, []).append(f)

    def _on_done(self, source: Source) -> None:
        """The fetcher's done listener: grant the files that waited for this blob."""
        for f in self._awaiting_done.pop(source.blob.blob_id, ()):
            self._grant(f)

    def readlink(self, ino: int, pid: int = 0, uid: int | None = None) -> bytes:
        """The target of a link inode, checked again on every path walk through it.

        Raises:
            OSError: ESTALE when the link no longer holds (blob changed, fast path turned off,
                the reader cannot follow it): the kernel then repeats the walk with a fresh
                lookup, which answers the regular file, so the opener never sees the error.
                EINVAL for an inode that is not a link.
        """
        f = self._link_file(ino)
        if f is None:
            self._node(ino)
            raise OSError(errno.EINVAL, "not a symbolic link")
        if f.link is None or not self._serves_link(f, pid, uid):
            raise OSError(errno.ESTALE, f"{f.node.path}: served by the daemon again")
        return os.fsencode(self._target(f))

    def _served_doc(self, f: _File) -> dict[str, Any]:
        kernel = self._check_link(f)
        if kernel:
            return {"served_by": "kernel", "link": self._target(f), "fast_path": None}
        return {"served_by": "daemon", "fast_path": self._fast_disabled or f.fast_off}

    # -- extended attributes: the control protocol (ttfs/control.py) ------------------------
    def listxattr(self, ino: int) -> list[str]:
        if ino == self.control_ino or self._link_file(ino) is not None:
            return []
        node = self._node(ino)
        if node.ino == ROOT_INODE:
            return [STATUS_XATTR, MATERIALIZE_XATTR]
        return [STATUS_XATTR] if not node.is_dir else []

    def getxattr(self, ino: int, name: str) -> bytes:
        """The value of a control attribute.

        Raises:
            OSError: ENODATA for any other name.
        """
        if ino == self.control_ino or self._link_file(ino) is not None:
            raise OSError(errno.ENODATA, name)
        node = self._node(ino)
        doc: dict[str, Any] | None = None
        if name == STATUS_XATTR:
            if node.ino == ROOT_INODE:
                doc = self.status()
            elif not node.is_dir:
                doc = self.file_status(self._files[node.ino])
        elif name.startswith(CHILD_STATUS_PREFIX) and node.is_dir:
            # The status of a child served as a link: the kernel refuses user.* attributes on
            # symlinks, so it is asked of the parent directory (ttfs/control.py).
            child = self.tree.child(node, name[len(CHILD_STATUS_PREFIX) :])
            if child is not None and child.pointer is not None:
                doc = self.file_status(self._files[child.ino])
        elif name == MATERIALIZE_XATTR and node.ino == ROOT_INODE:
            doc = self._pass_doc(self._materialize)
        if doc is None:
            raise OSError(errno.ENODATA, name)
        value = json.dumps(doc, separators=(",", ":")).encode()
        if len(value) > XATTR_MAX:  # cannot happen with the caps above; never reply ERANGE
            value = json.dumps({"error": "status too large"}).encode()
        return value

    def setxattr(self, ino: int, name: str, value: bytes) -> None:
        """Only ``user.ttfs.materialize`` on the root is writable; everything else is EROFS."""
        if ino == self.control_ino:
            raise erofs(f"setxattr {name} on {CONTROL_FILE}")
        node = self._node(ino)
        if name == MATERIALIZE_XATTR and node.ino == ROOT_INODE:
            self.materialize_nowait()
            return
        raise erofs(f"setxattr {name} on {node.path or '/'}")

    # -- status -------------------------------------------------------------------------------
    def _progress(self, f: _File) -> tuple[int, bool, bool, bool, str, int, int]:
        """local bytes, complete, verified, done, verify, cache bytes, origin bytes."""
        source = f.source
        if source is None:
            return 0, False, False, False, "pending", 0, 0
        blob = source.blob
        checker = blob.spec.checker
        complete = blob.complete
        verify = checker.algorithm or f"unavailable: {checker.reason or f.pointer.hashtype}"
        # Local at open, plus what the shared (b10fs) cache tier supplied since.
        cache = self._cache_bytes.get(blob.blob_id, 0) + source.shared_bytes
        return (
            blob.bytes_present,
            complete,
            blob.verified and complete,
            source.done.is_set(),
            verify,
            cache,
            source.origin_bytes,
        )

    def file_status(self, f: _File) -> dict[str, Any]:
        p = f.pointer
        local, complete, verified, done, verify, cache, origin = self._progress(f)
        return {
            "path": f.node.path,
            "file_name": p.file_name,
            "size": p.size,
            "local_bytes": local,
            "local_pct": round(100.0 * local / p.size, 2) if p.size else 100.0,
            "complete": complete,
            "verified": verified,
            "done": done,
            "verify": verify,
            "hashtype": p.hashtype,
            "hash": p.hash,
            "bytes_by_source": {"cache": cache, "origin": origin},
            "reads": f.reads,
            "read_bytes": f.read_bytes,
            "error": self._error_of(f),
            **self._served_doc(f),
        }

    def _file_json(self, f: _File) -> str:
        """:meth:`file_status` encoded, ~4x faster than building and dumping the dict (the
        status file of 100,000 files is made of these)."""
        p = f.pointer
        head = f.static_json
        if head is None:
            fixed = {
                "path": f.node.path,
                "file_name": p.file_name,
                "size": p.size,
                "hashtype": p.hashtype,
                "hash": p.hash,
            }
            head = f.static_json = json.dumps(fixed, separators=(",", ":"))[:-1]
        local, complete, verified, done, verify, cache, origin = self._progress(f)
        pct = round(100.0 * local / p.size, 2) if p.size else 100.0
        error = self._error_of(f)
        error_json = "null" if error is None else json.dumps(error)
        if self._check_link(f):  # served by the kernel: the link's path is the file's own
            served = json.dumps(self._served_doc(f), separators=(",", ":"))[1:-1]
        else:  # the same few reasons for every file: encoded once
            served = f'"served_by":"daemon","fast_path":{_js(self._fast_disabled or f.fast_off)}'
        return (
            f'{head},"local_bytes":{local},"local_pct":{pct},"complete":{_JSON[complete]},'
            f'"verified":{_JSON[verified]},"done":{_JSON[done]},"verify":{_js(verify)},'
            f'"bytes_by_source":{{"cache":{cache},"origin":{origin}}},"reads":{f.reads},'
            f'"read_bytes":{f.read_bytes},"error":{error_json},{served}}}'
        )

    def _error_of(self, f: _File) -> str | None:
        """Why this file is not (yet) servable: a failed pass, a failed verification, or the
        last failed read (cleared by the next successful one)."""
        if f.node.path in self._failures:
            return self._failures[f.node.path]
        if f.source is not None and f.source.failure is not None:
            return _short(f.source.failure)
        return f.error

    def _pass_doc(self, p: _Pass | None) -> dict[str, Any]:
        if p is None:
            return {"state": "idle", "generation": self._generation, "failures": []}
        return {
            "state": p.state,
            "generation": self._generation if p.kind == "materialize" else 0,
            "seconds": round((p.finished or time.monotonic()) - p.started, 3),
            "failures": [
                {"file": k, "reason": v} for k, v in list(p.failures.items())[:_MAX_FAILURES_SHOWN]
            ],
            "failure_count": len(p.failures),
        }

    async def status_snapshot(self) -> bytes:
        """The status file's content: the root document and every file's, as one JSON object
        ``{"mount": ..., "files": [...]}``, made when the file is opened.

        100,000 files take about half a CPU-second; other requests are served in between (a
        checkpoint every few thousand files).
        """
        parts = ['{"mount":', json.dumps(self.status(), separators=(",", ":")), ',"files":[']
        for i, f in enumerate(self._files.values()):
            if i:
                parts.append(",")
            parts.append(self._file_json(f))
            if i % _SNAPSHOT_YIELD == _SNAPSHOT_YIELD - 1:
                await trio.lowlevel.checkpoint()
        parts.append("]}")
        return "".join(parts).encode()

    def status(self) -> dict[str, Any]:
        """The root's ``user.ttfs.status`` document (docs/semantics.md, "Control")."""
        files = list(self._files.values())
        total = local = complete = verified = done = 0
        for f in files:
            total += f.pointer.size
            if f.source is not None:
                blob = f.source.blob
                local += blob.bytes_present
                complete += blob.complete
                verified += blob.verified and blob.complete
                done += f.source.done.is_set()
        failures = {f.node.path: e for f in files if (e := self._error_of(f)) is not None}
        stats = (
            self._fetcher.statistics()
            if self._fetcher is not None
            else FetcherStatistics({p.name: 0 for p in Priority}, 0, 0, 0, 0)
        )
        kernel = sum(self._check_link(f) for f in files)
        prefetch = (
            self._pass_doc(self._prefetch)
            if self.options.prefetch
            else {"state": "off", "failures": []}
        )
        return {
            "ttfs": 1,
            "pid": os.getpid(),
            **self.options.info,
            "prefix": self.tree.prefix,
            "files": len(files),
            "opened": sum(f.source is not None for f in files),
            "bytes_total": total,
            "bytes_local": local,
            "complete": complete,
            "verified": verified,
            "done": done,
            "served_by_kernel": kernel,
            "fast_path": self._fast_disabled or "on",
            "lazy_links": self._lazy_off if self._fast_disabled is None else "off (no fast path)",
            "lazy_reads": self._lazy.reads if self._lazy is not None else 0,
            "lazy_waiting": self._lazy.waiting if self._lazy is not None else 0,
            "failures": [
                {"file": k, "reason": v} for k, v in list(failures.items())[:_MAX_FAILURES_SHOWN]
            ],
            "failure_count": len(failures),
            "prefetch": prefetch,
            "materialize": self._pass_doc(self._materialize),
            "trace": {
                **self._trace_doc,
                "recorded_blocks": self._recorder.blocks if self._recorder is not None else 0,
            },
            "fetcher": {
                "queued": stats.queued,
                "inflight_requests": stats.inflight_requests,
                "origin_bytes": stats.origin_bytes,
                "origin_requests": stats.origin_requests,
                "retries": stats.retries,
                "shared_bytes": stats.shared_bytes,
                "shared_requests": stats.shared_requests,
                "worker_requests": stats.worker_requests,
                "worker_restarts": stats.worker_restarts,
            },
        }

    # -- background passes ------------------------------------------------------------------
    def materialize_nowait(self) -> None:
        """Start a materialize pass unless one is running (idempotent; never blocks)."""
        if self._materialize is not None and self._materialize.state in (
            "waiting",
            "planning",
            "running",
        ):
            return
        self._generation += 1
        self._materialize = _Pass("materialize")
        if self._nursery is not None:
            self._nursery.start_soon(self._run_pass, self._materialize)
        # else: background() starts it once the fetcher is attached

    async def wait_serving(self) -> None:
        await self._serving.wait()

    async def wait_opened(self) -> None:
        await self._opened.wait()

    def serving(self) -> None:
        """The mount answers: let the background prefetch start (it would otherwise compete
        with the mount's own start-up for the CPU and delay readiness)."""
        self._serving.set()

    async def _open_all(self) -> None:
        # A few openers in parallel; opens of different blobs do not wait on each other (the
        # fetcher's single-flight is per blob), so a reader's open() never queues behind them.
        files = iter(list(self._files.values()))
        self.fetcher.done_listeners.append(self._on_done)

        async def opener() -> None:
            for f in files:
                try:
                    source = await self._source(f)
                except DownloadError as e:
                    log.error("cannot open %s: %s", f.pointer.file_name, e.cause)
                    continue
                if self._fast_disabled is None:
                    self._watch(f, source)

        async with trio.open_nursery() as nursery:
            for _ in range(_OPENERS):
                nursery.start_soon(opener)
        self._opened.set()

    async def _evictor(self) -> None:
        """Keep the cache under ``--cache-size`` while mounted (never this mount's blobs).

        A pass scans the whole index, so it runs once the mount's blobs are open (they are then
        safe) and again only when the bytes landed since could have crossed the limit.
        """
        store = self.fetcher.store
        limit = store.max_bytes
        assert limit is not None
        await self._opened.wait()
        usage: int | None = None
        landed_at = 0
        warned = False
        while True:
            landed = self.fetcher.origin_bytes + self.fetcher.shared_bytes
            if usage is None or usage + landed - landed_at > limit:
                landed_at = landed
                await trio.to_thread.run_sync(store.evict)
                usage = store.last_usage
                if usage > limit and not warned:
                    log.warning(
                        "this mount alone needs %d bytes of cache, over --cache-size %d: "
                        "nothing it serves can be evicted",
                        usage,
                        limit,
                    )
                warned = usage > limit
            await trio.sleep(EVICT_INTERVAL)

    async def _run_pass(self, p: _Pass) -> None:
        try:
            await self._pass(p)
        except Exception as e:  # a bug here must not take the mount down
            log.exception("%s pass failed", p.kind)
            p.failures.setdefault("(all)", _short(e))
        finally:
            p.state = "failed" if p.failures else "done"
            p.finished = time.monotonic()
            log.info(
                "%s pass %s in %.2fs (%d failure(s))",
                p.kind,
                p.state,
                p.finished - p.started,
                len(p.failures),
            )

    async def _pass(self, p: _Pass) -> None:
        if p.kind == "prefetch":
            await self._serving.wait()
            await self._replayed.wait()  # the recorded order goes first
        await self._opened.wait()
        by_name: dict[str, _File] = {}
        for f in self._files.values():
            if f.source is None:
                p.failures[f.node.path] = f.error or "cannot open"
            else:
                by_name.setdefault(f.pointer.file_name, f)
        pointers = [f.pointer for f in by_name.values()]

        def request(segment: Segment) -> None:
            source = by_name[segment.pointer.file_name].source
            assert source is not None
            blocks = source.blob.blocks_for(segment.start, segment.end - segment.start)
            self.fetcher.request_nowait(source, blocks, Priority.PREFETCH)

        async def read(pointer: Pointer, offset: int, length: int) -> bytes:
            source = by_name[pointer.file_name].source
            assert source is not None
            return bytes(await self.fetcher.read(source, offset, length, Priority.PREFETCH))

        p.state = "planning"
        for segment in initial_segments(pointers, small_limit=self.options.small_file_limit):
            request(segment)
        for segment in await plan(pointers, read, small_limit=self.options.small_file_limit):
            request(segment)
        p.state = "running"

        async def complete(f: _File) -> None:
            assert f.source is not None
            try:
                await self.fetcher.complete(f.source, Priority.PREFETCH)
            except TtfsError as e:
                p.failures[f.node.path] = self._failures[f.node.path] = _short(e)
            else:
                self._failures.pop(f.node.path, None)
                f.error = None

        async with trio.open_nursery() as nursery:
            seen: set[str] = set()
            for f in by_name.values():
                assert f.source is not None
                if f.source.blob.blob_id not in seen:
                    seen.add(f.source.blob.blob_id)
                    nursery.start_soon(complete, f)
        # Files sharing a blob share its outcome.
        for f in self._files.values():
            if (
                f.source is not None
                and f.node.path not in p.failures
                and not f.source.done.is_set()
            ):
                p.failures[f.node.path] = "not complete"

    # -- access traces (ttfs/vfs/trace.py) --------------------------------------------------
    async def _trace(self, store: TraceStore) -> None:
        """Load and replay this model's trace, then record this mount's and save it when it
        covers more than the one it started with (after a quiet period, and at the end)."""
        block_size = self.fetcher.store.block_size
        pointers = [f.pointer for f in self._files.values()]
        baseline = 0
        recorder = self._recorder
        assert recorder is not None
        try:
            digest = await trio.to_thread.run_sync(manifest_digest, pointers)
            recorder.name(digest, block_size)
            counts = block_counts(pointers, block_size)
            trace, where = await trio.to_thread.run_sync(store.load, digest, block_size, counts)
            self._trace_doc = {"state": "recording", "manifest": digest, "source": where}
            if trace is not None:
                baseline = trace.blocks
                self._trace_doc["blocks"] = baseline
                if self.options.prefetch:
                    self._trace_doc["replayed_blocks"] = await self._replay(trace)
        finally:
            self._replayed.set()
        try:
            seen, changed = recorder.blocks, trio.current_time()
            while True:
                await trio.sleep(min(1.0, SAVE_QUIET / 2))
                now = trio.current_time()
                if recorder.blocks != seen:
                    seen, changed = recorder.blocks, now
                elif seen > baseline and now - changed >= SAVE_QUIET:
                    baseline = await self._save_trace(store, recorder)
        finally:
            with trio.CancelScope(shield=True):
                if recorder.blocks > baseline:
                    await self._save_trace(store, recorder)

    async def _save_trace(self, store: TraceStore, recorder: Recorder) -> int:
        snapshot = Trace(
            recorder.trace.digest, recorder.trace.block_size, list(recorder.trace.runs)
        )
        written = await trio.to_thread.run_sync(store.save, snapshot)
        self._trace_doc["saved_blocks"] = snapshot.blocks
        self._trace_doc["saved_to"] = written
        log.info("access trace of %d block(s) saved (%s)", snapshot.blocks, ", ".join(written))
        return snapshot.blocks

    async def _replay(self, trace: Trace) -> int:
        """Queue the trace's blocks in its order at READAHEAD: ahead of the prefetch plan and
        of nothing a reader asks for (a reader's own readahead is ordered by distance, before
        these; demand has its reserved connections)."""
        by_blob: dict[str, _File] = {}
        for file in self._files.values():
            by_blob.setdefault(file.pointer.hash, file)
        queued = 0
        for blob_id, first, last in trace.runs:
            f = by_blob.get(blob_id)
            if f is None:
                continue
            try:
                source = await self._source(f)
            except DownloadError:
                continue  # the read path reports it
            self.fetcher.request_nowait(source, range(first, last + 1), Priority.READAHEAD)
            queued += last - first + 1
        log.info("replaying an access trace: %d block(s) queued", queued)
        return queued

    @asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        """Run the opener and the passes (prefetch, a pending materialize) for the block."""
        assert self._fetcher is not None, "attach() the fetcher first"
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._open_all)
            if self.fetcher.store.max_bytes is not None:
                nursery.start_soon(self._evictor)
            if self._lazy is not None:
                nursery.start_soon(self._lazy.run)
            if self.options.traces is not None:
                nursery.start_soon(self._trace, self.options.traces)
            else:
                self._replayed.set()
            if self._prefetch is not None and self._prefetch.state == "waiting":
                nursery.start_soon(self._run_pass, self._prefetch)
            if self._materialize is not None and self._materialize.state == "waiting":
                nursery.start_soon(self._run_pass, self._materialize)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
        self._nursery = None  # after the tasks ended: one not yet started may still look


@asynccontextmanager
async def open_model_fs(
    tree: Tree, fetcher: Fetcher, options: FsOptions | None = None, *, serving: bool = True
) -> AsyncIterator[ModelFs]:
    """Run a :class:`ModelFs` with its background opener and prefetch for the block's duration.

    With ``serving=False`` the prefetch waits for :meth:`ModelFs.serving` (the FUSE layer calls
    it once the mount answers).
    """
    fs = ModelFs(tree, fetcher, options or FsOptions())
    if serving:
        fs.serving()
    async with fs.background():
        yield fs
