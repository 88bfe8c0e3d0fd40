"""serve(): one mount from manifest pointers to a serving FUSE session, and back down.

Construction is one ``AsyncExitStack`` so teardown is its exact reverse (style anchors G6)::

    BlockStore → ProviderSet → Fetcher (its nursery) → ModelFs (opener, prefetch) → FuseOps
      → pyfuse3.init (the mount) → pyfuse3.main + signal watcher + readiness probe

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

import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

if sys.version_info < (3, 11):  # the builtin arrived in 3.11; trio depends on the backport
    from exceptiongroup import BaseExceptionGroup

from ..blocks import BlockStore
from ..config import Settings
from ..errors import MountError, TtfsError
from ..fetch import open_fetcher
from ..manifest import Pointer
from ..procs import raise_nofile_limit
from ..providers import ProviderSet
from ..telemetry.metrics import exporting
from ..vfs.core import FsOptions, ModelFs, open_model_fs
from ..vfs.readahead import ReadaheadConfig
from ..vfs.tree import Tree
from . import kernel
from .ops import FuseOps

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MountConfig:
    """Everything one mount needs; built by the CLI (or a test) at the edge."""

    pointers: tuple[Pointer, ...]
    mountpoint: Path
    settings: Settings
    prefix: str | None = None
    prefetch: bool = True
    read_ahead_kb: int | None = kernel.READ_AHEAD_KB
    max_background: int | None = kernel.MAX_BACKGROUND
    allow_other: bool | None = None  # None: when root (other uids and containers can read)
    fast_path: bool = True  # verified files as symlinks into the blob store (docs/mount.md)
    max_tasks: int = 256
    drain_seconds: float = 5.0
    ready_timeout: float = 60.0
    readahead: ReadaheadConfig = field(default_factory=ReadaheadConfig)
    info: dict[str, Any] = field(default_factory=dict)
    providers: ProviderSet | None = None  # tests inject fakes


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
    """
    settings = config.settings
    mountpoint = config.mountpoint
    before, after = raise_nofile_limit()
    if after != before:
        log.info("open-file limit (RLIMIT_NOFILE) raised from %d to %d", before, after)
    else:
        log.info("open-file limit (RLIMIT_NOFILE) is %d", after)
    tree = Tree.build(config.pointers, prefix=config.prefix, mountpoint=str(mountpoint))
    check_fuse_device()
    store = await trio.to_thread.run_sync(
        lambda: BlockStore(
            settings.cache_dir, block_size=settings.block_size, max_bytes=settings.cache_max_bytes
        )
    )
    async with AsyncExitStack() as stack:
        stack.push_async_callback(trio.to_thread.run_sync, store.close)
        providers = config.providers or ProviderSet(settings)
        fetcher = await stack.enter_async_context(open_fetcher(store, providers, settings))
        stack.enter_context(exporting(settings.metrics, fetcher.metrics_snapshot, role="mount"))
        info = {
            "mountpoint": str(mountpoint),
            "cache_dir": str(settings.cache_dir),
            **config.info,
        }
        options = FsOptions(
            prefetch=config.prefetch,
            readahead=config.readahead,
            info=info,
            fast_path=config.fast_path,
            shared_readers=allows_other(config),
        )
        fs = await stack.enter_async_context(open_model_fs(tree, fetcher, options, serving=False))
        ops = FuseOps(fs)
        try:
            pyfuse3.init(ops, str(mountpoint), mount_options(config))
        except RuntimeError as e:
            raise MountError(
                f"cannot mount at {mountpoint}: {e} (libfuse's reason is in the log above)"
            ) from e
        stack.callback(_close_session)
        files = sum(1 for _ in tree.files())
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as main_scope:
                nursery.start_soon(_signals, config.drain_seconds, main_scope)
                nursery.start_soon(_probe, config, fs, files, on_ready)
                await pyfuse3.main(min_tasks=1, max_tasks=config.max_tasks)
            if main_scope.cancelled_caught:
                log.warning("requests still running after %.0fs; stopped", config.drain_seconds)
            nursery.cancel_scope.cancel()
        log.info("unmounting %s", mountpoint)


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
