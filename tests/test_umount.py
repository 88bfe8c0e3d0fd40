"""``ttfs umount`` clears a mount in every state: live, busy, dead (``kill -9``), wedged.

Each case makes a real mount with a real daemon, puts it in the state, runs the CLI as a user
would, and checks the kernel's mount table and the daemon's process afterwards.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.origin import Origin
from tests.mount_helpers import (
    REPO,
    require_fuse,
    run_py,
    stop_daemon,
    ttfs,
    wait_for,
    write_manifest,
)
from ttfs.fuse.daemon import Daemon, mount_in_subprocess, unmount
from ttfs.fuse.kernel import is_mounted
from ttfs.procs import process_alive

pytestmark = pytest.mark.fuse

LOOPS = int(os.environ.get("TTFS_UMOUNT_LOOPS", "20"))


@pytest.fixture(autouse=True)
def _needs_fuse() -> None:
    require_fuse()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "w.bin").write_bytes(os.urandom(3 << 20))
    return root


@pytest.fixture
def manifest(tmp_path: Path, src: Path) -> Iterator[Path]:
    with Origin(src) as origin:
        path = tmp_path / "m.json"
        write_manifest(origin, src, path)
        yield path


def _mount(manifest: Path, mnt: Path, cache: Path) -> Daemon:
    mnt.mkdir(exist_ok=True)
    return mount_in_subprocess(
        [manifest], mnt, cache_dir=cache, prefetch=False, log_file=cache.parent / "daemon.log"
    )


_HOLD = "import sys; f = open('w.bin', 'rb'); print('open', flush=True); sys.stdin.read()"


def _dead(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def test_umount_after_kill_9_in_a_loop(tmp_path: Path, manifest: Path) -> None:
    """The daemon is killed at random moments: with the root's attributes cached by the kernel
    or not, with a file open or not, with a reader blocked or not. ``ttfs umount`` clears it
    every time, and the path can be mounted again at once."""
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    rng = random.Random(13)
    cleared = 0
    for i in range(LOOPS):
        daemon = _mount(manifest, mnt, cache)
        holder: subprocess.Popen[str] | None = None
        try:
            if i % 2 == 0:
                os.stat(mnt)  # the kernel caches the root's attributes (a day)
                os.listdir(mnt / "sub")
            if i % 3 == 0:  # a process with a file open and its cwd inside the mount
                holder = subprocess.Popen(
                    [sys.executable, "-c", _HOLD],
                    cwd=mnt / "sub",
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert holder.stdout is not None and holder.stdout.readline() == "open\n"
            time.sleep(rng.uniform(0, 0.2))
            os.kill(daemon.pid, signal.SIGKILL)
            wait_for(lambda d=daemon: _dead(d.pid), timeout=10, what="the daemon to die")  # type: ignore[misc]
            done = ttfs("umount", str(mnt), timeout=60)
            assert done.returncode == 0, f"loop {i}: {done.stderr}"
            assert not is_mounted(mnt), f"loop {i}: still mounted"
            assert done.stderr.startswith("ttfs: unmounted"), done.stderr
            cleared += 1
        finally:
            if holder is not None:
                holder.kill()
                holder.wait()
            stop_daemon(mnt, daemon.pid)
    print(f"ttfs umount after kill -9: {cleared}/{LOOPS} cleared")
    assert cleared == LOOPS
    # Mountable again, and serves.
    daemon = _mount(manifest, mnt, cache)
    try:
        assert sorted(os.listdir(mnt)) == ["config.json", "sub"]
    finally:
        unmount(mnt)
    assert _dead(daemon.pid)


def test_umount_of_a_busy_mount_detaches_it_and_open_files_keep_working(
    tmp_path: Path, manifest: Path, src: Path
) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    daemon = _mount(manifest, mnt, cache)
    reader = (
        "import sys\n"
        "f = open('w.bin', 'rb')\n"
        "print('open', flush=True)\n"
        "sys.stdin.readline()\n"
        "sys.stdout.write(f.read().hex()[:64] + ' ' + str(len(f.read()) + f.tell()))\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", reader],
        cwd=mnt / "sub",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        done = ttfs("umount", str(mnt), timeout=60)
        assert done.returncode == 0, done.stderr
        assert "(lazily)" in done.stderr
        assert not is_mounted(mnt), "the path is free at once"
        assert os.listdir(mnt) == []
        # The daemon keeps serving the file that is still open, with the right bytes.
        assert process_alive(daemon.pid)
        out, _ = holder.communicate("go\n", timeout=60)
        want = (src / "sub" / "w.bin").read_bytes()
        assert out == want.hex()[:64] + f" {len(want)}"
        # Once the last file is closed the daemon exits by itself.
        wait_for(lambda: not process_alive(daemon.pid), timeout=30, what="the daemon to exit")
    finally:
        holder.kill()
        holder.wait()
        stop_daemon(mnt, daemon.pid)


def test_umount_of_a_wedged_daemon_does_not_hang(tmp_path: Path, manifest: Path) -> None:
    """A stopped daemon answers nothing: the CLI must not stat the path or wait on it."""
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    daemon = _mount(manifest, mnt, cache)
    try:
        os.kill(daemon.pid, signal.SIGSTOP)
        started = time.monotonic()
        done = ttfs("umount", "--timeout", "3", str(mnt), timeout=60)
        assert done.returncode == 0, done.stderr
        assert not is_mounted(mnt)
        assert time.monotonic() - started < 30
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
        stop_daemon(mnt, daemon.pid)


def test_umount_through_a_symlink_and_of_nothing(tmp_path: Path, manifest: Path) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    daemon = _mount(manifest, mnt, cache)
    link = tmp_path / "link"
    link.symlink_to(mnt)
    try:
        done = ttfs("umount", str(link))
        assert done.returncode == 0, done.stderr
        assert not is_mounted(mnt) and _dead(daemon.pid)
    finally:
        stop_daemon(mnt, daemon.pid)
    for path in (mnt, tmp_path / "missing"):
        done = ttfs("umount", str(path))
        assert done.returncode != 0
        assert done.stderr.strip() == f"ttfs: error: {path} is not mounted"


def _unit_umount_commands() -> list[str]:
    unit = (REPO / "systemd" / "ttfs-mount@.service").read_text()
    commands = re.findall(r"^Exec(?:StartPre|StopPost)=-?(\S*ttfs umount[^\n]*)$", unit, re.M)
    return commands


def test_the_systemd_unit_clears_a_dead_mount_with_ttfs_umount(
    tmp_path: Path, manifest: Path
) -> None:
    """Runs the unit's own ExecStartPre/ExecStopPost lines (ttfs's path substituted) against a
    mount whose daemon was killed, as systemd would after a crash."""
    commands = _unit_umount_commands()
    assert len(commands) == 2, commands
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    for command in commands:
        daemon = _mount(manifest, mnt, cache)
        try:
            os.kill(daemon.pid, signal.SIGKILL)
            wait_for(lambda d=daemon: _dead(d.pid), timeout=10, what="the daemon to die")  # type: ignore[misc]
            argv = command.replace("%f", str(mnt)).split()
            assert argv[0].endswith("/ttfs")
            run_py("import sys; from ttfs.cli import main; sys.argv[0] = 'ttfs'; main()", *argv[1:])
            assert not is_mounted(mnt)
        finally:
            stop_daemon(mnt, daemon.pid)


def test_umount_of_an_aborted_connection_with_the_daemon_still_running(
    tmp_path: Path, manifest: Path
) -> None:
    """Half gone: the kernel's side of the FUSE connection is aborted (fusectl ``abort``, as an
    admin does for a hung mount) while the daemon process lives on."""
    from ttfs.fuse.kernel import FUSECTL, mount_device

    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    daemon = _mount(manifest, mnt, cache)
    try:
        device = mount_device(mnt)
        assert device is not None
        major, _, minor = device.partition(":")
        abort = FUSECTL / str((int(major) << 20) | int(minor)) / "abort"
        if not abort.exists():
            pytest.skip("fusectl is not mounted")
        abort.write_text("1")
        with pytest.raises(OSError):
            os.listdir(mnt)
        done = ttfs("umount", str(mnt), timeout=60)
        assert done.returncode == 0, done.stderr
        assert not is_mounted(mnt)
        # The daemon's session is gone: it notices and exits by itself.
        wait_for(lambda: not process_alive(daemon.pid), timeout=30, what="the daemon to exit")
    finally:
        stop_daemon(mnt, daemon.pid)
