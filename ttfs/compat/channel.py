"""The pipe between ``lazy_data_resolve`` and its resolve child: one JSON object per line.

The child (:mod:`ttfs.compat.child`) sends, in order: ``{"hello": pid}`` once it runs, any
number of ``{"log": record}``, then exactly one ``{"result": dir}`` or ``{"error": error}``. The
caller reads them with a plain blocking read (no GIL held while it waits) and turns them back
into what the in-process resolve would have given: log records handled by the caller's
``ttfs`` loggers (so an application's handlers and pytest's caplog see them) and the same
exception, of the same class with the same message and ``__cause__`` chain.

Why JSON and not pickle: the two ends may not be the same build (the child's interpreter can be
named by ``TTFS_RESOLVE_CHILD``), and nothing here needs more than strings and numbers.
"""

from __future__ import annotations

import importlib
import json
import logging
from typing import Any

from ..errors import TtfsError

_CAUSE_DEPTH = 4  # enough for "Download failure" -> DownloadError -> provider error


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One message; a line that is not ours (a stray print to the fd) is ``{}``."""
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _plain(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def encode_error(error: BaseException, depth: int = 0) -> dict[str, Any]:
    """Class, ``args``, message, plain attributes and cause of ``error``, as JSON values."""
    cls = type(error)
    out: dict[str, Any] = {
        "module": cls.__module__,
        "type": cls.__qualname__,
        "message": str(error),
        "args": list(error.args) if all(_plain(a) for a in error.args) else [str(error)],
        "attrs": {k: v for k, v in vars(error).items() if _plain(v) and not k.startswith("__")},
    }
    cause = error.__cause__
    if cause is not None and depth < _CAUSE_DEPTH:
        out["cause"] = encode_error(cause, depth + 1)
    return out


def _find_class(module: str, name: str) -> type[Exception]:
    """The exception class the child raised, as the caller imports it; TtfsError if the caller
    cannot import it (the message still says what happened)."""
    try:
        found = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return TtfsError
    if isinstance(found, type) and issubclass(found, Exception):
        return found
    return TtfsError


def decode_error(data: dict[str, Any]) -> Exception:
    """Rebuild the child's exception without calling its ``__init__`` (some take more than a
    message, e.g. DownloadError's file name and cause): ``args`` and plain attributes are set as
    they were, so ``str()``, ``.args`` and attributes such as ``file_name`` read the same."""
    cls = _find_class(str(data.get("module", "")), str(data.get("type", "")))
    message = str(data.get("message", ""))
    error = cls.__new__(cls)
    error.args = tuple(data.get("args") or (message,))
    if str(error) != message:
        error.args = (message,)
    for key, value in dict(data.get("attrs") or {}).items():
        try:
            setattr(error, key, value)
        except (AttributeError, TypeError):
            continue
    if isinstance(data.get("cause"), dict):
        error.__cause__ = decode_error(data["cause"])
    return error


def encode_record(record: logging.LogRecord) -> dict[str, Any]:
    """What the caller's handlers need of a child's log record: the message is formatted here
    (its arguments may not be JSON), a traceback travels as text."""
    out: dict[str, Any] = {
        "name": record.name,
        "levelno": record.levelno,
        "levelname": record.levelname,
        "msg": record.getMessage(),
        "created": record.created,
        "process": record.process,
        "threadName": record.threadName,
    }
    if record.exc_info:
        out["exc_text"] = logging.Formatter().formatException(record.exc_info)
    return out


def decode_record(data: dict[str, Any]) -> logging.LogRecord:
    fields = dict(data)
    fields["args"] = None
    fields.setdefault("processName", "ttfs-resolve")
    record = logging.makeLogRecord(fields)
    record.msecs = (record.created - int(record.created)) * 1000
    return record
