"""Process plumbing shared by the benchmarks: measured child processes, mounts, cleanup.

Every process a benchmark starts goes through :class:`Children`, which remembers its PID and
ends it (SIGTERM, then SIGKILL, by PID only) when the benchmark leaves its ``with`` block, even on
Ctrl-C or SIGTERM. Children run in their own session, so a Ctrl-C at the terminal reaches only
the driver, which then stops them in order (unmount first, then the daemons, then the servers).

Resource figures come from the kernel, not from the tools: :func:`run_measured` reaps a child
with ``wait4`` and reports its CPU seconds (user + system, its waited-for descendants
included) and peak RSS; :func:`proc_usage` reads ``/proc/<pid>`` of a daemon that is not our
child (the ttfs mount daemon is started by ``ttfs mount`` and outlives it).

Stdlib only, so that ``bench/scaling.py`` can use it on a machine with nothing but the wheels
ttfs needs.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from ttfs.procs import process_alive

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(RuntimeError):
    """A contender or a server failed; the message says which and where its log is."""


@dataclass(frozen=True, slots=True)
class Measured:
    """One finished child: wall seconds, CPU seconds, peak RSS in bytes, exit code, output.

    ``cpu`` covers the child and the descendants it waited for; ``maxrss`` is the child's own
    peak (VmHWM sampled every 5 ms, so a spike in its last milliseconds can be missed).
    """

    wall: float
    cpu: float
    maxrss: int
    rc: int
    out: str
    err: str

    def check(self, what: str) -> Measured:
        if self.rc != 0:
            tail = (self.err or self.out)[-2000:]
            raise BenchError(f"{what} exited {self.rc}:\n{tail}")
        return self


def with_repo_path(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the repo first on PYTHONPATH (children import ttfs and bench from the tree,
    installed or not), keeping what was there (e.g. a wheels dir on the GPU machine)."""
    out = dict(env)
    rest = [out["PYTHONPATH"]] if out.get("PYTHONPATH") else []
    out["PYTHONPATH"] = os.pathsep.join([str(REPO), *rest])
    return out


alive = process_alive  # one definition of "running" for ttfs and the bench


def stop_pid(pid: int, grace: float = 5.0) -> None:
    """SIGTERM ``pid``, wait up to ``grace`` seconds, then SIGKILL it; reap it if it is ours."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not alive(pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.02)
    _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


class Children:
    """PIDs to end when the benchmark stops; also turns SIGTERM into KeyboardInterrupt."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self._cleanups: list[tuple[str, object]] = []
        self._old: Callable[[int, FrameType | None], object] | int | None = None

    def add(self, pid: int) -> None:
        self.pids.append(pid)

    def discard(self, pid: int) -> None:
        with contextlib.suppress(ValueError):
            self.pids.remove(pid)

    def __enter__(self) -> Children:
        def on_term(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        self._old = signal.signal(signal.SIGTERM, on_term)
        # A shell starts background jobs with SIGINT ignored; Ctrl-C / kill -INT must still stop
        # the benchmark cleanly.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc: object) -> None:
        # Ignore further Ctrl-C while cleaning up: a half-done cleanup leaks mounts.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for pid in reversed(self.pids):
                stop_pid(pid)
            self.pids.clear()
        finally:
            signal.signal(signal.SIGINT, old_int)
            if self._old is not None:
                signal.signal(signal.SIGTERM, self._old)


CHILDREN = Children()
"""The process-wide registry; :func:`run_measured` and the mount helpers register here."""


def run_measured(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 900.0,
    cwd: Path | None = None,
) -> Measured:
    """Run ``cmd`` to completion and measure it with ``wait4`` (CPU and peak RSS of the child).

    Output goes to temporary files (a chatty child can never block on a full pipe). A child that
    runs past ``timeout`` is killed and reported with rc -9.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=None if env is None else dict(env),
            cwd=cwd or REPO,
            start_new_session=True,
        )
        CHILDREN.add(proc.pid)
        hwm = 0
        try:
            deadline = t0 + timeout
            while True:
                # VmHWM of the child's own address space: wait4's ru_maxrss would report the
                # driver's peak, which Linux carries into the child across fork + exec.
                hwm = max(hwm, _vm_hwm(proc.pid))
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    wall = time.monotonic() - t0
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    break
                if time.monotonic() > deadline:
                    os.kill(proc.pid, signal.SIGKILL)
                    _, status, usage = os.wait4(proc.pid, 0)
                    wall = time.monotonic() - t0
                    proc.returncode = -9
                    break
                time.sleep(0.005)
        finally:
            if proc.returncode is None:
                stop_pid(proc.pid)
            CHILDREN.discard(proc.pid)
        out.seek(0)
        err.seek(0)
        return Measured(
            wall=wall,
            cpu=usage.ru_utime + usage.ru_stime,
            maxrss=hwm,
            rc=proc.returncode,
            out=out.read().decode(errors="replace"),
            err=err.read().decode(errors="replace"),
        )


def _vm_hwm(pid: int) -> int:
    """Peak RSS in bytes of ``pid``'s address space (0 when unreadable)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


@dataclass(frozen=True, slots=True)
class ProcUsage:
    cpu: float
    """User + system seconds of all threads so far."""
    hwm: int
    """Peak resident set (VmHWM) in bytes."""


def proc_usage(pid: int) -> ProcUsage | None:
    """CPU seconds and peak RSS of a live process from /proc (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return None
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    hwm = 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return ProcUsage(cpu, hwm)


def tree_usage(pid: int) -> ProcUsage | None:
    """:func:`proc_usage` of ``pid`` plus the CPU of its live descendants (a mount daemon's
    worker processes: they run as long as the daemon, so ``wait4`` never accounts them)."""
    top = proc_usage(pid)
    if top is None:
        return None
    cpu = top.cpu
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                usage = proc_usage(kid)
                if usage is not None:
                    cpu += usage.cpu
                    stack.append(kid)
    return ProcUsage(cpu, top.hwm)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mountpoint, from /proc/self/mountinfo (never touches the mount)."""
    target = os.path.abspath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if mp == target:
                    return True
    except OSError:
        pass
    return False


def unmount(path: Path) -> None:
    """Unmount a FUSE mount (lazily if busy); a path that is not mounted is left alone."""
    if not is_mounted(path):
        return
    done = subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, check=False)
    if done.returncode != 0 and is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


def rmtree(path: Path) -> None:
    """Delete a directory tree that may not exist (never follows into a live mount)."""
    if is_mounted(path):
        raise BenchError(f"refusing to delete {path}: it is a mountpoint")
    shutil.rmtree(path, ignore_errors=True)


def drop_caches() -> bool:
    """Drop the (global!) page cache as root; False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...``; afterwards ``t[0]`` is the wall time in seconds."""
    box: list[float] = []
    t0 = time.monotonic()
    try:
        yield box
    finally:
        box.append(time.monotonic() - t0)


def _version(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def machine_info(tools: bool = True) -> list[tuple[str, str]]:
    """What the numbers were taken on: cores, CPU, memory, kernel, Python, tool versions."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / (1 << 20):.1f} GiB"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info = [
        ("cores", str(os.cpu_count())),
        ("cpu", cpu),
        ("memory", mem),
        ("kernel", platform.release()),
        ("python", sys.version.split()[0]),
        ("load average at start", load),
    ]
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    info.append(("ttfs commit", commit or "?"))
    if tools:
        info += [
            ("nginx", _version(["nginx", "-v"])),
            ("rclone", _version(["rclone", "version"])),
            ("aria2c", _version(["aria2c", "--version"])),
        ]
    return info
