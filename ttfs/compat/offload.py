"""Run a ``lazy_data_resolve`` in a child process while the caller waits without the GIL.

Why: the resolve's coordinator (a trio loop: scheduling, presence, verification bookkeeping) is
Python. Run in the caller's process it takes the GIL from the model code that
``LazyDataResolverV2`` lets run meanwhile. In a child, the caller's waiting thread sits in a
blocking pipe read (no GIL held) and wakes only to hand on a log line (and, in the main
thread, five times a second to act on a signal: :func:`_lines`).

What stays the same as in-process: the return value, the exception (class, message, cause;
:mod:`ttfs.compat.channel`), log records (handled by the caller's ``ttfs`` loggers at the
caller's level), the environment (the child inherits ``os.environ`` as it is at the call, so
``TTFS_*`` / ``TRUSS_TRANSFER_*`` read at every call still are), the caller's import path and
blocked modules, the stats file, the in-process lock (held by the caller around the child) and
the cross-process flock (taken by the child inside the resolve, released when it ends).

Lifetime: the child dies with the caller (``PR_SET_PDEATHSIG``, :func:`ttfs.procs.die_with_parent`)
and ignores SIGINT (a terminal's Ctrl-C reaches the whole process group; the caller decides).
An exception in the waiting thread (KeyboardInterrupt, a SIGTERM handler's SystemExit) kills the
child before it propagates. A killed resolve resumes next time, as after ``kill -9``.

Where the child cannot run, the resolve runs in the caller (``None`` from here), with a debug
line: an interpreter that is not Python (``sys.executable`` of an embedded or frozen host), or
``TTFS_RESOLVE_CHILD=off``. ``TTFS_RESOLVE_CHILD=/path/to/python`` names the interpreter.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TtfsError
from . import channel

log = logging.getLogger("ttfs.truss_transfer")

ENV = "TTFS_RESOLVE_CHILD"
_OFF = frozenset({"0", "off", "false", "no", "n"})
_AUTO = frozenset({"", "auto", "1", "on", "true", "yes", "y"})
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)  # holds ttfs/
_EXIT_GRACE_SECS = 30.0
_WAKE_SECS = 0.2  # how soon the main thread acts on a signal another thread received
_broken: set[str] = set()  # interpreters that failed to start a child: not tried again
_broken_lock = threading.Lock()


@dataclass
class ChildRequest:
    """The call's arguments, plus what the child needs to import what the caller would."""

    download_dir: str | None
    models: list[dict[str, Any]]
    model_path: str | None
    sys_path: list[str] = field(default_factory=lambda: list(sys.path))
    blocked: list[str] = field(
        default_factory=lambda: sorted(n for n, m in sys.modules.items() if m is None)
    )
    log_level: int = field(default_factory=lambda: logging.getLogger("ttfs").getEffectiveLevel())

    def to_json(self) -> bytes:
        return channel.encode(self.__dict__)


def _looks_like_python(path: str) -> bool:
    name = os.path.basename(path).lower()
    return name.startswith(("python", "pypy")) and os.access(path, os.X_OK)


def child_interpreter() -> str | None:
    """The Python to run the resolve child with, or ``None`` to resolve in this process.

    Raises:
        ConfigError: ``TTFS_RESOLVE_CHILD`` names something that is not an executable file.
    """
    raw = os.environ.get(ENV, "").strip()
    if raw.lower() in _OFF:
        return None
    if raw.lower() in _AUTO:
        python = sys.executable
        if getattr(sys, "frozen", False) or not python or not _looks_like_python(python):
            log.debug(
                "resolving in this process: sys.executable %r is not a Python to run a child "
                "with (set %s=/path/to/python to name one)",
                python,
                ENV,
            )
            return None
    else:
        python = raw
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise ConfigError(f"{ENV}={raw!r} is neither off/auto nor an executable file")
    with _broken_lock:
        if python in _broken:
            return None
    return python


def _child_env() -> dict[str, str]:
    """The caller's environment, with this ttfs first on the child's import path."""
    env = dict(os.environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *parts])
    return env


def _relay(message: dict[str, Any]) -> None:
    """Hand a child's log record to the caller's logger of the same name, at its level."""
    data = message.get("log")
    if not isinstance(data, dict):
        return
    record = channel.decode_record(data)
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


def resolve_in_child(python: str, request: ChildRequest) -> str | None:
    """Run the resolve in a child of ``python``; its result, or ``None`` if no child could run.

    Raises:
        Exception: what the resolve raised in the child (same class, message and cause), or a
            TtfsError if the child died without saying (killed by a signal, out of memory).
    """
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            [python, "-m", "ttfs.compat.child", str(write_fd), str(os.getpid())],
            stdin=subprocess.PIPE,
            env=_child_env(),
            pass_fds=(write_fd,),
        )
    except OSError as e:
        os.close(read_fd)
        os.close(write_fd)
        _unusable(python, f"cannot start it: {e}")
        return None
    os.close(write_fd)
    hello = False
    outcome: dict[str, Any] = {}
    try:
        assert proc.stdin is not None
        try:
            proc.stdin.write(request.to_json())
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it exited at once; its exit status says why
        for line in _lines(read_fd):  # blocking reads: the GIL is free while the child works
            message = channel.decode(line)
            if "hello" in message:
                hello = True
            elif "log" in message:
                _relay(message)
            elif "result" in message or "error" in message:
                outcome = message
                break  # the last message: nothing after it is waited for
        code = _reap(proc, bool(outcome))
    except BaseException:
        proc.kill()  # Ctrl-C or a SIGTERM handler in the caller: leave nothing behind
        proc.wait()
        raise
    finally:
        os.close(read_fd)
    if "result" in outcome:
        return str(outcome["result"])
    if "error" in outcome:
        raise channel.decode_error(outcome["error"])
    if not hello:
        _unusable(python, f"it exited with status {code} before starting")
        return None
    how = f"signal {-code}" if code < 0 else f"exit status {code}"
    raise TtfsError(f"the resolve process (pid {proc.pid}) ended without a result ({how})")


def _lines(fd: int) -> Iterator[bytes]:
    """The child's messages, one line each, until it closes the pipe.

    In the main thread, the wait wakes every :data:`_WAKE_SECS`: the kernel hands a
    process-wide signal (a terminal's Ctrl-C) to any thread that does not block it, and when
    that is another of the caller's threads, Python's handler only flags it for the main thread,
    which a blocking read would not notice before the child's next message (possibly the end of
    the download). Woken, the interpreter runs the handler (KeyboardInterrupt) at once.
    """
    poller = None
    if threading.current_thread() is threading.main_thread():
        poller = select.poll()  # not select(): a descriptor above 1023 is fine
        poller.register(fd, select.POLLIN)
    pending = b""
    while True:
        if poller is not None and not poller.poll(_WAKE_SECS * 1000):
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            if pending:
                yield pending
            return
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield line + b"\n"


def _reap(proc: subprocess.Popen[bytes], answered: bool) -> int:
    """The child's exit status. One that has answered but does not exit (a thread that keeps
    its interpreter alive) is killed after a grace period: the files are in place, and its
    flock goes with it."""
    if not answered:
        return proc.wait()
    try:
        return proc.wait(timeout=_EXIT_GRACE_SECS)
    except subprocess.TimeoutExpired:
        log.warning(
            "the resolve process (pid %d) did not exit %.0fs after its result; killed",
            proc.pid,
            _EXIT_GRACE_SECS,
        )
        proc.kill()
        return proc.wait()


def _unusable(python: str, why: str) -> None:
    with _broken_lock:
        _broken.add(python)
    log.debug("resolving in this process: %s cannot run the resolve child: %s", python, why)
