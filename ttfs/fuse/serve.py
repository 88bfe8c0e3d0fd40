"""serve(): one mount from manifest pointers to a serving FUSE session, and back down.

Start-up is ordered for the time to a visible tree (issue 11, "a mount starts in a blink")::

    Tree (built once, by the CLI) → owner lock of the cache directory (ttfs.owner) → ModelFs
      without a fetcher → FuseOps → pyfuse3.init → pyfuse3.main + signal watcher + readiness probe
      → once ready: BlockStore → ProviderSet (imports httpx) → Fetcher → owner socket
        → ModelFs.attach → opener + prefetch

The owner lock is taken before mounting, so a second mount of one cache fails (or waits for a
resolve that owns it) before anything is visible. Lookups, ``stat`` and ``readdir`` need only
the tree, so the mount reports ready before the block store (diskcache, sqlite) is opened or
any provider module (httpx, the cloud SDKs) is imported; an ``open`` that arrives earlier waits
for the fetcher. Teardown is the reverse: the request loop ends, the fetcher drains, the store
is flushed and closed, the owner lock released, the session unmounted.

pyfuse3 runs its request loop inside this trio run, so FUSE handlers, fetch workers and
background passes share one event loop; blocking work (the block index, hashing) is already
sent to threads by the layers below. ``max_tasks`` is raised far above pyfuse3's 99 because every
read waiting for the network holds one worker task.

*Readiness* means "a process that stats the mountpoint gets an answer from us": a probe thread
stats the mountpoint through the kernel while the loop serves, then the kernel is tuned
(:mod:`ttfs.fuse.kernel`), systemd gets ``READY=1`` (``$NOTIFY_SOCKET``) and the caller's
``on_ready`` runs (the daemon spawner's pipe, :mod:`ttfs.fuse.daemon`).

*Shutdown*: SIGTERM, SIGINT or SIGHUP end the loop (``pyfuse3.terminate``); requests still
running get ``drain_seconds`` before they are cancelled; the filesystem is then unmounted
(lazily, by libfuse), the fetcher drained and the block index flushed. An external
``fusermount3 -u`` ends the loop the same way.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

if sys.version_info < (3, 11):  # the builtin arrived in 3.11; trio depends on the backport
    from exceptiongroup import BaseExceptionGroup

from ..blocks import BlockStore, perms
from ..config import Settings
from ..errors import CacheError, MountError, TtfsError
from ..fetch import open_fetcher
from ..manifest import Pointer
from ..owner import OwnerLock, claim_or_wait
from ..owner.server import serving
from ..procs import raise_nofile_limit
from ..telemetry.metrics import MetricsSnapshot, exporting
from ..vfs.core import FsOptions, ModelFs
from ..vfs.gate import Gate
from ..vfs.readahead import ReadaheadConfig
from ..vfs.trace import TraceStore
from ..vfs.tree import Tree
from . import kernel
from .ops import FuseOps

if TYPE_CHECKING:
    from ..providers import ProviderSet

log = logging.getLogger(__name__)

HEAVY_MODULES = (
    "httpx",
    "huggingface_hub",
    "boto3",
    "botocore",
    "google.cloud.storage",
    "azure.storage.blob",
    "ttfs.providers",
    "ttfs.create.cloud",
    "ttfs.create.huggingface",
)
"""Modules a mount must not import before it is ready (each costs 0.05-0.5 s of start-up);
the status document lists those that were loaded at ready time (``startup.heavy_modules``)."""


@dataclass(frozen=True, slots=True)
class MountConfig:
    """Everything one mount needs; built by the CLI (or a test) at the edge."""

    pointers: tuple[Pointer, ...]
    mountpoint: Path
    settings: Settings
    prefix: str | None = None
    prefetch: bool = True
    trace: bool = True  # record and replay access traces
    read_ahead_kb: int | None = kernel.READ_AHEAD_KB
    max_background: int | None = kernel.MAX_BACKGROUND
    allow_other: bool | None = None  # None: when root (other uids and containers can read)
    fast_path: bool = True  # verified files as symlinks into the blob store (docs/mount.md)
    lazy_links: bool = False  # files being fetched as links too, reads held until local
    max_tasks: int = 256
    drain_seconds: float = 5.0
    ready_timeout: float = 60.0
    readahead: ReadaheadConfig | None = None  # None: sized to the connection budget
    info: dict[str, Any] = field(default_factory=dict)
    providers: ProviderSet | None = None  # tests inject fakes
    tree: Tree | None = None  # built by the CLI already (parsed once); else built from pointers
    started: float | None = None  # time.monotonic() when the command started, for the status


@dataclass(frozen=True, slots=True)
class Ready:
    """What :func:`serve` reports once the mount answers."""

    mountpoint: Path
    pid: int
    files: int
    tuning: kernel.Tuning


def allows_other(config: MountConfig) -> bool:
    return config.allow_other if config.allow_other is not None else os.geteuid() == 0


def mount_options(config: MountConfig) -> set[str]:
    """FUSE mount options (docs/semantics.md). No ``default_permissions``: the daemon answers
    EROFS itself, and the control attributes must be settable by whoever sees the mount."""
    options = {"fsname=ttfs", "subtype=ttfs", "nosuid", "nodev", "noatime"}
    if allows_other(config):
        options.add("allow_other")
    return options


def notify_systemd(state: str) -> bool:
    """Send ``state`` to ``$NOTIFY_SOCKET`` (sd_notify without libsystemd); False if unset."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", address, e)
        return False
    return True


def check_fuse_device() -> None:
    """Raise MountError when this process cannot open /dev/fuse at all."""
    if not os.path.exists("/dev/fuse"):
        raise MountError("not permitted: /dev/fuse does not exist (is the fuse module loaded?)")
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MountError("not permitted: /dev/fuse is not readable and writable by this user")


async def _probe(
    config: MountConfig, fs: ModelFs, files: int, on_ready: Callable[[Ready], None] | None
) -> None:
    """Wait until the mount answers through the kernel, tune it, announce readiness."""
    mountpoint = config.mountpoint
    try:
        with trio.fail_after(config.ready_timeout):
            st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise MountError(
            f"the new mount at {mountpoint} did not answer within {config.ready_timeout:.0f}s"
        ) from None
    except OSError as e:
        raise MountError(f"the new mount at {mountpoint} does not answer: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"{mountpoint}: the new mount does not look like a directory")
    tuning = await trio.to_thread.run_sync(
        lambda: kernel.tune(
            mountpoint, read_ahead_kb=config.read_ahead_kb, max_background=config.max_background
        )
    )
    log.info("kernel tuning: %s", tuning.describe())
    fs.serving()
    started = config.started if config.started is not None else _START
    config.info["startup"] = {
        "ready_seconds": round(time.monotonic() - started, 3),
        "cpu_seconds": round(time.process_time(), 3),  # this process's (a fork starts at 0)
        "heavy_modules": [m for m in HEAVY_MODULES if m in sys.modules],
    }
    ready = Ready(mountpoint, os.getpid(), files, tuning)
    log.info("serving %d file(s) at %s (pid %d)", files, mountpoint, ready.pid)
    notify_systemd(f"READY=1\nSTATUS=serving {files} files at {mountpoint}\nMAINPID={ready.pid}")
    if on_ready is not None:
        on_ready(ready)


async def _signals(drain_seconds: float, main_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            notify_systemd("STOPPING=1")
            pyfuse3.terminate()
            main_scope.deadline = min(main_scope.deadline, trio.current_time() + drain_seconds)


async def serve(config: MountConfig, *, on_ready: Callable[[Ready], None] | None = None) -> None:
    """Mount ``config.pointers`` at ``config.mountpoint`` and serve until unmounted or signalled.

    Raises:
        ManifestError: the manifest paths cannot be mapped into the mount.
        MountError: the mount could not be made or did not answer in time.
        CacheError: the cache directory is unusable.
        CacheBusy: another process kept the cache directory for ``owner_wait`` seconds.
    """
    mountpoint = config.mountpoint
    before, after = raise_nofile_limit()
    if after != before:
        log.info("open-file limit (RLIMIT_NOFILE) raised from %d to %d", before, after)
    else:
        log.info("open-file limit (RLIMIT_NOFILE) is %d", after)
    tree = config.tree or Tree.build(
        config.pointers, prefix=config.prefix, mountpoint=str(mountpoint)
    )
    check_fuse_device()
    check_cache_dir(config.settings.cache_dir)
    # The cache directory is ours alone while we serve (ttfs.owner): a resolve that owns it now
    # is waited for (bounded); resolves started later fetch through us.
    lock = await claim_or_wait(config.settings.cache_dir, config.settings.owner_wait)
    try:
        # The --metrics endpoint is bound before mounting, so a bad port fails the mount; it
        # reports zeros until the fetcher is attached (after ready).
        served: list[ModelFs] = []
        with exporting(config.settings.metrics, lambda: _metrics_of(served), role="mount"):
            await _serve_owned(config, mountpoint, tree, lock, on_ready, served)
    finally:
        lock.release()  # last: after the store is flushed and closed


def _metrics_of(served: list[ModelFs]) -> MetricsSnapshot:
    fetcher = served[0].attached if served else None
    return fetcher.metrics_snapshot() if fetcher is not None else MetricsSnapshot.empty()


async def _serve_owned(
    config: MountConfig,
    mountpoint: Path,
    tree: Tree,
    lock: OwnerLock,
    on_ready: Callable[[Ready], None] | None,
    served: list[ModelFs],
) -> None:
    info = {"mountpoint": str(mountpoint), "cache_dir": str(config.settings.cache_dir)}
    config.info.update({**info, **config.info})
    settings = config.settings
    readahead = config.readahead or ReadaheadConfig.for_budget(
        settings.max_connections - settings.demand_reserved, settings.background_unit
    )
    traces = None
    if config.trace:
        shared = settings.shared_cache.directory if settings.shared_cache is not None else None
        traces = TraceStore(settings.cache_dir, shared)
    options = FsOptions(
        prefetch=config.prefetch,
        readahead=readahead,
        info=config.info,
        traces=traces,
        fast_path=config.fast_path,
        shared_readers=allows_other(config),
        lazy_links=config.lazy_links and config.fast_path,
    )
    fs = ModelFs(tree, None, options)
    served.append(fs)
    ops = FuseOps(fs)
    try:
        pyfuse3.init(ops, str(mountpoint), mount_options(config))
    except RuntimeError as e:
        raise MountError(
            f"cannot mount at {mountpoint}: {e} (libfuse's reason is in the log above)"
        ) from e
    try:
        files = fs.file_count
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as main_scope:
                nursery.start_soon(_signals, config.drain_seconds, main_scope)
                nursery.start_soon(_probe, config, fs, files, on_ready)
                nursery.start_soon(_backend, config, fs, ops, lock)
                await pyfuse3.main(min_tasks=1, max_tasks=config.max_tasks)
            if main_scope.cancelled_caught:
                log.warning("requests still running after %.0fs; stopped", config.drain_seconds)
            nursery.cancel_scope.cancel()
    finally:
        _close_session()
    log.info("unmounting %s", mountpoint)


def check_cache_dir(cache_dir: Path) -> None:
    """Fail before mounting when the cache directory cannot be made or written (the store
    itself is opened only once the mount is ready)."""
    try:
        perms.make_private_dir(cache_dir)  # private from the start (ttfs/blocks/perms.py)
    except OSError as e:
        raise CacheError(f"cannot create the cache directory {cache_dir}: {e.strerror}") from e
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise CacheError(f"the cache directory {cache_dir} is not writable")


def _providers(settings: Settings, pointers: Sequence[Pointer]) -> ProviderSet:
    # Imported here, in a worker thread, once the mount serves: httpx and the provider modules
    # take ~0.2 s to import, which would otherwise delay readiness (and block the event loop);
    # the providers are made here too, for the same reason (ProviderSet.prepare).
    module = importlib.import_module("ttfs.providers")
    providers: ProviderSet = module.ProviderSet(settings)
    providers.prepare(pointers)
    return providers


async def _backend(config: MountConfig, fs: ModelFs, ops: FuseOps, lock: OwnerLock) -> None:
    """Once the mount is ready: open the block store, the providers and the fetcher, serve
    other ttfs processes on the owner socket, attach them to the filesystem and run its opener
    and prefetch until cancelled."""
    await fs.wait_serving()
    settings = config.settings
    started = time.monotonic()
    try:
        store = await trio.to_thread.run_sync(
            lambda: BlockStore(
                settings.cache_dir,
                block_size=settings.block_size,
                max_bytes=settings.cache_max_bytes,
            )
        )
    except (TtfsError, OSError) as e:
        error = e if isinstance(e, TtfsError) else CacheError(f"cannot open the cache: {e}")
        log.error("cannot open the block cache: %s", error)
        fs.fail(error)
        return
    gate: Gate | None = None
    try:
        if fs.options.lazy_links:
            try:
                gate = await trio.to_thread.run_sync(Gate.open, store.root / "blobs", store.root)
            except OSError as e:
                fs.lazy_links_off(
                    f"{e.strerror or e} (needs root, Linux >= 6.14 and a cache "
                    "on ext4, XFS or btrfs)"
                )
        providers = config.providers
        if providers is None:
            providers = await trio.to_thread.run_sync(_providers, settings, config.pointers)
        async with open_fetcher(store, providers, settings) as fetcher, serving(fetcher, lock):
            # A discarded blob's pages must leave the kernel's cache of every file serving it.
            fetcher.discard_listeners.append(
                lambda source: ops.invalidate_blob(source.blob.blob_id)
            )
            fs.attach(fetcher, gate)
            log.info("block store and fetcher ready in %.3fs", time.monotonic() - started)
            async with fs.background():
                await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            if gate is not None:
                await trio.to_thread.run_sync(gate.close)
            await trio.to_thread.run_sync(store.close)


def _close_session() -> None:
    try:
        pyfuse3.close(unmount=True)
    except Exception as e:  # the mount may already be gone
        log.info("closing the FUSE session: %s", e)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The first TtfsError (or KeyboardInterrupt) among the leaves of a nursery's group."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_error(exc)
            if found is not None:
                return found
        elif isinstance(exc, TtfsError | KeyboardInterrupt):
            return exc
    return None


_START = time.monotonic()  # fallback start time: when this module was imported


def run(config: MountConfig, *, on_ready: Callable[[Ready], None] | None = None) -> None:
    """``trio.run(serve, ...)``: the body of ``ttfs mount --foreground``.

    Nurseries wrap errors in exception groups; a TtfsError inside one is re-raised alone so
    the CLI prints its one line.

    Raises:
        TtfsError: see :func:`serve`.
    """
    try:
        trio.run(lambda: serve(config, on_ready=on_ready))
    except BaseExceptionGroup as group:
        error = _first_error(group)
        if error is None:
            raise
        raise error from group


__all__ = [
    "MountConfig",
    "Ready",
    "check_fuse_device",
    "mount_options",
    "notify_systemd",
    "run",
    "serve",
]
