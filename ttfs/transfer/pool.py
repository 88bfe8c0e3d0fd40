"""The coordinator's side of the worker processes: spawn, hand out ranges, collect reports.

:meth:`WorkerPool.run` sends one :class:`~ttfs.transfer.protocol.Job` to the least busy worker
and calls ``on_block`` for every block it reports landed, on the event loop, in order; it returns
when the worker ends the job, or raises the error the worker reported (rebuilt from
:mod:`ttfs.errors`, so retries, re-resolution and size checks work as on the in-process path).

A worker that dies (killed, crashed) fails its in-flight jobs with a
:class:`~ttfs.errors.TransientError` (the scheduler's retry fetches them again from the last
reported block) and is started again. A cancelled :meth:`run` (a preempted prefetch, shutdown)
tells the worker to drop the job and returns at once; bytes the worker still writes are the
origin's bytes at their offsets, never reported, so they cost nothing but a refetch.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import errors
from ..errors import CacheError, TransientError, TtfsError
from .protocol import Decoder, Job, encode

log = logging.getLogger(__name__)

OnBlock = Callable[[int, int, int], None]  # block, xxh3, new bytes
OnPartial = Callable[[int, int, int, int], None]  # block, bytes valid, xxh3, new bytes

# Seconds a closing pool waits for a worker to exit after EOF before killing it.
_EXIT_GRACE = 2.0


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


@dataclass(slots=True, eq=False)
class _Pending:
    job: Job
    on_block: OnBlock
    on_partial: OnPartial
    done: trio.Event = field(default_factory=trio.Event)
    result: dict[str, Any] | None = None


@dataclass(slots=True, eq=False)
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    sock: trio.socket.SocketType
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    jobs: dict[int, _Pending] = field(default_factory=dict)
    alive: bool = True


class WorkerPool:
    """``n`` worker processes, each running up to ``threads`` ranges at once."""

    def __init__(
        self,
        n: int,
        threads: int,
        connect_timeout: float,
        stall_timeout: float,
        splice: bool = True,
    ) -> None:
        self.n = n
        self.threads = threads
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self.splice = splice
        self._workers: list[_Worker | None] = [None] * n
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self._ready = trio.Event()
        self._closing = False
        self.restarts = 0

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, nursery: trio.Nursery) -> None:
        """Spawn the workers (their start is awaited by the first :meth:`run`, not here)."""
        self._nursery = nursery
        for i in range(self.n):
            self._spawn(i)
        self._ready.set()

    def _spawn(self, index: int) -> None:
        assert self._nursery is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ttfs.transfer.worker",
                    str(theirs.fileno()),
                    str(os.getpid()),
                    str(self.threads),
                    str(self.connect_timeout),
                    str(self.stall_timeout),
                    "1" if self.splice else "0",
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        except OSError as e:
            ours.close()
            raise CacheError(f"cannot start a worker process: {e}") from e
        finally:
            theirs.close()
        worker = _Worker(index, proc, trio.socket.from_stdlib_socket(ours))
        self._workers[index] = worker
        self._nursery.start_soon(self._reader, worker)

    async def aclose(self) -> None:
        """Close every worker's socket (they exit on EOF) and reap them; kill laggards."""
        self._closing = True
        workers = [w for w in self._workers if w is not None]
        log.debug(
            "closing %d worker(s); CPU seconds used: %s",
            len(workers),
            ", ".join(f"{_cpu_seconds(w.proc.pid):.2f}" for w in workers),
        )
        for w in workers:
            w.alive = False
            w.sock.close()
        for w in workers:
            try:
                await trio.to_thread.run_sync(functools.partial(w.proc.wait, _EXIT_GRACE))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    w.proc.kill()
                await trio.to_thread.run_sync(w.proc.wait)
        self._workers = [None] * self.n
        log.debug("workers closed")

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w is not None and w.alive]

    # -- jobs ----------------------------------------------------------------------------------
    async def run(
        self, job_fields: dict[str, Any], on_block: OnBlock, on_partial: OnPartial
    ) -> None:
        """Run one range on a worker; see the module docstring.

        Raises:
            TtfsError: the class the worker reported (TransientError when it died).
        """
        await self._ready.wait()
        worker = self._least_busy()
        job = Job(id=next(self._ids), **job_fields)
        pending = _Pending(job, on_block, on_partial)
        worker.jobs[job.id] = pending
        try:
            try:
                async with worker.send_lock:
                    await _send_all(worker.sock, job.frame())
            except OSError:
                pass  # the reader sees the death and fails this job
            await pending.done.wait()
        except BaseException:
            if worker.jobs.pop(job.id, None) is not None and worker.alive:
                with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                    async with worker.send_lock:
                        await _send_all(worker.sock, encode({"op": "cancel", "id": job.id}))
            raise
        worker.jobs.pop(job.id, None)
        result = pending.result
        assert result is not None
        if "partial" in result:
            block, valid, digest = result["partial"]
            on_partial(block, valid, digest, int(result.get("n", 0)))
        if result["end"] != "ok":
            raise _error(result)

    def _least_busy(self) -> _Worker:
        live = [w for w in self._workers if w is not None and w.alive]
        if not live:
            raise TransientError("no worker process is running")
        return min(live, key=lambda w: len(w.jobs))

    async def _reader(self, worker: _Worker) -> None:
        decoder = Decoder()
        try:
            while True:
                try:
                    data = await worker.sock.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    break
                for msg in decoder.feed(data):
                    pending = worker.jobs.get(msg["id"])
                    if pending is None:
                        continue  # a cancelled job's late report
                    if "b" in msg:
                        pending.on_block(msg["b"], msg["s"], msg["n"])
                    elif "end" in msg:
                        pending.result = msg
                        pending.done.set()
        except BaseException:
            self._closing = True  # cancelled: the pool is shutting down, start nothing new
            self._lost(worker)
            raise
        self._lost(worker)

    def _lost(self, worker: _Worker) -> None:
        """The worker's socket ended: fail its jobs and, unless closing, start another."""
        was_alive = worker.alive
        worker.alive = False
        with contextlib.suppress(OSError):
            worker.sock.close()
        code = worker.proc.poll()
        for pending in list(worker.jobs.values()):
            pending.result = {
                "id": pending.job.id,
                "end": "TransientError",
                "msg": f"worker process {worker.proc.pid} exited ({code})",
            }
            pending.done.set()
        worker.jobs.clear()
        if was_alive and not self._closing:
            log.warning(
                "worker process %d ended (%s); its ranges are fetched again", worker.proc.pid, code
            )
            with contextlib.suppress(OSError):
                worker.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=1.0)
            self.restarts += 1
            try:
                self._spawn(worker.index)
            except CacheError as e:  # the slot stays empty; the others carry on
                self._workers[worker.index] = None
                log.error("%s", e)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _error(result: dict[str, Any]) -> TtfsError:
    """Rebuild the error a worker reported from its class name (only :mod:`ttfs.errors`)."""
    cls = getattr(errors, str(result.get("end")), None)
    message = str(result.get("msg", "worker error"))
    if not (isinstance(cls, type) and issubclass(cls, TtfsError)):
        return CacheError(message)
    if issubclass(cls, TransientError):
        return cls(
            message,
            retry_after=result.get("retry_after"),
            kind=str(result.get("kind") or "transient"),
        )
    if cls is errors.DownloadError:
        return CacheError(message)
    return cls(message)
