"""A worker process: range GETs written straight into blob files, one report per landed block.

Started by :class:`~ttfs.transfer.pool.WorkerPool` as ``python -m ttfs.transfer.worker FD PPID
THREADS CONNECT STALL SPLICE`` (its settings come from the coordinator's, never from the
environment); FD is its end of a socketpair with the coordinator. Each job runs in a thread of its
own (``THREADS`` at most at once; the coordinator's connection budget bounds them anyway): GET
with :func:`~ttfs.transfer.wire.ranged_get`; a TLS body goes into a 1 MiB buffer that thread
reuses, is ``pwrite``n at its offset and hashed (xxh3 per block) from the same buffer; a plain
HTTP body is spliced into the file by the kernel and hashed through a read-only mapping. A ``b``
report goes out when a block is whole. The coordinator owns everything else (presence, journal,
verification, retries).

Lifetime: the worker exits when the coordinator dies, either way it is told: the kernel's
``PR_SET_PDEATHSIG`` (SIGKILL when the parent dies) and EOF on the socket. It ignores SIGINT: a
Ctrl-C in a terminal reaches the whole process group, and the coordinator, not the worker,
decides how a run ends (it closes the socket, the worker exits). A killed worker loses only its
in-flight ranges; the coordinator fetches them again from the last reported block.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from os import _exit  # leave at once: no atexit, no thread joins (the coordinator is gone)
from typing import Any

import xxhash

from ..errors import CacheError, CacheFull, TtfsError
from ..procs import die_with_parent
from .protocol import Decoder, Job, encode
from .wire import BUFFER, NO_SPLICE, Connections, ranged_get


class Worker:
    def __init__(
        self, sock: socket.socket, threads: int, connect: float, stall: float, splice: bool = True
    ) -> None:
        self.sock = sock
        self.splice = splice
        self.connect = connect
        self.stall = stall
        self._send_lock = threading.Lock()
        self._cancelled: set[int] = set()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="get")
        self._local = threading.local()

    def send(self, msg: dict[str, Any]) -> None:
        frame = encode(msg)
        with self._send_lock:
            try:
                self.sock.sendall(frame)
            except OSError:
                _exit(0)  # the coordinator is gone

    def serve(self) -> None:
        decoder = Decoder()
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                _exit(0)  # EOF: the coordinator closed us or died
            for msg in decoder.feed(data):
                op = msg.get("op")
                if op == "get":
                    self._pool.submit(self._run, Job.from_message(msg))
                elif op == "cancel":
                    self._cancelled.add(int(msg["id"]))

    # -- one job (a thread) --------------------------------------------------------------------
    def _thread_state(self) -> tuple[Connections, memoryview]:
        local = self._local
        if not hasattr(local, "conns"):
            local.conns = Connections(self.connect, self.stall)
            local.buf = memoryview(bytearray(BUFFER))
        return local.conns, local.buf

    def _run(self, job: Job) -> None:
        landing: _Landing | None = None
        try:
            conns, buf = self._thread_state()
            landing = _Landing(self, job, buf)
            try:
                ranged_get(
                    conns,
                    job.url,
                    job.headers,
                    landing.pos,
                    job.end,
                    name=job.name,
                    size=job.size,
                    buf=buf,
                    on_chunk=landing.write,
                    limit=landing.limit,
                    cancelled=lambda: job.id in self._cancelled,
                    splice_to=landing if self.splice else None,
                )
            finally:
                landing.close()
        except TtfsError as e:
            self.send(_end(job, e, landing))
        except Exception as e:  # a bug: report it rather than hang the coordinator's run
            self.send(_end(job, CacheError(f"worker failed: {type(e).__name__}: {e}"), landing))
        else:
            self.send(_end(job, None, landing))
        finally:
            self._cancelled.discard(job.id)


def _end(job: Job, e: TtfsError | None, landing: _Landing | None) -> dict[str, Any]:
    """The job's last report: ``ok`` or the error, plus a partial block it left behind."""
    msg: dict[str, Any] = {"id": job.id, "end": "ok" if e is None else type(e).__name__}
    if e is not None:
        msg["msg"] = str(e)
        retry_after = getattr(e, "retry_after", None)
        if retry_after is not None:
            msg["retry_after"] = retry_after
        kind = getattr(e, "kind", None)
        if kind is not None:
            msg["kind"] = kind  # the metrics' errors{kind} (TransientError only)
    if landing is not None and landing.in_block:
        msg["partial"] = [landing.block, landing.in_block, landing.hasher.intdigest()]
        msg["n"] = landing.new
    return msg


class _Landing:
    """Where the body bytes of one job go: pwrite (or splice) at the right offset, xxh3 per block.

    ``buf`` is the thread's body buffer; :meth:`from_pipe` borrows it to read spliced bytes
    back for the checksum (the wire does not use it while it splices).
    """

    def __init__(self, worker: Worker, job: Job, buf: memoryview) -> None:
        self.worker = worker
        self.job = job
        self.buf = buf
        self._map: mmap.mmap | None = None  # the job's range, for hashing spliced bytes
        self._map_base = 0
        self._view: memoryview | None = None
        try:
            self.fd = os.open(job.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise CacheError(f"cannot open cache file {job.path}: {e}") from None
        try:
            if os.fstat(self.fd).st_ino != job.ino:
                raise CacheError(f"cache file {job.path} was replaced")
            self.block = job.block
            block_start = job.block * job.block_size
            self.block_end = min(block_start + job.block_size, job.size)
            self.hasher = xxhash.xxh3_64()
            self.in_block = job.prefix
            if job.prefix:
                prefix = os.pread(self.fd, job.prefix, block_start)
                if len(prefix) != job.prefix:
                    raise CacheError(f"cache file {job.path} is shorter than expected")
                self.hasher.update(prefix)
            self.pos = block_start + job.prefix
            self.new = 0
        except BaseException:
            os.close(self.fd)
            raise

    def limit(self, n: int) -> int:
        """Keep one read inside the current block (one pwrite, one hash update per piece)."""
        return min(n, self.block_end - self.pos)

    def write(self, view: memoryview) -> None:
        try:
            written = os.pwrite(self.fd, view, self.pos)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFull(f"no space left for cache file {self.job.path}: {e}") from None
            raise CacheError(f"cannot write {self.job.path}: {e}") from None
        if written != len(view):
            raise CacheFull(f"no space left for cache file {self.job.path} (short write)")
        self.hasher.update(view)
        self._landed(written)

    def from_pipe(self, pipe: int, n: int) -> None:
        """Splice ``n`` bytes waiting in ``pipe`` to the file at ``pos`` (the wire's SpliceTarget).

        The checksum reads them through the job's mapping of the page cache
        (:meth:`_account`). A file system that refuses splice writes gets the bytes read out
        of the pipe into the thread's buffer and ``pwrite``n as usual.
        """
        moved = 0
        try:
            while moved < n:
                k = os.splice(pipe, self.fd, n - moved, offset_dst=self.pos + moved)
                if not k:
                    raise CacheError(f"cannot write {self.job.path}: splice moved nothing")
                moved += k
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFull(f"no space left for cache file {self.job.path}: {e}") from None
            if e.errno not in NO_SPLICE:
                raise CacheError(f"cannot write {self.job.path}: {e}") from None
            self._account(moved)
            while moved < n:  # the file refused splice: through the buffer instead
                k = os.readv(pipe, [self.buf[: min(len(self.buf), n - moved)]])
                self.write(self.buf[:k])
                moved += k
            return
        self._account(n)

    def _account(self, n: int) -> None:
        """Hash the ``n`` bytes the kernel put at ``pos`` (through the job's mapping) and move on.

        Why a mapping and not ``preadv`` into the buffer: the read-back copy was the largest
        item of the workers' profile once splice removed the socket copy (perf: ``_copy_to_iter``
        ~30% of their samples; by the time a piece is hashed, other threads and processes have
        pushed it out of the CPU cache). xxh3 over a shared read-only mapping of the page cache
        reads each byte once and writes nothing; the job maps its range once (faults map 16
        pages at a time). Touching only bytes just written keeps it clear of SIGBUS unless the
        file is truncated under the worker, which costs the worker (and a refetch), nothing else.
        """
        if self._map is None:
            self._map_base = self.pos - self.pos % mmap.ALLOCATIONGRANULARITY
            self._map = mmap.mmap(
                self.fd, self.job.end - self._map_base, prot=mmap.PROT_READ, offset=self._map_base
            )
            self._view = memoryview(self._map)
        done = 0
        while done < n:
            k = min(self.block_end - self.pos, n - done)
            at = self.pos - self._map_base
            assert self._view is not None
            self.hasher.update(self._view[at : at + k])
            self._landed(k)
            done += k

    def _landed(self, written: int) -> None:
        """``written`` more bytes of the body are at ``pos`` and hashed: report whole blocks."""
        self.pos += written
        self.in_block += written
        self.new += written
        if self.pos >= self.block_end:
            self.worker.send(
                {"id": self.job.id, "b": self.block, "s": self.hasher.intdigest(), "n": self.new}
            )
            self.new = 0
            self.in_block = 0
            self.block += 1
            self.hasher = xxhash.xxh3_64()
            self.block_end = min(self.block_end + self.job.block_size, self.job.size)

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
        if self._map is not None:
            self._map.close()
        os.close(self.fd)


def main(argv: list[str]) -> int:
    fd, ppid, threads = int(argv[0]), int(argv[1]), int(argv[2])
    connect, stall = float(argv[3]), float(argv[4])
    # Settings.splice (TTFS_SPLICE), where os.splice exists.
    splice = argv[5] == "1" and hasattr(os, "splice")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(ppid)
    sock = socket.socket(fileno=fd)
    Worker(sock, threads, connect, stall, splice).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
