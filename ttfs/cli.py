"""The ``ttfs`` command line: thin click commands that build Settings and call the core.

A :class:`~ttfs.errors.TtfsError` reaching a command prints one line (``ttfs: error: ...``) and
exits with the error's ``exit_code``; ``--debug`` adds the traceback chain. Anything else is a
bug and prints a traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import trio

from . import __version__
from .config import Settings
from .errors import TtfsError
from .manifest import find_manifests, load_manifest, merge_pointers, validate_pointers
from .resolve import STATS_FILE, ResolveReport, resolve, write_stats
from .telemetry.logs import setup_logging
from .units import parse_size

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


def common_options(f: F) -> F:
    """Options every command that fetches shares (declared once)."""
    options = [
        click.option(
            "--cache-dir",
            type=click.Path(path_type=Path),
            envvar="TTFS_CACHE_DIR",
            help="Block cache directory [default: /var/cache/ttfs as root, else "
            "$XDG_CACHE_HOME/ttfs].",
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
            "--no-verify",
            is_flag=True,
            default=False,
            help="Skip hashing blobs against the manifest.",
        ),
        click.option(
            "--log-level",
            type=click.Choice(["error", "warn", "info", "debug", "off"], case_sensitive=False),
            help="Log level [default: TTFS_LOG, TRUSS_TRANSFER_LOG, RUST_LOG or info].",
        ),
        click.option("--debug", is_flag=True, help="Show tracebacks of errors."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def settings_from(opts: dict[str, Any]) -> Settings:
    return Settings.from_env(
        cache_dir=opts.get("cache_dir"),
        cache_max_bytes=opts.get("cache_size"),
        max_connections=opts.get("max_connections"),
        verify=False if opts.get("no_verify") else None,
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
    settings = settings_from(opts)
    report = ResolveReport()
    try:
        manifests = [load_manifest(manifest)] if manifest else find_manifests()
        pointers = merge_pointers(manifests)
        validate_pointers(pointers)
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
        f"({report.origin_bytes} bytes from origin, {report.skipped} already present)",
        err=True,
    )


def main() -> None:
    cli(prog_name="ttfs")


if __name__ == "__main__":
    main()
