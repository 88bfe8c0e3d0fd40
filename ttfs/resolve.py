"""Eager resolve: download every file of a manifest to plain files (what truss-transfer does).

Unlike truss-transfer, a file appears at its destination only when it is complete and verified:
the bytes land in the block store (so a killed resolve resumes where it stopped), the blob is
hashed against the manifest, and only then is it hard-linked (or copied, across filesystems)
to a temporary name beside the destination and renamed over it. A file with holes is never
accepted, and a failure in one file never leaves a corrupt file at another file's path.

An existing destination with the right size is skipped when it is the very file (inode, mtime)
an earlier resolve produced, or when its content hashes to the manifest hash; otherwise it is
replaced. Files whose hash cannot be checked locally fall back to upstream's size rule, and
the log says so.

Where the block store lives (:func:`store_plan`): without ``--cache-dir`` / ``TTFS_CACHE_DIR``
it is a hidden ``.ttfs`` directory on the destination's own filesystem (beside the files, as
``huggingface_hub`` keeps ``.cache/huggingface`` in a ``local_dir``), so the hard link always
works and a resolve uses the model's size on disk, once, on any layout; after a successful
resolve every blob no destination links to any more is deleted, so the store never holds a
second copy. Resolves using one store are serialised by an advisory lock on it (``flock``):
two processes resolving into one directory take turns, and the second finds the files in place.

With the b10fs shared cache on (docs/b10fs.md) the upstream decision runs first (cleanup, space,
speed), the files are taken in a random order per process (spec §3.6) so that replicas starting
together fetch different blobs first, and a file's task ends only after its blob is published.
Unlike upstream, a cache hit is not a symlink into b10fs by default: the bytes are read from the
shared entry (in parallel ranges), verified, and placed like any other download, so the result
is a plain local file. ``TTFS_SHARED_HOTSTART=symlink`` links instead, as upstream, to an entry
that is trusted or hashed first (:mod:`ttfs.fetch.links`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import random
import secrets
import shutil
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .blocks import BlockStore, checker_for, perms
from .config import Settings
from .errors import CacheBusy, CacheError, DownloadError, TtfsError
from .fetch import Fetcher, Priority, Source, open_fetcher
from .manifest import Pointer, destination
from .owner import OwnerInfo, OwnerLock, claim
from .owner.client import (
    Completed,
    OwnerGone,
    complete_via_owner,
    outputs_match,
    record_outputs,
)
from .owner.server import serving
from .providers import ProviderSet
from .telemetry.metrics import exporting
from .telemetry.progress import Progress

log = logging.getLogger(__name__)

STATS_FILE = "/tmp/truss_transfer_stats.json"
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(slots=True)
class FileDownload:
    file_name: str
    file_size_bytes: int
    download_time_secs: float
    download_speed_mb_s: float


@dataclass(slots=True)
class ResolveReport:
    """What a resolve did; written as truss-transfer's stats file (spec §3.14)."""

    total_manifest_size_bytes: int = 0
    total_download_time_secs: float = 0.0
    file_downloads: list[FileDownload] = field(default_factory=list)
    skipped: int = 0
    origin_bytes: int = 0
    shared_bytes: int = 0
    success: bool = False
    b10fs_enabled: bool = False
    b10fs_decision_to_use: bool = False
    b10fs_read_speed_mbps: float | None = None
    # hot: a file whose bytes came from the shared cache; cold: from the origin while reads
    # from the shared cache were allowed (upstream's B10fsUsage metric).
    b10fs_hot_starts_files: int = 0
    b10fs_hot_starts_bytes: int = 0
    b10fs_cold_starts_files: int = 0
    b10fs_cold_starts_bytes: int = 0

    def stats_json(self) -> dict[str, object]:
        downloaded = sum(f.file_size_bytes for f in self.file_downloads)
        secs = self.total_download_time_secs
        return {
            "total_manifest_size_bytes": self.total_manifest_size_bytes,
            "total_download_time_secs": secs,
            "total_aggregated_mb_s": (downloaded / (secs * 1e6)) if downloaded and secs else None,
            "file_downloads": [
                {
                    "file_name": f.file_name,
                    "file_size_bytes": f.file_size_bytes,
                    "download_time_secs": f.download_time_secs,
                    "download_speed_mb_s": f.download_speed_mb_s,
                }
                for f in self.file_downloads
            ],
            "b10fs_read_speed_mbps": self.b10fs_read_speed_mbps,
            "b10fs_decision_to_use": self.b10fs_decision_to_use,
            "b10fs_enabled": self.b10fs_enabled,
            "b10fs_hot_starts_files": self.b10fs_hot_starts_files,
            "b10fs_hot_starts_bytes": self.b10fs_hot_starts_bytes,
            "b10fs_cold_starts_files": self.b10fs_cold_starts_files,
            "b10fs_cold_starts_bytes": self.b10fs_cold_starts_bytes,
            "success": self.success,
            "timestamp": int(time.time()),
        }


def write_stats(report: ResolveReport, path: str = STATS_FILE) -> None:
    """Write the stats file atomically; a failure is logged, never raised."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(report.stats_json(), f, indent=2)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot write stats file %s: %s", path, e)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _hash_file(path: Path, pointer: Pointer) -> bool | None:
    """True/False when ``path`` does/doesn't match the pointer's hash; None if not checkable."""
    checker = checker_for(pointer.hashtype, pointer.hash)
    if not checker.checkable:
        return None
    h = checker.new(pointer.size)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest() == checker.expected


def _swap_in(dest: Path, make: Callable[[Path], None]) -> None:
    """Make ``dest`` what ``make`` creates at a temporary name beside it, atomically: a rename
    over whatever ``dest`` was (a file, a link: never written through); nothing is left behind
    on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Unique per process *and* call: two threads placing the same file never share a name.
    tmp = dest.parent / f".{dest.name}.ttfs-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        make(tmp)
        if dest.is_dir() and not dest.is_symlink():
            raise IsADirectoryError(errno.EISDIR, "destination is a directory", str(dest))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _place(src: Path, dest: Path) -> None:
    """Make ``dest`` a complete copy of ``src`` atomically: hard link if possible, else copy."""

    def make(tmp: Path) -> None:
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
            shutil.copyfile(src, tmp)  # uses copy_file_range/sendfile where the kernel can
        # The blob is 0600 in the private cache; the output gets the mode of a file the user
        # created (for a hard link that is the blob's inode, still unreachable via the cache).
        perms.served_file(tmp)

    _swap_in(dest, make)


def _place_link(target: Path, dest: Path) -> None:
    """Make ``dest`` a symlink to ``target`` (absolute) atomically (TTFS_SHARED_HOTSTART)."""
    _swap_in(dest, lambda tmp: os.symlink(os.path.abspath(target), tmp))


class Resolver:
    """Downloads a list of pointers into a directory through one fetcher."""

    def __init__(
        self,
        fetcher: Fetcher,
        download_dir: str,
        *,
        progress: bool | None = None,
        monitor_secs: float = 30.0,
        report: ResolveReport | None = None,
        page_after: bool = False,
    ) -> None:
        self.fetcher = fetcher
        self.download_dir = download_dir
        self.report = report if report is not None else ResolveReport()
        self._progress = progress
        self._monitor_secs = monitor_secs
        self._files_open = trio.CapacityLimiter(64)  # bounds open data files, not throughput
        self._page_after = page_after
        self._pager: trio.Nursery | None = None
        self._page_lock = trio.Lock()

    async def run(
        self, pointers: Sequence[Pointer], manifest: Sequence[Pointer] | None = None
    ) -> ResolveReport:
        """Resolve every pointer; on the first failure cancel the rest and raise.

        ``manifest`` is the whole manifest when ``pointers`` is a part of it.

        Raises:
            DownloadError: naming the first file that failed and why.
        """
        started = time.monotonic()
        if not self.report.total_manifest_size_bytes:
            self.report.total_manifest_size_bytes = sum(p.size for p in pointers)
        # Destinations first: a hostile name fails the resolve before any byte is written.
        plan = [(p, destination(self.download_dir, p.file_name)) for p in pointers]
        tier = self.fetcher.tier
        if tier is None:
            log.info("b10cache is not enabled for read or write.")
        else:
            log.info("b10cache is enabled (%s).", tier.config.directory)
            try:
                # The whole manifest, also when this run resolves a part of it (one store
                # per destination filesystem): cleanup must not see the rest as foreign.
                decision = await tier.prepare(manifest if manifest is not None else pointers)
            except TtfsError as e:
                self.report.total_download_time_secs += time.monotonic() - started
                raise DownloadError("b10cache", e) from e
            self.report.b10fs_enabled = True
            self.report.b10fs_decision_to_use = decision.read
            self.report.b10fs_read_speed_mbps = decision.speed_mbps
            # Replicas that start together then fetch different blobs first (spec §3.6).
            random.shuffle(plan)
        failure: list[DownloadError] = []
        total = sum(p.size for p in pointers)
        show = self._progress if self._progress is not None else sys.stderr.isatty()
        progress = Progress(total, label="resolve") if total and show else None
        try:
            async with trio.open_nursery() as nursery:
                if progress is not None:
                    nursery.start_soon(progress.run, self._bytes_ready)
                async with trio.open_nursery() as pager:
                    self._pager = pager if self._page_after else None
                    async with trio.open_nursery() as files:
                        for pointer, dest in plan:
                            files.start_soon(self._one, pointer, dest, failure, files.cancel_scope)
                    # Paging is best effort: one more second, then it is abandoned (as upstream).
                    pager.cancel_scope.deadline = trio.current_time() + 1.0
                nursery.cancel_scope.cancel()
        finally:
            self.report.total_download_time_secs += time.monotonic() - started
            self.report.origin_bytes += self.fetcher.origin_bytes
            self.report.shared_bytes += self.fetcher.shared_bytes
        if failure:
            raise failure[0]
        if progress is not None:
            progress.finish(self._bytes_ready())
        self.report.success = True
        log.info(
            "All downloads completed successfully after %.2fs", self.report.total_download_time_secs
        )
        return self.report

    async def _page(self, dest: Path) -> None:
        """Read a finished file once to warm the page cache (TRUSS_TRANSFER_PAGE_AFTER_DOWNLOAD).

        One file at a time, 25 ms pauses between 128 MiB reads, as truss-transfer does, so it
        competes as little as possible with the downloads still running.
        """
        try:
            await trio.sleep(0.5)
            async with self._page_lock:
                fd = await trio.to_thread.run_sync(os.open, dest, os.O_RDONLY)
                paged = 0
                try:
                    for _ in itertools.count():
                        chunk = await trio.to_thread.run_sync(os.read, fd, 128 * 1024 * 1024)
                        if not chunk:
                            break
                        paged += len(chunk)
                        await trio.sleep(0.025)
                finally:
                    os.close(fd)
                log.debug("paged %s into the page cache (%d bytes)", dest, paged)
        except OSError as e:
            log.debug("paging %s failed: %s", dest, e)

    def _bytes_ready(self) -> int:
        return sum(s.blob.bytes_present for s in self.fetcher.sources())

    async def _one(
        self, pointer: Pointer, dest: Path, failure: list[DownloadError], scope: trio.CancelScope
    ) -> None:
        try:
            async with self._files_open:
                await self._download(pointer, dest)
            if self._pager is not None:
                self._pager.start_soon(self._page, dest)
        except TtfsError as e:
            error = e if isinstance(e, DownloadError) else DownloadError(pointer.file_name, e)
            if not failure:
                failure.append(error)
                # Raised to the caller, which reports it once (no second line here).
                log.debug("download of %s failed: %s", pointer.file_name, error)
            scope.cancel()
        except OSError as e:
            if not failure:
                failure.append(DownloadError(pointer.file_name, CacheError(str(e))))
            scope.cancel()

    async def _download(self, pointer: Pointer, dest: Path) -> None:
        store = self.fetcher.store
        if await trio.to_thread.run_sync(already_there, store, pointer, dest):
            self.report.skipped += 1
            return
        if await self._link(pointer, dest):
            return
        t0 = time.monotonic()
        source = await self.fetcher.add(pointer)
        before = source.blob.bytes_present
        origin_before, shared_before = source.origin_bytes, source.shared_bytes
        monitor = trio.CancelScope()
        error: TtfsError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._monitor, source, dest, monitor)
            try:
                await self.fetcher.complete(source, Priority.PREFETCH)
            except TtfsError as e:
                error = e  # raised below: inside the nursery it would become an ExceptionGroup
            finally:
                monitor.cancel()
        if error is not None:
            raise error
        await trio.to_thread.run_sync(_place, source.blob.path, dest)
        await trio.to_thread.run_sync(store.record_output, dest, pointer.hash)
        await self.fetcher.settled(source)  # published to the shared cache (if it is on)
        secs = time.monotonic() - t0
        from_origin = source.origin_bytes > origin_before
        report = self.report
        if source.shared_bytes > shared_before and not from_origin:
            report.b10fs_hot_starts_files += 1
            report.b10fs_hot_starts_bytes += pointer.size
            log.info("Using b10cache for %s (%d bytes)", pointer.file_name, pointer.size)
        elif from_origin and report.b10fs_decision_to_use:
            report.b10fs_cold_starts_files += 1
            report.b10fs_cold_starts_bytes += pointer.size
        if source.blob.size > before and (from_origin or source.shared_bytes == shared_before):
            self.report.file_downloads.append(
                FileDownload(
                    pointer.file_name,
                    pointer.size,
                    secs,
                    pointer.size / 2**20 / secs if secs > 0 else 0.0,
                )
            )
        log.info("Completed download to %s (%d bytes, %.2fs)", dest, pointer.size, secs)

    async def _link(self, pointer: Pointer, dest: Path) -> bool:
        """Under ``TTFS_SHARED_HOTSTART=symlink``, answer a usable b10fs entry with a symlink to
        it, as upstream (:mod:`ttfs.fetch.links`): True when ``dest`` is now that link."""
        tier, store = self.fetcher.tier, self.fetcher.store
        if tier is None or tier.config.hotstart != "symlink":
            return False
        verify = self.fetcher.settings.verify
        target = await tier.link_target(pointer, store, verify=verify)
        if target is None:
            return False
        await trio.to_thread.run_sync(_place_link, target, dest)
        await trio.to_thread.run_sync(store.record_output, dest, pointer.hash)
        self.report.b10fs_hot_starts_files += 1
        self.report.b10fs_hot_starts_bytes += pointer.size
        log.info(
            "Using b10cache for %s (%d bytes, linked to %s)",
            pointer.file_name,
            pointer.size,
            target,
        )
        return True

    async def _monitor(self, source: Source, dest: Path, scope: trio.CancelScope) -> None:
        """truss-transfer's per-file progress line, every ``monitor_secs`` (first tick skipped)."""
        with scope:
            t0 = time.monotonic()
            last_t, last = t0, source.blob.bytes_present
            while True:
                await trio.sleep(self._monitor_secs)
                now, cur = time.monotonic(), source.blob.bytes_present
                total = max(source.blob.size, 1)
                log.warning(
                    'Download for "%s" %.0f%% (%d / %d bytes, avg: %.2f MB/s, curr: %.2f MB/s)',
                    dest,
                    100 * cur / total,
                    cur,
                    source.blob.size,
                    cur / 2**20 / (now - t0),
                    (cur - last) / 2**20 / (now - last_t),
                )
                last_t, last = now, cur


def already_there(store: BlockStore | None, pointer: Pointer, dest: Path) -> bool:
    """Whether ``dest`` already holds the pointer's content (skip it); ``store`` may be None
    (a client of the cache's owner has no store: it hashes instead)."""
    try:
        st = dest.stat()
    except OSError:
        return False
    if st.st_size != pointer.size or not dest.is_file():
        log.warning("File %s exists but size mismatch. Redownloading.", pointer.file_name)
        return False
    if store is not None and store.output_matches(dest, pointer.hash, pointer.size):
        log.info("File %s already exists with correct size. Skipping download.", pointer.file_name)
        return True
    verdict = _hash_file(dest, pointer)
    if verdict is None:
        log.info(
            "File %s already exists with correct size; its hash (%s) cannot be "
            "checked locally. Skipping download.",
            pointer.file_name,
            pointer.hashtype,
        )
        return True
    if verdict:
        log.info(
            "File %s already exists and matches its hash. Skipping download.", pointer.file_name
        )
        if store is not None:
            store.record_output(dest, pointer.hash)
        return True
    log.warning(
        "File %s exists with the right size but the wrong content. Redownloading.",
        pointer.file_name,
    )
    return False


STORE_DIR_NAME = ".ttfs"
"""The block store of a resolve without ``--cache-dir``, beside the files it produces."""
_LOCK_FILE = "resolve.lock"


@dataclass(frozen=True, slots=True)
class StorePlan:
    """One block store of a resolve and the files it serves."""

    directory: Path
    # True: chosen by ttfs on the destinations' filesystem; blobs no file links to are
    # deleted after a successful resolve. False: the user's --cache-dir (LRU --cache-size).
    beside: bool
    items: list[tuple[Pointer, Path]]


def _device(path: Path) -> int:
    """``st_dev`` of ``path``, or of its nearest existing ancestor (it may not exist yet)."""
    for p in (path, *path.parents):
        try:
            return os.stat(p).st_dev
        except FileNotFoundError:
            continue
    return os.stat("/").st_dev


def store_plan(settings: Settings, items: Sequence[tuple[Pointer, Path]]) -> list[StorePlan]:
    """Where the block store of a resolve lives: the one place this is decided.

    A named cache (``--cache-dir`` / ``TTFS_CACHE_DIR``) is used as it is, for every file: a
    destination on another filesystem then gets a copy. Otherwise the destinations are grouped
    by filesystem and each group's store is ``<common directory>/.ttfs`` on that filesystem,
    so every output is a hard link of its blob and no second copy of the model exists
    anywhere (blocking: stats the destinations).
    """
    if settings.cache_dir_given or not items:
        return [StorePlan(settings.cache_dir, False, list(items))] if items else []
    groups: dict[int, list[tuple[Pointer, Path]]] = {}
    for pointer, dest in items:
        absolute = Path(os.path.abspath(dest))
        groups.setdefault(_device(absolute.parent), []).append((pointer, dest))
    plans: list[StorePlan] = []
    for dev, group in groups.items():
        parents = [os.path.abspath(d.parent) for _, d in group]
        anchor = Path(os.path.commonpath(parents))
        if _device(anchor) == dev:
            plans.append(StorePlan(anchor / STORE_DIR_NAME, True, group))
            continue
        # The common directory lies on another filesystem (a mount point between the files):
        # one store per parent directory keeps every link on its own filesystem.
        by_parent: dict[str, list[tuple[Pointer, Path]]] = {}
        for (pointer, dest), parent in zip(group, parents, strict=True):
            by_parent.setdefault(parent, []).append((pointer, dest))
        plans += [StorePlan(Path(p) / STORE_DIR_NAME, True, g) for p, g in by_parent.items()]
    return plans


@asynccontextmanager
async def exclusive_store(directory: Path) -> AsyncIterator[None]:
    """Hold the store's resolve lock (``flock``, released by the kernel if we are killed).

    Two resolves of one store (two processes, or two threads of one) take turns: the second
    then skips every file the first placed. Polled, so a waiting resolve stays cancellable.

    Raises:
        CacheError: the store directory cannot be created or the lock file opened.
    """
    try:
        await trio.to_thread.run_sync(lambda: directory.mkdir(parents=True, exist_ok=True))
        fd = os.open(directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise CacheError(f"cannot use cache directory {directory}: {e}") from e
    try:
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    waiting = True
                    log.info("Waiting for another resolve using %s to finish", directory)
                await trio.sleep(0.1)
        yield
    finally:
        os.close(fd)


async def resolve(
    pointers: Sequence[Pointer],
    download_dir: str,
    settings: Settings,
    *,
    progress: bool | None = None,
    monitor_secs: float = 30.0,
    providers: ProviderSet | None = None,
    report: ResolveReport | None = None,
    page_after: bool = False,
) -> ResolveReport:
    """Resolve ``pointers`` into ``download_dir``: for each block store (resolve.store_plan) as
    its owner, or through its owner when another process (a mount, another resolve) has it.

    Raises:
        DownloadError: the first file that failed.
        CacheError: the cache directory is unusable.
        CacheBusy: another process owns the cache and could not serve this one in time.
    """
    report = report if report is not None else ResolveReport()
    report.total_manifest_size_bytes = sum(p.size for p in pointers)
    # Destinations first: a hostile name fails the resolve before any byte is written.
    items = [(p, destination(download_dir, p.file_name)) for p in pointers]
    plans = await trio.to_thread.run_sync(store_plan, settings, items)
    try:
        for plan in plans:
            # Two resolves into one directory take turns on its own store (the second then
            # skips what the first placed); a named cache is shared with mounts and other
            # resolves through its owner (ttfs.owner).
            async with contextlib.AsyncExitStack() as stack:
                if plan.beside:
                    await stack.enter_async_context(exclusive_store(plan.directory))
                await _resolve_plan(
                    plan,
                    pointers,
                    download_dir,
                    settings,
                    providers=providers,
                    report=report,
                    progress=progress,
                    monitor_secs=monitor_secs,
                    page_after=page_after,
                )
    except BaseException:
        report.success = False  # an earlier store's part may have succeeded
        raise
    report.success = True
    return report


async def _resolve_with_store(
    lock: OwnerLock,
    plan: StorePlan,
    manifest: Sequence[Pointer],
    download_dir: str,
    settings: Settings,
    *,
    providers: ProviderSet | None,
    report: ResolveReport,
    progress: bool | None,
    monitor_secs: float,
    page_after: bool,
) -> None:
    """The owner path: open the store and a fetcher, serve other processes while resolving."""
    max_bytes = None if plan.beside else settings.cache_max_bytes
    store = await trio.to_thread.run_sync(
        lambda: BlockStore(plan.directory, block_size=settings.block_size, max_bytes=max_bytes)
    )
    stack = contextlib.ExitStack()  # the metrics endpoint, when --metrics asks for one
    try:
        async with (
            open_fetcher(store, providers or ProviderSet(settings), settings) as fetcher,
            serving(fetcher, lock),
        ):
            stack.enter_context(
                exporting(settings.metrics, fetcher.metrics_snapshot, role="resolve")
            )
            resolver = Resolver(
                fetcher,
                download_dir,
                progress=progress,
                monitor_secs=monitor_secs,
                report=report,
                page_after=page_after,
            )
            await resolver.run([p for p, _ in plan.items], manifest)
        if plan.beside:
            freed = await trio.to_thread.run_sync(store.drop_unlinked)
            if freed:
                log.info("Removed %d bytes of blobs no file uses from %s", freed, plan.directory)
        else:
            await trio.to_thread.run_sync(store.evict, {p.hash for p in manifest})
    finally:
        stack.close()
        await trio.to_thread.run_sync(store.close)


async def _resolve_plan(
    plan: StorePlan,
    manifest: Sequence[Pointer],
    download_dir: str,
    settings: Settings,
    *,
    providers: ProviderSet | None,
    report: ResolveReport,
    progress: bool | None,
    monitor_secs: float,
    page_after: bool,
) -> None:
    """One store's part, as the owner of its directory or as a client of the owner.

    Raises:
        DownloadError: the first file that failed.
        CacheBusy: the owner cannot serve us and did not go away within ``owner_wait``.
    """
    deadline = trio.current_time() + settings.owner_wait
    while True:
        got = await trio.to_thread.run_sync(claim, plan.directory)
        if isinstance(got, OwnerLock):
            with got:
                await _resolve_with_store(
                    got,
                    plan,
                    manifest,
                    download_dir,
                    settings,
                    providers=providers,
                    report=report,
                    progress=progress,
                    monitor_secs=monitor_secs,
                    page_after=page_after,
                )
            return
        try:
            await _resolve_through(got, plan, settings, report)
            return
        except OwnerGone as e:
            if e.connected:
                deadline = trio.current_time() + settings.owner_wait  # a new owner may be us
            elif trio.current_time() >= deadline:
                raise CacheBusy(
                    f"cache directory {plan.directory} is in use by {got.describe()}, "
                    f"which cannot serve this process ({e}); waited {settings.owner_wait:g}s "
                    "(TTFS_OWNER_WAIT)"
                ) from e
            log.info("%s; trying again", e)
            await trio.sleep(0.2)


async def _resolve_through(
    owner: OwnerInfo, plan: StorePlan, settings: Settings, report: ResolveReport
) -> None:
    """The client path: the owner completes and verifies the blobs; we place the files.

    Raises:
        OwnerGone: the owner cannot serve us (the caller retries or takes over).
        DownloadError: the first file that failed.
    """
    started = time.monotonic()
    report.b10fs_enabled = settings.shared_cache is not None
    placed: list[tuple[Path, str]] = []  # outputs the owner should remember
    log.info(
        "cache directory %s is owned by %s; fetching through it", plan.directory, owner.describe()
    )
    todo: dict[str, list[tuple[Pointer, Path]]] = {}
    # Destinations the owner recorded as our earlier outputs are skipped without hashing.
    known = await outputs_match(owner, [(d, p) for p, d in plan.items])
    for (pointer, dest), recorded in zip(plan.items, known, strict=True):
        if recorded and await trio.to_thread.run_sync(_same_size_file, dest, pointer.size):
            log.info(
                "File %s already exists with correct size. Skipping download.", pointer.file_name
            )
            report.skipped += 1
        elif await trio.to_thread.run_sync(already_there, None, pointer, dest):
            report.skipped += 1
            placed.append((dest, pointer.hash))
        else:
            todo.setdefault(pointer.hash, []).append((pointer, dest))
    failure: list[DownloadError] = []

    async def place(done: Completed) -> None:
        report.origin_bytes += done.origin_bytes
        for pointer, dest in todo.get(done.blob_id, []):
            try:
                await trio.to_thread.run_sync(_place, done.path, dest)
            except OSError as e:
                failure.append(DownloadError(pointer.file_name, CacheError(str(e))))
                return
            placed.append((dest, pointer.hash))
            secs = time.monotonic() - started
            report.file_downloads.append(
                FileDownload(pointer.file_name, pointer.size, secs, pointer.size / 2**20 / secs)
            )
            log.info("Completed download to %s (%d bytes, %.2fs)", dest, pointer.size, secs)

    wanted = [entries[0][0] for entries in todo.values()]
    try:
        if wanted:
            await complete_via_owner(owner, wanted, place)
    except DownloadError:
        raise
    except TtfsError as e:
        raise DownloadError("(via the cache owner)", e) from e
    finally:
        report.total_download_time_secs += time.monotonic() - started
    if failure:
        raise failure[0]
    await record_outputs(owner, placed)
    log.info("All downloads completed successfully after %.2fs", time.monotonic() - started)


def _same_size_file(path: Path, size: int) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_size == size and path.is_file()
