"""The ``ttfs`` command line: thin click commands that build Settings and call the core.

A :class:`~ttfs.errors.TtfsError` reaching a command prints one line (``ttfs: error: ...``) and
exits with the error's ``exit_code``; ``--debug`` adds the traceback chain. Anything else is a
bug and prints a traceback.

Imports are per command: this module imports only click and ttfs's vocabulary, and each
command imports what it uses, so ``ttfs mount`` never loads httpx, the cloud SDKs or
huggingface_hub before its mount is ready (half a second of a cold start on a small VM; the
daemon's status lists any that slipped in, and a test asserts there are none).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

if sys.version_info < (3, 11):  # the builtin arrived in 3.11; trio depends on the backport
    from exceptiongroup import BaseExceptionGroup

from . import __version__
from .config import Settings
from .errors import TtfsError
from .telemetry.logs import setup_logging
from .units import parse_size

_STARTED = time.monotonic()  # about when this command started: the mount's status reports
# its start-up time from here

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class ByteSize(click.ParamType):  # type: ignore[type-arg]
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _log_options() -> list[Callable[[F], F]]:
    """``--log-level`` and ``--debug``, which every command has (declared once)."""
    return [
        click.option(
            "--log-level",
            type=click.Choice(["error", "warn", "info", "debug", "off"], case_sensitive=False),
            help="Log level [default: TTFS_LOG, TRUSS_TRANSFER_LOG, RUST_LOG or info].",
        ),
        click.option("--debug", is_flag=True, help="Show tracebacks of errors."),
    ]


def common_options(f: F) -> F:
    """Options every command that fetches shares (declared once)."""
    options = [
        click.option(
            "--cache-dir",
            type=click.Path(path_type=Path),
            envvar="TTFS_CACHE_DIR",
            help="Block cache directory [default: resolve: .ttfs beside the files, on their "
            "filesystem; mount: /var/cache/ttfs as root, else $XDG_CACHE_HOME/ttfs].",
        ),
        click.option(
            "--cache-size",
            type=ByteSize(),
            envvar="TTFS_CACHE_MAX_BYTES",
            help="LRU cap of the block cache, e.g. 200G [default: no cap].",
        ),
        click.option(
            "--max-connections",
            type=click.IntRange(1, 1024),
            envvar="TTFS_MAX_CONNECTIONS",
            help="Ranged GETs in flight [default: 32].",
        ),
        click.option(
            "--workers",
            type=click.IntRange(0, 256),
            envvar="TTFS_WORKERS",
            help="Worker processes that download range bodies; 0 = in this process "
            "[default: one per core, at most 16].",
        ),
        click.option(
            "--shared-cache",
            type=click.Path(file_okay=False, path_type=Path),
            envvar="TTFS_SHARED_CACHE",
            help="Shared cache directory replicas share (b10fs rules, docs/b10fs.md) [default: "
            "TRUSS_TRANSFER_CACHE_DIR when BASETEN_FS_ENABLED and USE_BASETEN_FS_TRUSS_TRANSFER "
            "are set, else off].",
        ),
        click.option(
            "--no-verify",
            is_flag=True,
            default=False,
            help="Skip hashing blobs against the manifest.",
        ),
        click.option(
            "--metrics",
            metavar="HOST:PORT",
            envvar="TTFS_METRICS",
            help="Serve Prometheus metrics at http://HOST:PORT/metrics while running (PORT "
            "alone: 127.0.0.1) [default: off].",
        ),
        *_log_options(),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def settings_from(opts: dict[str, Any]) -> Settings:
    return Settings.from_env(
        cache_dir=opts.get("cache_dir"),
        cache_max_bytes=opts.get("cache_size"),
        max_connections=opts.get("max_connections"),
        workers=opts.get("workers"),
        verify=False if opts.get("no_verify") else None,
        shared_cache_dir=opts.get("shared_cache"),
        metrics=opts.get("metrics"),
    )


def run_or_exit(fn: Callable[..., Any], *args: Any, debug: bool = False) -> Any:
    """Call ``fn``; a TtfsError becomes one line on stderr and its exit code."""
    try:
        return fn(*args)
    except TtfsError as e:
        if debug:
            log.error("error", exc_info=e)
        click.echo(f"ttfs: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("ttfs: interrupted", err=True)
        sys.exit(130)
    except BaseExceptionGroup as group:
        # Ctrl-C inside a trio nursery arrives wrapped in a group: still one line.
        interrupted, _ = group.split(KeyboardInterrupt)
        if interrupted is None:
            raise
        click.echo("ttfs: interrupted", err=True)
        sys.exit(130)


def handles_errors(f: F) -> F:
    @functools.wraps(f)
    def wrapper(**kwargs: Any) -> Any:
        setup_logging(
            kwargs.get("log_level") or ("debug" if kwargs.get("debug") else None), propagate=False
        )
        return run_or_exit(lambda: f(**kwargs), debug=bool(kwargs.get("debug")))

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ttfs")
def cli() -> None:
    """ttfs: model weights that appear instantly and arrive as fast as the network allows."""


@cli.command("resolve")
@click.argument("manifest", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.argument("download_dir", required=False)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar [default: on when stderr is a terminal].",
)
@common_options
@handles_errors
def resolve_cmd(
    manifest: Path | None, download_dir: str | None, progress: bool | None, **opts: Any
) -> None:
    """Download every file of MANIFEST into DOWNLOAD_DIR (eager, no FUSE).

    Without MANIFEST the truss-transfer lookup paths are used (/bptr/bptr-manifest,
    /bptr/bptr-manifest.json, /static-bptr/static-bptr-manifest.json). Files appear only when
    complete and verified; a killed resolve resumes from the cache.
    """
    import trio

    from .create import expand_pointers
    from .manifest import find_manifests, load_manifest
    from .resolve import STATS_FILE, ResolveReport, resolve, write_stats

    settings = settings_from(opts)
    report = ResolveReport()
    try:
        manifests = [load_manifest(manifest)] if manifest else find_manifests()
        pointers = expand_pointers(manifests)
        report.total_manifest_size_bytes = sum(p.size for p in pointers)
        target = (
            download_dir
            if download_dir is not None
            else os.environ.get("TRUSS_TRANSFER_DOWNLOAD_DIR", "/tmp/truss_transfer")
        )
        trio.run(
            functools.partial(resolve, pointers, target, settings, progress=progress, report=report)
        )
    finally:
        # truss-transfer's stats file (spec §3.14), on success and on failure.
        write_stats(report, os.environ.get("TTFS_STATS_FILE") or STATS_FILE)
    click.echo(
        f"resolved {len(pointers)} file(s), {report.total_manifest_size_bytes} bytes into "
        f"{target} in {report.total_download_time_secs:.2f}s "
        f"({report.origin_bytes} bytes from origin, {report.shared_bytes} from the shared "
        f"cache, {report.skipped} already present)",
        err=True,
    )


# --------------------------------------------------------------------------------------------
# Mounts: mount, materialize, status, umount (docs/semantics.md, docs/mount.md)
# --------------------------------------------------------------------------------------------


def control_options(f: F) -> F:
    """Options of the commands that only talk to a live mount."""
    options = [
        *_log_options(),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _mount_pointers(manifests: tuple[Path, ...]) -> tuple[list[Any], list[str]]:
    from .create import expand_pointers
    from .errors import ManifestError
    from .manifest import find_manifests, load_manifest

    # No collision check here: Tree.build makes it while it builds the tree (one pass, not two).
    if manifests:
        loaded = [load_manifest(m, collisions=False) for m in manifests]
    else:
        loaded = find_manifests(collisions=False)
    if not loaded:
        raise ManifestError(
            "no manifest given and none found at the truss-transfer lookup paths "
            "(/bptr/bptr-manifest, /bptr/bptr-manifest.json, "
            "/static-bptr/static-bptr-manifest.json)"
        )
    pointers = expand_pointers(loaded, collisions=False)
    return pointers, [m.source for m in loaded]


@cli.command("mount")
@click.argument(
    "paths",
    nargs=-1,
    required=True,
    metavar="[MANIFEST]... MOUNTPOINT",
    # Not readable=True: access() on a dead mount fails, and check_mountpoint says why better.
    type=click.Path(path_type=Path, readable=False),
)
@click.option(
    "--foreground", "-f", is_flag=True, help="Serve in this process until unmounted or signalled."
)
@click.option(
    "--root",
    "root_prefix",
    metavar="PREFIX",
    help="Prefix removed from absolute file names [default: the mountpoint when every absolute "
    "name lies under it, else their common directory]. '/' keeps full paths.",
)
@click.option("--no-prefetch", is_flag=True, help="Fetch on demand and readahead only.")
@click.option(
    "--no-trace",
    is_flag=True,
    help="Neither record nor replay the access trace (docs/mount.md, 'Access traces').",
)
@click.option(
    "--fast-path/--no-fast-path",
    default=True,
    envvar="TTFS_FAST_PATH",
    show_default=True,
    help="Serve complete, verified files as symlinks into the cache, read by the kernel at "
    "local-file speed (docs/mount.md). Off: every read goes through the daemon.",
)
@click.option(
    "--lazy-links/--no-lazy-links",
    default=False,
    envvar="TTFS_LAZY_LINKS",
    show_default=True,
    help="Serve files still being fetched as symlinks too: the kernel reads the cache file and "
    "each read waits until its bytes are local (root, Linux >= 6.14, cache on ext4/XFS/btrfs; "
    "docs/mount.md, 'Lazy links').",
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Daemon log [default: <cache-dir>/logs/mount-<mountpoint>.log].",
)
@click.option(
    "--read-ahead-kb",
    type=click.IntRange(0, 1 << 20),
    help="Kernel readahead of the mount, set as root [default: 1024].",
)
@click.option(
    "--max-background",
    type=click.IntRange(1, 65535),
    help="Outstanding async FUSE requests, set as root [default: 64].",
)
@click.option(
    "--allow-other/--no-allow-other",
    default=None,
    help="Let other users read the mount [default: when root].",
)
@click.option(
    "--timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds to wait for the daemon to serve.",
)
@click.option("--ready-fd", type=int, hidden=True)
@common_options
@handles_errors
def mount_cmd(
    paths: tuple[Path, ...],
    foreground: bool,
    root_prefix: str | None,
    no_prefetch: bool,
    no_trace: bool,
    fast_path: bool,
    lazy_links: bool,
    log_file: Path | None,
    read_ahead_kb: int | None,
    max_background: int | None,
    allow_other: bool | None,
    timeout: float,
    ready_fd: int | None,
    **opts: Any,
) -> None:
    """Mount the files of [MANIFEST]... at MOUNTPOINT, lazily.

    Returns once the whole tree is visible (sizes right, no byte fetched); the daemon keeps
    serving in the background (--foreground stays attached). Reads fetch the byte ranges
    they need first while the background prefetch fetches everything else. Without MANIFEST the
    truss-transfer lookup paths are used. Relative file names appear under MOUNTPOINT; absolute
    ones with a prefix removed (see --root), so 'ttfs mount m.json /app/model_cache' serves
    exactly the paths the manifest names (docs/semantics.md).
    """
    from .fuse import daemon as spawner
    from .vfs.tree import Tree

    reported = False

    def report(message: bytes) -> None:
        nonlocal reported
        if ready_fd is not None and not reported:
            reported = True
            spawner.write_ready(ready_fd, message)

    try:
        spawner.require_pyfuse3()
        *manifests, mountpoint = paths
        settings = settings_from(opts)
        # The pointers and the tree live as long as the mount: collecting garbage while they
        # are built only walks them again and again (100k files: ~30% of the parse), and
        # freezing them keeps every later collection of the daemon from walking them.
        gc.disable()
        try:
            pointers, sources = _mount_pointers(tuple(manifests))
            mnt = spawner.check_mountpoint(mountpoint)
            tree = Tree.build(pointers, prefix=root_prefix, mountpoint=str(mnt))  # before mount
        finally:
            gc.freeze()
            gc.enable()
        if not foreground:
            log_path = log_file or spawner.default_log_file(settings.cache_dir.absolute(), mnt)
            forked = spawner.fork_daemon(mnt, log_path, timeout=timeout)
            if isinstance(forked, spawner.Daemon):
                click.echo(
                    f"ttfs: mounted {len(pointers)} file(s) at {mnt} (pid {forked.pid}, "
                    f"log {log_path})",
                    err=True,
                )
                return
            if forked is not None:  # the daemon: serve below, report on the pipe
                ready_fd = forked
                foreground = True
        if not foreground:  # threads exist, so no fork: a fresh interpreter serves
            extra: list[str] = []
            if opts.get("cache_size"):
                extra += ["--cache-size", str(opts["cache_size"])]
            if opts.get("max_connections"):
                extra += ["--max-connections", str(opts["max_connections"])]
            if opts.get("workers") is not None:
                extra += ["--workers", str(opts["workers"])]
            if opts.get("no_verify"):
                extra.append("--no-verify")
            if opts.get("metrics"):
                extra += ["--metrics", str(opts["metrics"])]
            if no_trace:
                extra.append("--no-trace")
            if opts.get("shared_cache"):
                extra += ["--shared-cache", str(Path(opts["shared_cache"]).absolute())]
            if read_ahead_kb is not None:
                extra += ["--read-ahead-kb", str(read_ahead_kb)]
            if max_background is not None:
                extra += ["--max-background", str(max_background)]
            if allow_other is not None:
                extra.append("--allow-other" if allow_other else "--no-allow-other")
            if not fast_path:
                extra.append("--no-fast-path")
            if lazy_links:
                extra.append("--lazy-links")
            args = spawner.mount_args(
                [m.absolute() for m in manifests],
                mnt,
                cache_dir=settings.cache_dir,
                root=root_prefix,
                prefetch=not no_prefetch,
                log_level=opts.get("log_level") or ("debug" if opts.get("debug") else None),
                extra_args=extra,
            )
            d = spawner.spawn(args, mnt, log_path, timeout=timeout)
            click.echo(
                f"ttfs: mounted {len(pointers)} file(s) at {mnt} (pid {d.pid}, log {log_path})",
                err=True,
            )
            return

        from .fuse import kernel

        try:
            from .fuse.serve import MountConfig, Ready, run
        except ImportError as e:  # a pyfuse3 that cannot load (e.g. libfuse3 missing)
            from .errors import ConfigError

            raise ConfigError(f"{spawner.FUSE_MISSING} ({e})") from e

        def on_ready(ready: Ready) -> None:
            report(spawner.READY)

        config = MountConfig(
            pointers=tuple(pointers),
            mountpoint=mnt,
            settings=settings,
            prefix=root_prefix,
            prefetch=not no_prefetch,
            trace=not no_trace,
            read_ahead_kb=kernel.READ_AHEAD_KB if read_ahead_kb is None else read_ahead_kb,
            max_background=kernel.MAX_BACKGROUND if max_background is None else max_background,
            allow_other=allow_other,
            fast_path=fast_path,
            lazy_links=lazy_links,
            ready_timeout=timeout,
            info={"manifests": sources},
            tree=tree,
            started=_STARTED,
        )
        run(config, on_ready=on_ready)
    except BaseException as e:
        report(spawner.error_message(e))
        raise


@cli.command("materialize")
@click.argument("mountpoint", type=str)
@click.option(
    "--progress/--no-progress",
    default=True,
    help="A progress bar on a terminal, plain progress lines otherwise [default: on].",
)
@click.option("--timeout", type=float, help="Give up after this many seconds [default: never].")
@control_options
@handles_errors
def materialize_cmd(mountpoint: str, progress: bool, timeout: float | None, **opts: Any) -> None:
    """Make every file of the mount at MOUNTPOINT local and verified; exit 0 only then.

    Works from any process that sees the mountpoint: it asks the daemon through the
    user.ttfs.materialize attribute and follows user.ttfs.status.
    """
    import time

    from .control import mount_status, request_materialize, wait_materialized
    from .errors import DownloadError, MountError
    from .telemetry.progress import Progress

    generation = request_materialize(mountpoint)
    first = mount_status(mountpoint)
    bar = Progress(int(first.get("bytes_total", 0)), label="materialize") if progress else None
    last = [0.0]

    def on_status(status: dict[str, Any]) -> None:
        now = time.monotonic()
        if bar is not None and now - last[0] >= bar.interval:
            last[0] = now
            bar.show(int(status.get("bytes_local", 0)))

    result = wait_materialized(mountpoint, generation, timeout=timeout, on_status=on_status)
    local = int(result.status.get("bytes_local", 0))
    if bar is not None:
        bar.finish(local)
    if not result.ok:
        failures = result.failures or [{"file": "?", "reason": "not every file is complete"}]
        for failure in failures:
            click.echo(f"ttfs: {failure['file']}: {failure['reason']}", err=True)
        first_failure = failures[0]
        more = len(failures) - 1
        raise DownloadError(
            first_failure["file"] + (f" (and {more} more file(s))" if more else ""),
            MountError(f"materialize failed: {first_failure['reason']}"),
        )
    click.echo(
        f"ttfs: materialized {result.status.get('files')} file(s), {local} bytes local and "
        f"verified in {result.seconds:.2f}s "
        f"({result.status.get('fetcher', {}).get('origin_bytes', 0)} bytes from origin "
        "since mount)",
        err=True,
    )


@cli.command("status")
@click.argument("mountpoint", type=str)
@click.argument("paths", nargs=-1, type=str)
@click.option("--files", "all_files", is_flag=True, help="Also show every file of the mount.")
@click.option("--json", "as_json", is_flag=True, help="Print the status documents as JSON.")
@control_options
@handles_errors
def status_cmd(
    mountpoint: str, paths: tuple[str, ...], all_files: bool, as_json: bool, **opts: Any
) -> None:
    """Show the mount at MOUNTPOINT: files and bytes local, verified, failures, passes.

    One request to the daemon answers for the whole mount. With PATH... (relative to the
    mount, or absolute under it), each of those files; with --files, every file (from one
    read of the mount's status file). --json prints {"mount": ..., "files": [...]} (with
    --files: the daemon's document as one line).
    """
    import json

    from .control import file_status, full_status, mount_status

    files: list[dict[str, Any]] | None = None
    if all_files and as_json:
        # The daemon's document as it is: one line of JSON, no parse and re-encode (seconds
        # for 100,000 files).
        from .control import read_status_file

        raw = read_status_file(mountpoint)
        if not raw.startswith(b'{"mount":'):
            full_status(mountpoint)  # the clear error for what is not a status document
        click.echo(raw)
        return
    if all_files:
        doc = full_status(mountpoint)
        summary, files = doc["mount"], doc["files"]
    else:
        summary = mount_status(mountpoint)
        if paths:
            root = os.path.abspath(mountpoint)
            files = []
            for p in paths:
                full = p if os.path.isabs(p) else os.path.join(root, p)
                files.append(file_status(full))
    if as_json:
        out: dict[str, Any] = {"mount": summary}
        if files is not None:
            out["files"] = files
        click.echo(json.dumps(out, indent=2))
        return
    if files is not None:
        _print_files(files)
    _print_summary(summary)


def _print_files(files: list[dict[str, Any]]) -> None:
    from .units import format_size

    rows = [("PATH", "SIZE", "LOCAL", "VERIFIED", "SERVED", "CACHE", "ORIGIN")]
    for f in files:
        verified = "yes" if f["verified"] else ("n/a" if "unavailable" in f["verify"] else "no")
        src = f["bytes_by_source"]
        rows.append(
            (
                f["path"],
                format_size(f["size"]),
                f"{f['local_pct']:.1f}%",
                verified + (" !" if f.get("error") else ""),
                f.get("served_by", "daemon"),
                format_size(src["cache"]),
                format_size(src["origin"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    click.echo(
        "\n".join(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        )
    )


def _print_summary(summary: dict[str, Any]) -> None:
    from .units import format_size

    total, local = summary["bytes_total"], summary["bytes_local"]
    pct = 100.0 * local / total if total else 100.0
    fetcher = summary.get("fetcher", {})
    click.echo(
        f"{summary['files']} file(s): {format_size(local)} of {format_size(total)} local "
        f"({pct:.1f}%), {summary['verified']} verified, {summary['done']} done; prefetch "
        f"{summary['prefetch']['state']}, materialize {summary['materialize']['state']}; "
        f"{fetcher.get('origin_requests', 0)} origin request(s), "
        f"{fetcher.get('retries', 0)} retries; daemon pid {summary['pid']}"
    )
    if "served_by_kernel" in summary:
        click.echo(
            f"served by the kernel (fast path): {summary['served_by_kernel']} file(s); "
            f"fast path {summary['fast_path']}"
            + (
                f"; lazy links {summary['lazy_links']} ({summary.get('lazy_reads', 0)} reads "
                f"let go, {summary.get('lazy_waiting', 0)} held now)"
                if summary.get("lazy_links", "off") != "off"
                else ""
            )
        )
    for failure in summary.get("failures", []):
        click.echo(f"failed: {failure['file']}: {failure['reason']}")
    more = int(summary.get("failure_count", 0)) - len(summary.get("failures", []))
    if more > 0:
        click.echo(f"failed: ... and {more} more (ttfs status --files)")


@cli.command("umount")
# A plain string: click.Path would stat() and access() the path, which fails ("not readable")
# or hangs on a dead or wedged mount, the very mounts umount must clear.
@click.argument("mountpoint", type=str)
@click.option(
    "--timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to wait for the daemon to exit.",
)
@control_options
@handles_errors
def umount_cmd(mountpoint: str, timeout: float, **opts: Any) -> None:
    """Unmount a ttfs mount in any state: live, busy, or dead (its daemon killed).

    A busy mount (a process has a file open there) is detached lazily: the path is free at
    once, open files keep working, and the daemon exits when the last one is closed.
    """
    from .fuse.daemon import unmount

    lazy = unmount(mountpoint, timeout=timeout)
    click.echo(f"ttfs: unmounted {mountpoint}" + (" (lazily)" if lazy else ""), err=True)


# --------------------------------------------------------------------------------------------
# Creating manifests: create (docs/providers.md)
# --------------------------------------------------------------------------------------------


@cli.command("create")
@click.option(
    "--hf",
    "hf_repos",
    multiple=True,
    metavar="ORG/REPO[@REVISION]",
    help="A Hugging Face model repo, pinned to a commit (a branch is resolved, with a warning).",
)
@click.option("--s3", "s3_uris", multiple=True, metavar="s3://BUCKET/PREFIX", help="An S3 prefix.")
@click.option(
    "--gcs", "gcs_uris", multiple=True, metavar="gs://BUCKET[/PREFIX]", help="A GCS prefix."
)
@click.option(
    "--azure",
    "azure_uris",
    multiple=True,
    metavar="azure://ACCOUNT/CONTAINER/PREFIX",
    help="An Azure Blob prefix (or https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX).",
)
@click.option(
    "--models",
    "models_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A JSON/YAML list of model repos (the manifest 'models' format), added after the "
    "sources above.",
)
@click.option(
    "--allow", multiple=True, metavar="GLOB", help="Keep only matching files (repeatable)."
)
@click.option("--ignore", multiple=True, metavar="GLOB", help="Drop matching files (repeatable).")
@click.option("--volume-folder", default="", help="Folder under the model path [default: none].")
@click.option(
    "--model-path", default="/app/model_cache", show_default=True, help="Root of every file_name."
)
@click.option(
    "--secret",
    metavar="NAME",
    default="hf_access_token",
    show_default=True,
    help="runtime_secret_name of every source (/secrets/NAME or TRUSS_SECRET_NAME).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the manifest here (atomically) instead of stdout.",
)
@control_options
@handles_errors
def create_cmd(
    hf_repos: tuple[str, ...],
    s3_uris: tuple[str, ...],
    gcs_uris: tuple[str, ...],
    azure_uris: tuple[str, ...],
    models_file: Path | None,
    allow: tuple[str, ...],
    ignore: tuple[str, ...],
    volume_folder: str,
    model_path: str,
    secret: str,
    output: Path | None,
    **opts: Any,
) -> None:
    """Build a bptr manifest from Hugging Face repos and S3/GCS/Azure prefixes.

    Sources are processed in the order --hf, --s3, --gcs, --azure, then --models; the patterns
    use truss-transfer's glob dialect (only '*', which also matches '/'; ignore wins). Same
    output as truss_transfer.create_basetenpointer_from_models: pretty JSON with
    '"models": null'.
    """
    from .create import create_manifest
    from .errors import ConfigError
    from .manifest import ModelRepo, parse_manifest

    def repo(repo_id: str, kind: str, revision: str = "") -> ModelRepo:
        return ModelRepo(
            repo_id=repo_id,
            revision=revision,
            volume_folder=volume_folder,
            kind=kind,
            allow_patterns=allow or None,
            ignore_patterns=ignore or None,
            runtime_secret_name=secret,
        )

    repos = [repo(r.partition("@")[0], "hf", r.partition("@")[2]) for r in hf_repos]
    repos += [repo(u, "s3") for u in s3_uris]
    repos += [repo(u, "gcs") for u in gcs_uris]
    repos += [repo(u, "azure") for u in azure_uris]
    if models_file is not None:
        import json

        import yaml

        doc = yaml.safe_load(models_file.read_text())
        if isinstance(doc, list):
            doc = {"models": doc}
        if not isinstance(doc, dict):
            raise ConfigError(f"{models_file}: expected a list of model repos")
        listed = parse_manifest(
            json.dumps({"pointers": [], "models": doc.get("models")}), source=str(models_file)
        )
        repos += list(listed.models or ())
    if not repos:
        raise ConfigError("nothing to create: give --hf, --s3, --gcs, --azure or --models")
    manifest = create_manifest(repos, model_path)
    text = manifest.dumps() + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, output)
    click.echo(
        f"ttfs: {len(manifest.pointers)} pointer(s), "
        f"{sum(p.size for p in manifest.pointers)} bytes from {len(repos)} source(s)"
        + (f" written to {output}" if output is not None else ""),
        err=True,
    )


def main() -> None:
    from .procs import claim_process

    # Our own process: larger socket reads once a client is made (providers/_stream.py);
    # not imported here, so a mount stays free of httpx until it is ready.
    claim_process()
    cli(prog_name="ttfs")


if __name__ == "__main__":
    main()
