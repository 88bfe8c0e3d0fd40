"""Running the mount daemon in the background, and getting rid of it again.

``ttfs mount`` (without ``--foreground``) checks its arguments, parses the manifest and builds
the tree, then *forks* (:func:`fork_daemon`): the child (a new session, stdin from /dev/null,
stdout and stderr appended to a log file) goes on to serve with what the parent already
parsed and imported, so one interpreter start and one manifest parse serve both. The fork
happens before any thread exists (the CLI starts none; a thread would be lost in the child, so
:func:`fork_daemon` refuses and :func:`spawn` is used instead). The parent waits on a pipe:
the child writes ``READY`` once the mount answers (:func:`ttfs.fuse.serve.serve`'s readiness)
or ``ERROR <exit code> <message>`` when it fails, and the parent exits with that outcome. A
child that dies without a word is reported with the last line of its log.

:func:`spawn` starts ``python -m ttfs mount --foreground --ready-fd N ...`` instead, with the
same pipe protocol: for callers that are not the CLI (tests, ``make run``), where forking a
process with threads would be unsafe.

:func:`mount_in_subprocess` and :func:`unmount` are the programmatic form, for ``make run``,
tests and anything else that wants a mount of its own. :func:`unmount` is also ``ttfs umount``:
``fusermount3 -u``, then the lazy ``-uz`` when that fails (a busy mount, or one whose daemon
died: "Transport endpoint is not connected"), then it waits for the daemon to exit so that
its block index is flushed before anything remounts the cache. It never sends the mount a
request that could fail or hang on a dead or wedged daemon (the mount table is read from
``/proc/self/mountinfo``), so it clears a mount in every state.

This module does not import pyfuse3: the parent of a mount never needs it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..blocks import perms
from ..control import mount_status
from ..errors import ConfigError, MountError, TtfsError
from ..procs import process_alive
from .kernel import is_mounted

log = logging.getLogger(__name__)

READY = b"READY"
ERROR = b"ERROR"

_children: dict[int, subprocess.Popen[bytes]] = {}
"""Daemons this process spawned and has not reaped yet (see :func:`wait_exit`)."""


def _reap_popen(proc: subprocess.Popen[bytes]) -> None:
    proc.wait()
    _children.pop(proc.pid, None)


@dataclass(frozen=True, slots=True)
class Daemon:
    """A running mount daemon started by :func:`spawn`."""

    pid: int
    mountpoint: Path
    log_file: Path


FUSE_MISSING = (
    "ttfs mount needs pyfuse3, which is not installed: pip install 'ttfs[fuse]' "
    "(it builds against libfuse3: apt-get install fuse3 libfuse3-dev pkg-config gcc "
    "python3-dev). 'ttfs resolve' needs no FUSE."
)


def require_pyfuse3() -> None:
    """Fail with how to install it when pyfuse3 is missing (checked before spawning).

    Raises:
        ConfigError: pyfuse3 cannot be imported.
    """
    try:
        found = importlib.util.find_spec("pyfuse3") is not None
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules
        found = False
    if not found:
        raise ConfigError(FUSE_MISSING)


def check_mountpoint(mountpoint: str | os.PathLike[str]) -> Path:
    """The absolute mountpoint, or one clear MountError about why it cannot be mounted on."""
    path = Path(os.path.abspath(mountpoint))
    if is_mounted(path):
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                raise MountError(
                    f"{path} is a dead mount (its daemon is gone): run `ttfs umount {path}` first"
                ) from e
        raise MountError(f"{path} is already a mount point")
    if not path.exists():
        raise MountError(f"mountpoint {path} does not exist")
    if not path.is_dir():
        raise MountError(f"mountpoint {path} is not a directory")
    return path


def default_log_file(cache_dir: Path, mountpoint: Path) -> Path:
    """``<cache>/logs/mount-<mountpoint with / as ->.log``."""
    name = str(mountpoint).strip("/").replace("/", "-") or "root"
    return cache_dir / "logs" / f"mount-{name}.log"


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else ""


def write_ready(fd: int, message: bytes) -> None:
    """Child side: report readiness (``READY``) or failure on the pipe, then close it."""
    with contextlib.suppress(OSError):
        os.write(fd, message.rstrip(b"\n") + b"\n")
    with contextlib.suppress(OSError):
        os.close(fd)


def error_message(error: BaseException) -> bytes:
    code = error.exit_code if isinstance(error, TtfsError) else 1
    text = " ".join(str(error).split()) or type(error).__name__
    return ERROR + f" {code} {text}".encode()


def _open_log(log_file: Path) -> int:
    """Open the daemon's log for appending, private like the cache (a log names the files and
    URLs of private models).

    Raises:
        MountError: the log file cannot be created or opened.
    """
    try:
        perms.make_private_dir(log_file.parent)
        return perms.open_private(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    except OSError as e:
        raise MountError(f"cannot open the log file {log_file}: {e.strerror}") from e


def spawn(
    args: Sequence[str],
    mountpoint: Path,
    log_file: Path,
    *,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    python: str | None = None,
) -> Daemon:
    """Start ``ttfs mount --foreground <args>`` detached and wait until it serves.

    Raises:
        MountError: the daemon failed (with its reason), died, or was not ready in time.
        TtfsError: the daemon reported another error class (its exit code is kept).
    """
    log_fd = _open_log(log_file)
    read_fd, write_fd = os.pipe()
    cmd = [
        python or sys.executable,
        "-m",
        "ttfs",
        "mount",
        "--foreground",
        "--ready-fd",
        str(write_fd),
        *args,
    ]
    try:
        with open(log_fd, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(write_fd,),
                start_new_session=True,
                env=None if env is None else dict(env),
            )
    except OSError as e:
        os.close(read_fd)
        raise MountError(f"cannot start the mount daemon: {e}") from e
    finally:
        os.close(write_fd)
    try:
        message = _wait_line(read_fd, proc.poll, timeout)
    except BaseException:  # interrupted while waiting: do not leave a half-started mount behind
        _stop(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if is_mounted(mountpoint):
            _fusermount(mountpoint, lazy=True)
        raise
    finally:
        os.close(read_fd)
    if message.startswith(READY):
        # Reaped by init once we exit; a long-lived caller reaps it in a thread, or
        # :func:`unmount` does (it waits for exactly this process).
        _children[proc.pid] = proc
        threading.Thread(
            target=_reap_popen, args=(proc,), daemon=True, name=f"reap-{proc.pid}"
        ).start()
        return Daemon(proc.pid, mountpoint, log_file)
    if message.startswith(ERROR):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        raise _reported_error(message)
    # No word from the child: it died, or it hangs.
    if proc.poll() is None:
        _stop(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if is_mounted(mountpoint):
            _fusermount(mountpoint, lazy=True)
        raise MountError(f"the mount daemon was not ready within {timeout:.0f}s (log: {log_file})")
    proc.wait()
    last = _last_line(log_file)
    raise MountError(
        f"the mount daemon exited with status {proc.returncode}"
        + (f": {last}" if last else "")
        + f" (log: {log_file})"
    )


def fork_daemon(mountpoint: Path, log_file: Path, *, timeout: float = 60.0) -> Daemon | int | None:
    """Fork the mount daemon: in the parent, wait until it serves and return its
    :class:`Daemon`; in the child, return the fd to report readiness on (the caller serves).

    Returns None without forking when this process has threads (forking would lose them).

    Raises:
        MountError: the daemon failed (with its reason), died, or was not ready in time.
        TtfsError: the daemon reported another error class (its exit code is kept).
    """
    if threading.active_count() > 1:
        return None
    log_fd = _open_log(log_file)
    read_fd, write_fd = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()  # or the child flushes the parent's pending output a second time
    try:
        pid = os.fork()
    except OSError as e:
        for fd in (read_fd, write_fd, log_fd):
            os.close(fd)
        raise MountError(f"cannot start the mount daemon: {e}") from e
    if pid == 0:  # the daemon
        os.close(read_fd)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        for fd in (null, log_fd):
            os.close(fd)
        return write_fd
    os.close(write_fd)
    os.close(log_fd)
    try:
        message = _wait_line(read_fd, lambda: _reap(pid), timeout)
    except BaseException:  # interrupted while waiting: do not leave a half-started mount behind
        _stop(pid)
        _reap_within(pid, 10)
        if is_mounted(mountpoint):
            _fusermount(mountpoint, lazy=True)
        raise
    finally:
        os.close(read_fd)
    if message.startswith(READY):
        return Daemon(pid, mountpoint, log_file)  # reaped by init once we exit
    if message.startswith(ERROR):
        _reap_within(pid, 10)
        raise _reported_error(message)
    if _reap(pid) is None:  # no word and still running: it hangs
        _stop(pid)
        _reap_within(pid, 5)
        if is_mounted(mountpoint):
            _fusermount(mountpoint, lazy=True)
        raise MountError(f"the mount daemon was not ready within {timeout:.0f}s (log: {log_file})")
    last = _last_line(log_file)
    raise MountError(
        "the mount daemon exited" + (f": {last}" if last else "") + f" (log: {log_file})"
    )


def _reap(pid: int) -> int | None:
    """The exit status of child ``pid`` if it has exited (reaping it), else None."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1
    return os.waitstatus_to_exitcode(status) if got else None


def _reap_within(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while _reap(pid) is None and time.monotonic() < deadline:
        time.sleep(0.02)


def _reported_error(message: bytes) -> MountError:
    """The error an ``ERROR <code> <text>`` line reports, with its exit code."""
    _, _, rest = message.decode(errors="replace").partition(" ")
    code, _, text = rest.partition(" ")
    error = MountError(text or "the mount daemon failed")
    if code.isdigit() and int(code) != error.exit_code:
        error.exit_code = int(code)  # type: ignore[misc]
    return error


def _wait_line(fd: int, exited: Callable[[], object], timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return b""
        readable, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not readable:
            if exited() is not None:
                # The child closed nothing yet exited: its fd copy is gone, so EOF follows.
                readable = [fd]
            else:
                continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk
    return data.split(b"\n", 1)[0]


def mount_args(
    manifests: Sequence[str | os.PathLike[str]] | None,
    mountpoint: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    root: str | None = None,
    prefetch: bool = True,
    log_level: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The ``ttfs mount`` arguments for a mount (absolute paths, so any cwd works)."""
    args: list[str] = []
    if cache_dir is not None:
        args += ["--cache-dir", os.path.abspath(cache_dir)]
    if root is not None:
        args += ["--root", root]
    if not prefetch:
        args.append("--no-prefetch")
    if log_level is not None:
        args += ["--log-level", log_level]
    args += list(extra_args)
    args += [os.path.abspath(m) for m in manifests or ()]
    args.append(os.path.abspath(mountpoint))
    return args


def mount_in_subprocess(
    manifests: Sequence[str | os.PathLike[str]] | None,
    mountpoint: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    root: str | None = None,
    prefetch: bool = True,
    log_file: str | os.PathLike[str] | None = None,
    log_level: str | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Daemon:
    """Mount ``manifests`` (None: the truss-transfer lookup paths) at ``mountpoint`` in a
    detached daemon and return once the mount serves; :func:`unmount` undoes it.

    ``env`` replaces the daemon's environment (``TTFS_RETRY_ATTEMPTS`` etc. go there).

    Raises:
        MountError: the mountpoint is unusable or the daemon failed (with its reason).
        ManifestError, ConfigError: reported by the daemon for bad input.
    """
    path = check_mountpoint(mountpoint)
    if log_file is None:
        base = Path(cache_dir) if cache_dir is not None else Path("/tmp")
        log_file = default_log_file(Path(os.path.abspath(base)), path)
    args = mount_args(
        manifests,
        path,
        cache_dir=cache_dir,
        root=root,
        prefetch=prefetch,
        log_level=log_level,
        extra_args=extra_args,
    )
    return spawn(args, path, Path(log_file), timeout=timeout, env=env)


def _fusermount(mountpoint: Path, *, lazy: bool) -> tuple[bool, str]:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is not None:
        cmd = [tool, "-u", *(["-z"] if lazy else []), str(mountpoint)]
    elif os.geteuid() == 0 and shutil.which("umount"):
        cmd = ["umount", *(["-l"] if lazy else []), str(mountpoint)]
    else:
        return False, "neither fusermount3 nor umount is available"
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return False, str(e)
    return done.returncode == 0, (done.stderr or done.stdout).strip()


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)


def daemon_pid(mountpoint: Path, timeout: float = 2.0) -> int | None:
    """The pid of the daemon serving ``mountpoint``, asked through the control attribute.

    Runs the ``getxattr`` in a thread so a wedged daemon cannot hang the caller; a dead mount
    answers ENOTCONN at once, and either way the answer is None.
    """
    result: list[int | None] = [None]

    def ask() -> None:
        with contextlib.suppress(TtfsError, OSError, ValueError, TypeError):
            result[0] = int(mount_status(mountpoint)["pid"])

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0]


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for ``pid`` to be gone; True when it is.

    A daemon this process spawned is reaped here (its zombie would otherwise linger until the
    reaper thread runs, and ``/proc/<pid>`` with it); any other pid is gone once it is a zombie.
    """
    proc = _children.get(pid)
    if proc is not None:
        try:
            proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return False
        _children.pop(pid, None)
        return True
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _resolve_mountpoint(path: Path) -> Path | None:
    """The mounted path ``path`` names, found without sending the mount a request.

    The absolute path is looked up in ``/proc/self/mountinfo`` first (no syscall reaches the
    mount, so a dead or wedged daemon cannot fail or hang this). Only when it is not there is
    the path resolved through symlinks, in a thread with a deadline.
    """
    if is_mounted(path):
        return path
    result: list[Path | None] = [None]

    def real() -> None:
        with contextlib.suppress(OSError, RuntimeError):
            result[0] = Path(os.path.realpath(path))

    thread = threading.Thread(target=real, daemon=True)
    thread.start()
    thread.join(2.0)
    found = result[0]
    return found if found is not None and found != path and is_mounted(found) else None


def unmount(
    mountpoint: str | os.PathLike[str], *, pid: int | None = None, timeout: float = 30.0
) -> bool:
    """Unmount a ttfs mount in whatever state it is, and wait for its daemon to exit.

    Nothing here asks the mount anything that could fail or hang on a dead one: the mount
    table comes from ``/proc/self/mountinfo``, the daemon's pid from a bounded ``getxattr``.

    * live and idle: ``fusermount3 -u``; the daemon sees the unmount and exits;
    * dead (the daemon was killed; ``ENOTCONN``): ``-u`` fails or succeeds, then ``-uz``;
    * busy (a process has a file open or its cwd inside): detached lazily with ``-uz``: the
      name is free at once, processes that hold files keep reading them, and the daemon exits
      by itself when the last one lets go. It is not waited for beyond a short grace.

    Returns True when a lazy unmount was needed. A daemon that outlives a plain unmount by
    ``timeout`` gets SIGTERM. ``pid`` overrides the lookup through the mount's status.

    Raises:
        MountError: nothing is mounted there, or it cannot be unmounted.
    """
    given = Path(os.path.abspath(mountpoint))
    path = _resolve_mountpoint(given)
    if path is None:
        raise MountError(f"{given} is not mounted")
    if pid is None:
        pid = daemon_pid(path)
    alive = pid is not None and process_alive(pid)
    ok, why = _fusermount(path, lazy=False)
    lazy = False
    if not ok and is_mounted(path):
        lazy = True
        ok, why2 = _fusermount(path, lazy=True)
        if not ok and is_mounted(path):
            raise MountError(f"cannot unmount {path}: {why2 or why}")
    if pid is None:
        return lazy
    if lazy and alive:
        # Busy: the daemon keeps serving the open files until they are closed.
        if not wait_exit(pid, min(timeout, 2.0)):
            log.info("%s detached lazily; daemon %d exits when its last file is closed", path, pid)
        return lazy
    if not wait_exit(pid, timeout):
        _stop(pid)
        if not wait_exit(pid, 10.0):
            log.warning("the daemon %d of %s did not exit after SIGTERM", pid, path)
    return lazy
