"""Helpers for the real-mount tests: FUSE availability, manifests for the counting origin,
mounting through the CLI with guaranteed cleanup, and running loaders in child processes.

Why loaders run in child processes: the counting origin serves from threads of the test
process. A reader in the test process that page-faults on the mount while holding the GIL
(numpy copying out of an mmap, safetensors' ``get_tensor``) would block the very threads that
must serve the fault. Directory listings and ``stat`` release the GIL and may run in-process.

Cleanup follows pyfuse3's test harness: lazy unmount (``fusermount3 -uz``), then wait for the
daemon, then SIGTERM, then SIGKILL, always, even when the test failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from demo.origin import Origin
from ttfs.fuse.kernel import is_mounted

REPO = Path(__file__).resolve().parent.parent
FAR_FUTURE = 4044816725  # expiration_timestamp of test pointers (2098)


def fuse_unusable_reason() -> str | None:
    """Why real mounts cannot run here, or None when they can."""
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        return f"pyfuse3 is not importable: {e}"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as e:
        return f"/dev/fuse is not usable: {e.strerror}"
    os.close(fd)
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return "not root and fusermount3 is not installed"
    return None


def require_fuse() -> None:
    """Skip (locally) or fail (under CI) when real mounts are impossible."""
    reason = fuse_unusable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"real FUSE mounts are required under CI: {reason}")
    pytest.skip(reason)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(
    origin: Origin,
    root: Path,
    manifest: Path,
    *,
    prefix: str = "",
    names: Sequence[str] | None = None,
) -> list[str]:
    """A bptr manifest for files under ``root`` served by ``origin`` (plain /files/ URLs).

    ``prefix`` is prepended to every file_name (e.g. ``/app/model_cache/m/``). Returns the
    relative names in manifest order.
    """
    if names is None:
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    pointers = []
    for name in names:
        path = root / name
        pointers.append(
            {
                "resolution": {
                    "resolution_type": "http",
                    "url": origin.url(name),
                    "expiration_timestamp": FAR_FUTURE,
                },
                "uid": name,
                "file_name": prefix + name,
                "hashtype": "sha256",
                "hash": sha256_file(path),
                "size": path.stat().st_size,
            }
        )
    manifest.write_text(json.dumps({"pointers": pointers, "models": None}, indent=1))
    return list(names)


def ttfs(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 120, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the ttfs CLI in a child process."""
    done = subprocess.run(
        [sys.executable, "-m", "ttfs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(env),
        cwd=REPO,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"ttfs {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done


def run_py(
    code: str, *args: str, timeout: float = 120, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a loader process); raise with its stderr if it fails."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(env),
        cwd=REPO,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"child failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def daemon_env(**extra: str) -> dict[str, str]:
    """The test environment for a daemon, plus ``extra`` (e.g. a small retry budget)."""
    env = dict(os.environ)
    env.update(extra)
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_daemon(mountpoint: Path, pid: int | None, grace: float = 10.0) -> None:
    """Lazy-unmount ``mountpoint`` and make sure daemon ``pid`` is gone (terminate, kill)."""
    if is_mounted(mountpoint):
        subprocess.run(
            ["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False
        )
    if pid is None:
        return
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _daemons_of(mountpoint: Path) -> list[int]:
    """Pids of ``ttfs mount --foreground`` daemons for ``mountpoint`` (this test's own: the
    mountpoint is a unique temporary path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--foreground" in argv and os.fsencode(str(mountpoint)) in argv:
            found.append(int(entry.name))
    return found


@dataclass
class Mounted:
    """A mount made by ``ttfs mount`` in the background; ``seconds`` is how long it took."""

    mountpoint: Path
    pid: int
    log: Path
    seconds: float
    stderr: str
    extra: dict[str, Any] = field(default_factory=dict)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def mounted(
    manifest: Path,
    mountpoint: Path,
    cache: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 90,
) -> Iterator[Mounted]:
    """``ttfs mount [args] manifest mountpoint`` for the block's duration; always cleaned up.

    ``timeout`` bounds the ``ttfs mount`` command; when it runs out, the daemon it may have
    started is found through the mount and stopped (it would otherwise outlive the test).
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = cache.parent / f"{mountpoint.name}-daemon.log"
    started = time.monotonic()
    try:
        done = ttfs(
            "mount",
            "--cache-dir",
            str(cache),
            "--log-file",
            str(log),
            *args,
            str(manifest),
            str(mountpoint),
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        for pid in _daemons_of(mountpoint):  # mounted or still starting
            stop_daemon(mountpoint, pid, grace=0)
        stop_daemon(mountpoint, None)
        raise
    seconds = time.monotonic() - started
    m = re.search(r"\(pid (\d+),", done.stderr)
    pid = int(m.group(1)) if m else None
    if done.returncode != 0 or pid is None:
        stop_daemon(mountpoint, pid)
        log_text = log.read_text(errors="replace") if log.exists() else ""
        raise AssertionError(f"ttfs mount failed ({done.returncode}): {done.stderr}\n{log_text}")
    try:
        yield Mounted(mountpoint, pid, log, seconds, done.stderr)
    finally:
        stop_daemon(mountpoint, pid)


@contextlib.contextmanager
def mounted_under_ulimit(
    nofile: int, manifest: Path, mnt: Path, cache: Path, *args: str
) -> Iterator[tuple[int, Path]]:
    """``ulimit -n nofile; ttfs mount ...`` (soft and hard limit, inherited by the daemon)."""
    mnt.mkdir(parents=True, exist_ok=True)
    log = cache.parent / f"{mnt.name}-daemon.log"
    cmd = [sys.executable, "-m", "ttfs", "mount", "--cache-dir", str(cache)]
    cmd += ["--log-file", str(log), *args, str(manifest), str(mnt)]
    done = subprocess.run(
        ["sh", "-c", f'ulimit -n {nofile} && exec "$@"', "sh", *cmd],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    m = re.search(r"\(pid (\d+),", done.stderr)
    pid = int(m.group(1)) if m else None
    try:
        assert done.returncode == 0 and pid is not None, done.stderr
        yield pid, log
    finally:
        stop_daemon(mnt, pid)


def status(mountpoint: Path) -> dict[str, Any]:
    doc = json.loads(os.getxattr(mountpoint, "user.ttfs.status"))
    assert isinstance(doc, dict)
    return doc


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def make_shard(path: Path, n_tensors: int, rows: int, seed: int = 0) -> dict[str, tuple[int, int]]:
    """A safetensors file of ``n_tensors`` float32 ``rows x 1024`` tensors (numpy, quick).

    Returns each tensor's absolute byte range in the file.
    """
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    base = rng.standard_normal((rows, 1024), dtype=np.float32)
    tensors = {f"layer{i:03d}": base + np.float32(i) for i in range(n_tensors)}
    save_file(tensors, str(path))
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {
        k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    }


def write_small_files(root: Path, n: int) -> dict[str, bytes]:
    """``n`` distinct small files in 40 directories (a tokenizer-and-configs heavy repo)."""
    files = {}
    for i in range(n):
        rel = f"d{i % 40:02d}/f{i:05d}.txt"
        data = (f"file {i}\n" * (1 + i % 97)).encode()
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[rel] = data
    return files
