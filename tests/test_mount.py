"""Real mounts: ``ttfs mount`` against the counting origin, checked through the kernel.

Every test mounts with the CLI (a detached daemon, as users run it) and asserts on what went
over the wire (the origin's counters), on errnos seen by ordinary processes, and on the CLI's
exit codes. Loaders and readers run in child processes (see tests/mount_helpers.py).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from demo.origin import Origin
from tests.mount_helpers import (
    daemon_env,
    make_shard,
    mounted,
    require_fuse,
    run_py,
    sha256_file,
    status,
    stop_daemon,
    ttfs,
    wait_for,
    write_manifest,
)
from ttfs.control import walk_status
from ttfs.fuse.kernel import is_mounted
from ttfs.units import MiB

pytestmark = pytest.mark.fuse
BS = 2 * MiB


@pytest.fixture(autouse=True)
def _needs_fuse() -> None:
    require_fuse()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A small model repository: configs, a two-shard safetensors model, a binary, a deep file."""
    root = tmp_path / "src"
    (root / "llama" / "sub" / "deep").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "tokenizer.json").write_text("{}" + " " * 5000)
    make_shard(root / "llama" / "model-00001-of-00002.safetensors", 3, 512, seed=1)
    make_shard(root / "llama" / "model-00002-of-00002.safetensors", 2, 512, seed=2)
    index = {
        "metadata": {},
        "weight_map": {
            "layer000": "model-00002-of-00002.safetensors",
            "layer001": "model-00001-of-00002.safetensors",
        },
    }
    (root / "llama" / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "shared.bin").write_bytes(os.urandom(12 * BS))
    (root / "llama" / "sub" / "deep" / "notes.txt").write_text("hello\n")
    return root


@pytest.fixture
def origin(model: Path) -> Iterator[Origin]:
    with Origin(model) as o:
        yield o


def files_of(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_tree_and_sizes_are_visible_at_once_and_listing_fetches_nothing(
    tmp_path: Path, model: Path, origin: Origin
) -> None:
    manifest = tmp_path / "m.json"
    # Upstream's absolute names: /app/model_cache/<volume_folder>/...
    write_manifest(origin, model, manifest, prefix="/app/model_cache/llama-7b/")
    mnt = tmp_path / "mnt"
    with mounted(
        manifest, mnt, tmp_path / "cache", "--no-prefetch", "--root", "/app/model_cache"
    ) as m:
        expected = {f"llama-7b/{k}": v for k, v in files_of(model).items()}
        assert files_of(mnt) == expected
        for name in expected:
            st = os.stat(mnt / name)
            assert st.st_mode & 0o777 == 0o444 and st.st_blocks * 512 >= st.st_size
        assert os.stat(mnt / "llama-7b").st_mode & 0o777 == 0o555
        assert origin.stats.requests == 0, "listing and stat must not touch the origin"
        assert m.seconds < 30  # ~1-2 s idle; generous for a loaded 2-core machine
        doc = status(mnt)
        assert (doc["files"], doc["bytes_local"], doc["prefix"]) == (7, 0, "/app/model_cache")
        # Mounting over a live mount is refused with one clear line.
        again = ttfs("mount", str(manifest), str(mnt))
        assert again.returncode != 0 and "already a mount point" in again.stderr
        assert len(again.stderr.strip().splitlines()) == 1
        # Reading a file fetches it (and only it).
        run_py("import sys; open(sys.argv[1], 'rb').read()", str(mnt / "llama-7b/config.json"))
        assert set(origin.stats.by_path) == {"/files/config.json"}


def test_writes_mkdir_unlink_setattr_are_erofs(tmp_path: Path, model: Path, origin: Origin) -> None:
    manifest = tmp_path / "m.json"
    write_manifest(origin, model, manifest)
    mnt = tmp_path / "mnt"
    with mounted(manifest, mnt, tmp_path / "cache", "--no-prefetch"):
        f = mnt / "config.json"
        attempts: dict[str, Callable[[], object]] = {
            "open O_WRONLY": lambda: os.open(f, os.O_WRONLY),
            "open O_RDWR": lambda: os.open(f, os.O_RDWR),
            "open O_TRUNC": lambda: os.open(f, os.O_RDONLY | os.O_TRUNC),
            "create": lambda: os.open(mnt / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644),
            "mkdir": lambda: os.mkdir(mnt / "d"),
            "rmdir": lambda: os.rmdir(mnt / "llama/sub/deep"),
            "unlink": lambda: os.unlink(f),
            "rename": lambda: os.rename(f, mnt / "c2.json"),
            "symlink": lambda: os.symlink("config.json", mnt / "link"),
            "link": lambda: os.link(f, mnt / "hard"),
            "mknod": lambda: os.mkfifo(mnt / "fifo"),
            "chmod": lambda: os.chmod(f, 0o644),
            "chown": lambda: os.chown(f, 1, 1),
            "truncate": lambda: os.truncate(f, 0),
            "utime": lambda: os.utime(f, (1, 1)),
            "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
            "removexattr": lambda: os.removexattr(f, "user.ttfs.status"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EROFS, f"{what}: {e.value}"
        assert os.access(f, os.R_OK) and not os.access(f, os.W_OK)
        assert sorted(os.listxattr(mnt)) == ["user.ttfs.materialize", "user.ttfs.status"]
        assert files_of(mnt) == files_of(model)  # nothing changed, the daemon is fine
        assert status(mnt)["files"] == 7


_READER = r"""
import hashlib, mmap, os, sys, time
path, start, length, go, direct = sys.argv[1:6]
start, length = int(start), int(length)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.002)
if direct == "1":  # bypasses the page cache: every request reaches the daemon
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, length)
    n = os.preadv(fd, [buf], start)
    data = bytes(buf[:n])
else:
    fd = os.open(path, os.O_RDONLY)
    data = os.pread(fd, length, start)
print(hashlib.sha256(data).hexdigest())
"""


def test_sixteen_processes_reading_the_same_ranges_make_one_request_per_block(
    tmp_path: Path, model: Path, origin: Origin
) -> None:
    import hashlib

    manifest = tmp_path / "m.json"
    write_manifest(origin, model, manifest)
    mnt = tmp_path / "mnt"
    origin.latency = 0.05  # every request is in flight long enough for the others to pile up
    with mounted(manifest, mnt, tmp_path / "cache", "--no-prefetch"):
        go = tmp_path / "go"
        start, length = 3 * BS, 4 * BS  # four whole blocks, 8 MiB
        want = hashlib.sha256((model / "shared.bin").read_bytes()[start : start + length])
        reader_args = [str(start), str(length), str(go)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _READER, str(mnt / "shared.bin"), *reader_args, str(i % 2)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(16)
        ]
        # Wait until all 16 interpreters wait on the go file (a fixed sleep is too short on a
        # loaded machine, and the readers would then not overlap).
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        go.write_text("go")
        outs = [p.communicate(timeout=60)[0].strip() for p in procs]
        assert all(p.returncode == 0 for p in procs)
        assert outs == [want.hexdigest()] * 16
    ranges = origin.stats.by_path["/files/shared.bin"].ranges
    blocks = [b for s, e in ranges for b in range(s // BS, e // BS + 1)]
    assert len(blocks) == len(set(blocks)), f"a block was fetched twice: {sorted(ranges)}"
    assert set(range(3, 7)) <= set(blocks)


def test_materialize_from_another_process_then_everything_is_local_and_verified(
    tmp_path: Path, model: Path, origin: Origin
) -> None:
    manifest = tmp_path / "m.json"
    write_manifest(origin, model, manifest)
    mnt = tmp_path / "mnt"
    with mounted(manifest, mnt, tmp_path / "cache", "--no-prefetch"):
        done = ttfs("materialize", str(mnt), timeout=120)
        assert done.returncode == 0, done.stderr
        # Not a terminal: plain progress lines, the last at 100%, then the summary.
        assert "\r" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines[-2].startswith("materialize:") and "(100.0%)" in lines[-2]
        assert "local and verified" in lines[-1]
        doc = status(mnt)
        assert doc["verified"] == doc["files"] == 7 and doc["bytes_local"] == doc["bytes_total"]
        assert doc["materialize"]["state"] == "done"
        for name in files_of(model):
            assert sha256_file(mnt / name) == sha256_file(model / name), name
        # Again, bypassing the page cache: the daemon serves it all from the block store.
        origin.reset_stats()
        run_py(
            "import os, sys, mmap\n"
            "for p in sys.argv[1:]:\n"
            "    fd = os.open(p, os.O_RDONLY | os.O_DIRECT); buf = mmap.mmap(-1, 1 << 22)\n"
            "    while os.readv(fd, [buf]): pass\n",
            *[str(mnt / n) for n in files_of(model)],
        )
        assert origin.stats.data_requests == 0
        table = ttfs("status", "--files", str(mnt), check=True).stdout
        assert "shared.bin" in table and "100.0%" in table and "7 verified" in table
        as_json = json.loads(ttfs("status", "--json", "--files", str(mnt), check=True).stdout)
        by_path = {f["path"]: f for f in as_json["files"]}
        assert by_path["shared.bin"]["bytes_by_source"]["origin"] == 12 * BS
        assert all(f["verified"] for f in as_json["files"])


def test_kill_9_mid_prefetch_umount_clears_it_and_a_remount_resumes(tmp_path: Path) -> None:
    src = tmp_path / "slow"
    src.mkdir()
    for i in range(6):
        (src / f"w{i}.bin").write_bytes(os.urandom(4 * BS))
    manifest = tmp_path / "m.json"
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    # One background connection (--max-connections 2 keeps one for demand) at 8 MB/s:
    # about one second per file, so the kill lands mid-prefetch.
    with Origin(src, rate_limit=8e6) as origin:
        write_manifest(origin, src, manifest)
        with mounted(manifest, mnt, cache, "--max-connections", "2") as m:
            wait_for(lambda: status(mnt)["done"] >= 2, timeout=60, what="two files verified")
            before = status(mnt)
            done_then = {f["path"] for f in walk_status(mnt) if f["done"]}
            os.kill(m.pid, signal.SIGKILL)
            wait_for(lambda: not os.path.exists(f"/proc/{m.pid}"), what="the daemon to die")
            with pytest.raises(OSError) as e:
                os.listdir(mnt)
            assert e.value.errno == errno.ENOTCONN
            assert is_mounted(mnt)
            done = ttfs("umount", str(mnt))
            assert done.returncode == 0, done.stderr
            assert not is_mounted(mnt)
        assert before["bytes_local"] < before["bytes_total"], "prefetch ended before the kill"
        assert len(done_then) >= 2
        origin.rate_limit = None
        origin.reset_stats()
        with mounted(manifest, mnt, cache, "--no-prefetch"):
            # The cache opens once the mount is ready; the status counts what is local once
            # every blob was opened.
            wait_for(lambda: status(mnt)["opened"] == 6, what="every blob opened")
            after_mount = status(mnt)
            assert ttfs("materialize", str(mnt)).returncode == 0
            for name in sorted(p.name for p in src.iterdir()):
                assert sha256_file(mnt / name) == sha256_file(src / name)
    refetched = origin.stats.bytes_sent
    # Nothing that was local at the kill is fetched again, except blocks that landed after the
    # last index flush (0.5 s at 8 MB/s) and the block being written.
    assert refetched <= before["bytes_total"] - before["bytes_local"] + 3 * BS, (refetched, before)
    assert after_mount["bytes_local"] >= before["bytes_local"] - 3 * BS
    assert after_mount["verified"] >= len(done_then)
    # Files verified before the kill are not requested at all.
    fetched = {p.rsplit("/", 1)[-1] for p in origin.stats.by_path}
    assert not fetched & done_then, (fetched, done_then)


def test_origin_down_read_fails_with_eio_and_the_mount_keeps_serving(
    tmp_path: Path, model: Path, origin: Origin
) -> None:
    manifest = tmp_path / "m.json"
    write_manifest(origin, model, manifest)
    mnt = tmp_path / "mnt"
    env = daemon_env(TTFS_RETRY_ATTEMPTS="2", TTFS_STALL_TIMEOUT="2")
    with mounted(manifest, mnt, tmp_path / "cache", "--no-prefetch", env=env):
        config = (model / "config.json").read_bytes()
        run_py("import sys; open(sys.argv[1], 'rb').read()", str(mnt / "config.json"))
        origin.set_down(True)
        started = time.monotonic()
        out = run_py(
            "import sys\n"
            "try:\n"
            "    open(sys.argv[1], 'rb').read(100)\n"
            "except OSError as e:\n"
            "    print(e.errno)\n",
            str(mnt / "shared.bin"),
        ).stdout.strip()
        assert out == str(errno.EIO)
        assert time.monotonic() - started < 20
        # Still alive: metadata, and file data already local (read past the page cache).
        assert files_of(mnt) == files_of(model)
        got = run_py(
            "import os, sys, mmap\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT); buf = mmap.mmap(-1, 8192)\n"
            "n = os.readv(fd, [buf]); sys.stdout.write(buf[:n].hex())\n",
            str(mnt / "config.json"),
        ).stdout
        assert bytes.fromhex(got) == config
        failed = ttfs("materialize", str(mnt), timeout=120)
        assert failed.returncode != 0
        assert "shared.bin" in failed.stderr and "error" in failed.stderr
        doc = status(mnt)
        assert doc["materialize"]["state"] == "failed" and doc["failure_count"] >= 1
        # The origin comes back: the same mount materializes.
        origin.set_down(False)
        again = ttfs("materialize", str(mnt), timeout=120)
        assert again.returncode == 0, again.stderr


def test_foreground_sigterm_unmounts_cleanly_and_tells_systemd(
    tmp_path: Path, model: Path, origin: Origin
) -> None:
    manifest = tmp_path / "m.json"
    write_manifest(origin, model, manifest)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    # No MANIFEST argument: the truss-transfer lookup paths (overridden for tests).
    env = daemon_env(NOTIFY_SOCKET=str(sock_path), TTFS_MANIFEST_PATHS=str(manifest))
    cache = ["--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ttfs", "mount", "--foreground", "--no-prefetch", *cache, str(mnt)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready and f"MAINPID={proc.pid}" in ready
        assert files_of(mnt) == files_of(model)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "STOPPING=1" in sock.recv(4096).decode()
        assert not is_mounted(mnt)
    finally:
        sock.close()
        stop_daemon(mnt, proc.pid)
        if proc.stderr is not None:
            proc.stderr.close()


def test_mount_refuses_bad_input_with_one_line(tmp_path: Path, model: Path, origin: Origin) -> None:
    manifest = tmp_path / "m.json"
    write_manifest(origin, model, manifest)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    # "w" is a file and a directory: the mount's tree refuses it (the parser leaves it to the
    # tree on this path), in either order.
    pointers = json.loads(manifest.read_text())["pointers"]
    collide, collide_back = tmp_path / "collide.json", tmp_path / "collide-back.json"
    both = [{**pointers[0], "file_name": "w"}, {**pointers[1], "file_name": "w/x.bin"}]
    collide.write_text(json.dumps({"pointers": both}))
    collide_back.write_text(json.dumps({"pointers": both[::-1]}))
    (tmp_path / "mnt").mkdir()
    cases = [
        ((str(manifest), str(tmp_path / "missing")), "does not exist"),
        ((str(manifest), str(a_file)), "is not a directory"),
        ((str(bad), str(tmp_path / "mnt")), "manifest"),
        ((str(collide), str(tmp_path / "mnt")), "'w' is a file in the mount, not a directory"),
        ((str(collide_back), str(tmp_path / "mnt")), "maps to mount path 'w', which is a dir"),
        ((str(tmp_path / "mnt"),), "no manifest given"),
    ]
    for args, text in cases:
        done = ttfs("mount", *args, env=daemon_env(TTFS_MANIFEST_PATHS=""))
        assert done.returncode != 0, args
        assert text in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert ttfs("status", str(tmp_path / "mnt")).returncode != 0
    assert "is not mounted" in ttfs("umount", str(tmp_path / "mnt")).stderr


def test_programmatic_mount_in_a_subprocess_and_unmount(
    tmp_path: Path, model: Path, origin: Origin
) -> None:
    from ttfs.fuse.daemon import mount_in_subprocess, unmount

    manifest = tmp_path / "m.json"
    write_manifest(origin, model, manifest)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "daemon.log"
    daemon = mount_in_subprocess(
        [manifest], mnt, cache_dir=tmp_path / "cache", prefetch=False, log_file=log
    )
    try:
        assert daemon.mountpoint == mnt and daemon.log_file == log
        assert status(mnt)["pid"] == daemon.pid
        assert files_of(mnt) == files_of(model)
        assert "kernel tuning" in log.read_text()
        assert unmount(mnt) is False  # not busy: a plain unmount
        assert not is_mounted(mnt) and not os.path.exists(f"/proc/{daemon.pid}/cmdline")
    finally:
        stop_daemon(mnt, daemon.pid)


_SERVE_ON_A_FILE = r"""
import sys
from pathlib import Path
from ttfs.config import Settings
from ttfs.fuse.serve import MountConfig, run
from ttfs.manifest import load_manifest
config = MountConfig(
    pointers=load_manifest(sys.argv[1]).pointers,
    mountpoint=Path(sys.argv[2]),
    settings=Settings.from_env(cache_dir=Path(sys.argv[3])),
)
try:
    run(config)
except Exception as e:
    print(type(e).__name__, e)
"""


def test_a_mount_failure_inside_the_daemon_is_one_error_not_a_group(
    tmp_path: Path, model: Path, origin: Origin
) -> None:
    manifest = tmp_path / "m.json"
    write_manifest(origin, model, manifest)
    target = tmp_path / "a-file"
    target.write_text("not a directory")
    out = run_py(_SERVE_ON_A_FILE, str(manifest), str(target), str(tmp_path / "cache")).stdout
    # The kernel mounts over a file, then the root (a directory) cannot be looked up there.
    assert out.startswith("MountError the new mount at"), out
    assert not is_mounted(target)
