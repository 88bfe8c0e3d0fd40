"""Mounts the benchmarks start (ttfs and rclone) and the loader process that reads through them.

Each mount is a context manager that unmounts and ends its daemon by PID on exit, whatever
happened: ``fusermount3 -u`` (``-uz`` when busy), then wait for the daemon, then SIGTERM,
SIGKILL. ``start()`` returns the seconds until the tree was visible, so "time from starting
the mount" includes the mount itself, as a user would see it.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from .procs import (
    CHILDREN,
    REPO,
    BenchError,
    ProcUsage,
    is_mounted,
    proc_usage,
    run_measured,
    stop_pid,
    tree_usage,
    unmount,
)


class TtfsMount:
    """``ttfs mount [args] MANIFEST MNT`` in the background, with its daemon's PID and usage."""

    def __init__(
        self,
        manifest: Path,
        mnt: Path,
        cache: Path,
        *args: str,
        env: dict[str, str] | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.manifest, self.mnt, self.cache = manifest, mnt, cache
        self.args = list(args)
        if max_connections:
            self.args += ["--max-connections", str(max_connections)]
        self.env = env
        self.pid: int | None = None
        self.log = cache.parent / f"{mnt.name}-ttfs.log"
        self.cli_cpu = 0.0

    def start(self) -> float:
        self.mnt.mkdir(parents=True, exist_ok=True)
        m = run_measured(
            [
                sys.executable,
                "-m",
                "ttfs",
                "mount",
                "--cache-dir",
                str(self.cache),
                "--log-file",
                str(self.log),
                "--log-level",
                "warn",
                *self.args,
                str(self.manifest),
                str(self.mnt),
            ],
            env=self.env,
            timeout=120,
        )
        found = re.search(r"\(pid (\d+),", m.err)
        if found:
            self.pid = int(found.group(1))
            CHILDREN.add(self.pid)
        self.cli_cpu += m.cpu
        if m.rc != 0 or self.pid is None:
            self.stop()
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise BenchError(f"ttfs mount failed ({m.rc}): {m.err[-2000:]}\n{log}")
        return m.wall

    def materialize(self, timeout: float = 1800) -> float:
        m = run_measured(
            [sys.executable, "-m", "ttfs", "materialize", "--no-progress", str(self.mnt)],
            env=self.env,
            timeout=timeout,
        ).check("ttfs materialize")
        self.cli_cpu += m.cpu
        return m.wall

    def status(self) -> dict[str, Any]:
        doc = json.loads(os.getxattr(self.mnt, "user.ttfs.status"))
        assert isinstance(doc, dict)
        return doc

    def usage(self) -> ProcUsage | None:
        """The daemon's CPU (its worker processes included) and peak RSS."""
        return tree_usage(self.pid) if self.pid else None

    def stop(self) -> None:
        unmount(self.mnt)
        if self.pid is not None:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and proc_usage(self.pid) is not None:
                time.sleep(0.02)
            stop_pid(self.pid)
            CHILDREN.discard(self.pid)
            self.pid = None

    def __enter__(self) -> TtfsMount:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


RCLONE_CONF = """[{name}]
type = http
url = {url}
"""


class RcloneMount:
    """``rclone mount REMOTE: MNT --read-only --vfs-cache-mode full`` on nginx's listing."""

    def __init__(self, url: str, mnt: Path, cache: Path, ca: Path | None = None) -> None:
        self.url, self.mnt, self.cache = url.rstrip("/") + "/", mnt, cache
        self.ca = ca  # the https-* profiles' CA (rclone reads no SSL_CERT_FILE we set)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = cache.parent / f"{mnt.name}-rclone.log"
        self.cpu = 0.0
        self.maxrss = 0

    def start(self, timeout: float = 60) -> float:
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        conf = self.cache.parent / "rclone.conf"
        conf.write_text(RCLONE_CONF.format(name="web", url=self.url))
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        env["RCLONE_CONFIG"] = str(conf)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [
                "rclone",
                "mount",
                "web:",
                str(self.mnt),
                "--read-only",
                "--vfs-cache-mode",
                "full",
                "--cache-dir",
                str(self.cache),
                "--log-file",
                str(self.log),
                *(["--ca-cert", str(self.ca)] if self.ca is not None else []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        CHILDREN.add(self.proc.pid)
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                self.stop()
                log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                raise BenchError(f"rclone mount did not come up: {log}")
            time.sleep(0.005)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.proc is not None:
            # Its own peak (wait4's ru_maxrss would be the driver's; see procs.run_measured).
            usage = proc_usage(self.proc.pid)
            if usage is not None:
                self.maxrss = usage.hwm
        unmount(self.mnt)
        if self.proc is None:
            return
        pid = self.proc.pid
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            got, status, rusage = os.wait4(pid, os.WNOHANG)
            if got:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.cpu = rusage.ru_utime + rusage.ru_stime
                break
            time.sleep(0.02)
        else:
            stop_pid(pid)
        CHILDREN.discard(pid)
        self.proc = None

    def __enter__(self) -> RcloneMount:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class Reader:
    """The loader process of :mod:`bench.reader`; ``call`` sends one command and waits for it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.reader"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            start_new_session=True,
        )
        CHILDREN.add(proc.pid)
        self.proc = proc
        self._reply(120)
        return proc

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.close()
                raise BenchError(f"reader gave no answer in {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise BenchError("reader died")
        reply = json.loads(line)
        assert isinstance(reply, dict)
        if not reply.get("ok"):
            raise BenchError(f"reader: {reply.get('error')}")
        return reply

    def call(self, op: str, timeout: float = 900, **args: Any) -> dict[str, Any]:
        proc = self.proc if self.proc is not None and self.proc.poll() is None else self._start()
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        proc.stdin.flush()
        return self._reply(timeout)

    def close(self) -> None:
        if self.proc is None:
            return
        pid = self.proc.pid
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            stop_pid(pid)
        CHILDREN.discard(pid)
        self.proc = None

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
