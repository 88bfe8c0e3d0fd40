"""Logging setup shared by the CLI, the daemon and the truss_transfer shim.

The line format is truss-transfer's (``[YYYY-MM-DD HH:MM:SS] [LEVEL] message``, UTC, to stderr)
so log scrapers written for it keep working. The level comes from ``--log-level``, else
``TTFS_LOG``, else ``TRUSS_TRANSFER_LOG``, else ``RUST_LOG`` (bare levels only, as upstream),
else ``info``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping

_LEVELS = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
    "off": logging.CRITICAL + 10,
}
_NAMES = {logging.WARNING: "WARN", logging.CRITICAL: "ERROR"}


class UpstreamFormatter(logging.Formatter):
    """``[2026-11-27 03:16:07] [INFO ] message`` in UTC."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record.created))
        level = _NAMES.get(record.levelno, record.levelname)
        text = f"[{stamp}] [{level:<5}] {record.getMessage()}"
        if record.exc_info and logging.getLogger("ttfs").isEnabledFor(logging.DEBUG):
            text += "\n" + self.formatException(record.exc_info)
        return text


def level_from_env(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    for name in ("TTFS_LOG", "TRUSS_TRANSFER_LOG", "RUST_LOG"):
        raw = env.get(name)
        if raw:
            return _LEVELS.get(raw.strip().lower(), logging.INFO)
    return logging.INFO


def setup_logging(
    level: int | str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    propagate: bool = True,
) -> None:
    """Install one stderr handler on the ``ttfs`` logger (idempotent).

    The CLI passes ``propagate=False``; the library keeps propagation so an application's own
    handlers (and pytest's caplog) still see our records.
    """
    if isinstance(level, str):
        level = _LEVELS.get(level.lower(), logging.INFO)
    if level is None:
        level = level_from_env(env)
    logger = logging.getLogger("ttfs")
    logger.setLevel(level)
    for handler in logger.handlers:
        if getattr(handler, "_ttfs", False):
            handler.setLevel(level)
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(UpstreamFormatter())
    handler._ttfs = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = propagate
