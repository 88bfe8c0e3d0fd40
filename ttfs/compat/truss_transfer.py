"""The ``truss_transfer`` Python API (spec §5), implemented on ttfs.

Signatures, defaults and positional order match truss-transfer 0.0.43 exactly. Behaviour follows
spec §3 (download-dir selection, manifest lookup and merge, expiry warnings, stats file, return
value, ``Exception`` on failure) with ttfs's fixes: files appear only complete and verified, a
killed resolve resumes, ``..`` in file names is refused.

Differences, on purpose: environment variables are read at every call (upstream caches them per
process), and garbage in a numeric variable is an error (one line, naming the variable) instead of
a silent default.

Errors carry upstream's texts where users match on them: a failed download is
``Download failure: <cause>``; a manifest that cannot be parsed, a bad model repo or a bad
environment value is the plain message, as upstream returns them. Nothing here logs the error:
the caller (or the CLI, ``truss_transfer/__main__.py``) reports it once.

Resolves in one process are serialised by a lock, as upstream's global mutex does: a second
caller (another thread) blocks until the first is done and then finds the files in place.
The resolve itself runs in a child process (:mod:`ttfs.compat.offload`), so waiting on it, like
waiting on the lock, leaves the caller's other threads the whole interpreter; for running model
code while the weights arrive, see :mod:`ttfs.compat.background`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence

import trio

from ..config import Settings, truthy
from ..create import create_manifest, expand_pointers
from ..errors import ConfigError, DownloadError, TtfsError
from ..manifest import ModelRepo, find_manifests
from ..resolve import ResolveReport, resolve, write_stats
from ..telemetry.logs import setup_logging
from .offload import ChildRequest, child_interpreter, resolve_in_child

log = logging.getLogger("ttfs.truss_transfer")

__version__ = "0.0.43"
DEFAULT_DOWNLOAD_DIR = "/tmp/truss_transfer"
VALID_KINDS = frozenset({"http", "hf", "gcs", "s3", "azure"})
# Upstream's process-wide mutex: one resolve at a time per process.
_RESOLVE_LOCK = threading.Lock()


class PyModelRepo:
    """A model repo to turn into pointers (spec §5.2); every attribute is read/write."""

    def __init__(
        self,
        repo_id: str,
        revision: str = "",
        volume_folder: str = "",
        kind: str = "hf",
        allow_patterns: list[str] | None = None,
        ignore_patterns: list[str] | None = None,
        runtime_secret_name: str = "hf_access_token",
    ) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.volume_folder = volume_folder
        self.kind = kind
        self.allow_patterns = allow_patterns
        self.ignore_patterns = ignore_patterns
        self.runtime_secret_name = runtime_secret_name

    def __repr__(self) -> str:
        return (
            f"PyModelRepo(repo_id={self.repo_id!r}, revision={self.revision!r}, "
            f"volume_folder={self.volume_folder!r}, kind={self.kind!r})"
        )

    def fields(self) -> dict[str, object]:
        """The constructor's arguments, as JSON values (for the resolve child)."""
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "volume_folder": self.volume_folder,
            "kind": self.kind,
            "allow_patterns": self.allow_patterns,
            "ignore_patterns": self.ignore_patterns,
            "runtime_secret_name": self.runtime_secret_name,
        }

    def to_model_repo(self) -> ModelRepo:
        if self.kind not in VALID_KINDS:
            raise TtfsError(f"Unknown kind: {self.kind}")
        return ModelRepo(
            repo_id=self.repo_id,
            revision=self.revision,
            volume_folder=self.volume_folder,
            kind=self.kind,
            allow_patterns=tuple(self.allow_patterns) if self.allow_patterns is not None else None,
            ignore_patterns=tuple(self.ignore_patterns)
            if self.ignore_patterns is not None
            else None,
            runtime_secret_name=self.runtime_secret_name,
        )


def create_basetenpointer_from_models(
    models: Sequence[PyModelRepo], model_path: str = "/app/model_cache"
) -> str:
    """Build a manifest from model repos: pretty JSON ``{"pointers": [...], "models": null}``.

    Repos are processed in order (spec §2.1); Hugging Face repos, ``gs://``, ``s3://`` and
    ``azure://`` prefixes are routed by ``kind`` and ``repo_id`` (spec §2.2).

    Raises:
        Exception: (a TtfsError) an unknown ``kind``, a bad URI, missing credentials, a repo
            that does not exist or cannot be read, nothing listed or nothing matched.
    """
    repos = [model.to_model_repo() for model in models]  # validates kind like upstream
    return create_manifest(repos, model_path).dumps()


def _download_dir(download_dir: str | None) -> str:
    if download_dir is not None:
        return download_dir  # "" is used as-is (CWD-relative), as upstream
    return os.environ.get("TRUSS_TRANSFER_DOWNLOAD_DIR") or DEFAULT_DOWNLOAD_DIR


def monitor_secs(env: Mapping[str, str] | None = None) -> float:
    """``TRUSS_TRANSFER_DOWNLOAD_MONITOR_SECS`` (default 30).

    Raises:
        ConfigError: the value is not a positive number.
    """
    raw = (os.environ if env is None else env).get("TRUSS_TRANSFER_DOWNLOAD_MONITOR_SECS")
    if raw is None or raw.strip() == "":
        return 30.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:  # also NaN
        raise ConfigError(f"TRUSS_TRANSFER_DOWNLOAD_MONITOR_SECS={raw!r} is not a positive number")
    return value


def lazy_data_resolve(
    download_dir: str | None = None,
    models: list[PyModelRepo] | None = None,
    model_path: str | None = None,
) -> str:
    """Download every file of the bptr manifests (and JIT models) and return the download dir.

    The resolve runs in a child process (:mod:`ttfs.compat.offload`) while this thread waits in
    a blocking read that holds no GIL: the caller's model code keeps the interpreter to itself.
    Where no Python can be started for it (an embedded interpreter, ``TTFS_RESOLVE_CHILD=off``)
    it runs here, as :func:`resolve_here` does.

    Raises:
        Exception: (a TtfsError) with truss-transfer's message text on any failure.
    """
    if models and model_path is None:
        raise TtfsError("model_path must be provided when models are provided")
    setup_logging()
    with _RESOLVE_LOCK:  # waiting releases the GIL
        python = child_interpreter()
        # Model repos travel as their seven fields; anything else (a subclass, a look-alike)
        # is resolved here, where its own to_model_repo() runs as it always has.
        if python is not None and all(type(m) is PyModelRepo for m in models or []):
            request = ChildRequest(download_dir, [m.fields() for m in models or []], model_path)
            result = resolve_in_child(python, request)
            if result is not None:
                return result
        return _resolve_locked(download_dir, models, model_path)


def resolve_here(
    download_dir: str | None = None,
    models: list[PyModelRepo] | None = None,
    model_path: str | None = None,
) -> str:
    """:func:`lazy_data_resolve` in this process: for processes that are ttfs's own (the CLI,
    the resolve child), where no model code competes for the interpreter.

    Raises:
        Exception: (a TtfsError) with truss-transfer's message text on any failure.
    """
    if models and model_path is None:
        raise TtfsError("model_path must be provided when models are provided")
    with _RESOLVE_LOCK:
        return _resolve_locked(download_dir, models, model_path)


def _resolve_locked(
    download_dir: str | None, models: list[PyModelRepo] | None, model_path: str | None
) -> str:
    target = _download_dir(download_dir)
    log.info("truss_transfer_cli, version: %s (ttfs)", __version__)
    log.info("Starting downloads to: %s", target)
    report = ResolveReport()
    try:
        manifests = find_manifests()
        # JIT models (spec §3.2 step 4): expanded with the creator, merged last.
        jit = [m.to_model_repo() for m in models or []]
        pointers = expand_pointers(manifests, jit, model_path or "")
        log.info(
            "Successfully merged %d manifests. Total pointers: %d", len(manifests), len(pointers)
        )
        report.total_manifest_size_bytes = sum(p.size for p in pointers)
        if pointers:
            settings = Settings.from_env()
            monitor = monitor_secs()
            page_after = truthy(os.environ.get("TRUSS_TRANSFER_PAGE_AFTER_DOWNLOAD"))
            trio.run(
                lambda: resolve(
                    pointers,
                    target,
                    settings,
                    progress=False,
                    monitor_secs=monitor,
                    report=report,
                    page_after=page_after,
                )
            )
        report.success = True
    except DownloadError as e:
        # Upstream's text for a failed download task (spec §3.2 step 9); other errors (parse,
        # creation, configuration) are returned as they are, as upstream does.
        raise TtfsError(f"Download failure: {e}") from e
    finally:
        write_stats(report, os.environ.get("TTFS_STATS_FILE") or "/tmp/truss_transfer_stats.json")
    return target
