"""The resolve child (`python -m ttfs.compat.child FD PPID`), started by ttfs.compat.offload.

Reads one request (JSON) on stdin, resolves in this process exactly as ``lazy_data_resolve``
does in-process, and reports on FD (:mod:`ttfs.compat.channel`): ``hello`` first (so the caller
can tell "this interpreter cannot run us" from "the resolve failed"), the ``ttfs`` log records,
then the result or the error. Nothing is printed: the caller's handlers print the records.

Before anything that may import an optional module, the caller's import state is applied (its
``sys.path`` first, then ours; modules it blocked with ``sys.modules[name] = None`` are blocked
here too), so both processes make the same choices (blake3 present or not).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import IO, Any

from ..procs import claim_process, die_with_parent
from . import channel

_SEND_LOCK = threading.Lock()  # one line per message: trio's worker threads log too


class _Forward(logging.Handler):
    """Sends each record to the caller, one line per record."""

    def __init__(self, out: IO[bytes]) -> None:
        super().__init__()
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        send(self.out, {"log": channel.encode_record(record)})


def send(out: IO[bytes], message: dict[str, Any]) -> None:
    data = channel.encode(message)
    try:
        with _SEND_LOCK:
            out.write(data)
    except OSError:
        os._exit(1)  # the caller is gone (PR_SET_PDEATHSIG is on its way)


def _apply_import_state(request: dict[str, Any]) -> None:
    own = list(sys.path)
    sys.path[:] = [str(p) for p in request.get("sys_path") or []]
    sys.path.extend(p for p in own if p not in sys.path)
    for name in request.get("blocked") or []:
        sys.modules.setdefault(str(name), None)  # type: ignore[arg-type]


def main(argv: list[str]) -> None:
    fd, ppid = int(argv[0]), int(argv[1])
    die_with_parent(ppid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller decides how a Ctrl-C ends us
    claim_process()  # our own process: larger socket reads when the first client is made
    out = os.fdopen(fd, "wb", buffering=0)
    send(out, {"hello": os.getpid()})
    request = channel.decode(sys.stdin.buffer.read())
    _apply_import_state(request)
    logger = logging.getLogger("ttfs")
    logger.setLevel(int(request.get("log_level") or logging.INFO))
    logger.addHandler(_Forward(out))
    logger.propagate = False

    from .truss_transfer import PyModelRepo, resolve_here

    try:
        models = [PyModelRepo(**m) for m in request.get("models") or []]
        result = resolve_here(request.get("download_dir"), models, request.get("model_path"))
    except Exception as e:
        send(out, {"error": channel.encode_error(e)})
        sys.exit(1)
    send(out, {"result": result})


if __name__ == "__main__":
    main(sys.argv[1:])
