"""Lazy links on real mounts: files still being fetched are links too, their reads held by the gate.

What is proved here, through the kernel, with the CLI's detached daemon (``--lazy-links``):

* a cold file is a symlink into the cache's view from its first lookup; a read of one range
  fetches only the blocks it needs; safetensors and numpy memmap load it while it is fetched,
  and the access trace is still recorded;
* a verified blob's reads stop reaching the daemon (its inode is ignored by the gate);
* a listing before the blobs are opened (readdirplus) does not keep the names regular files;
* four threads mapping four cold shards at once each get their own bytes;
* a fetch that fails fails the read with EIO, never with the zeros of the sparse cache file;
* a reader still holding a cache file that a failed verification replaced gets EIO;
* ``kill -9`` of the daemon while a read is held: the guard fails it and every later read of
  the partial file with EIO (never zeros), and once the reader is gone unmounts the view and
  exits;
* a guard killed alone is started again before a clean stop leaves a reader behind;
* transformers loads a sharded model through a cold lazy mount with the same logits;
* a cache without pre-content events (tmpfs) keeps the daemon path, and says why;
* a clean unmount leaves no view mount and no guard behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from demo.origin import Faults, Origin
from tests.mount_helpers import (
    make_shard,
    mounted,
    mounted_under_ulimit,
    require_fuse,
    run_py,
    sha256_file,
    status,
    ttfs,
    wait_for,
    write_manifest,
    write_small_files,
)
from ttfs.control import file_status
from ttfs.units import MiB

pytestmark = pytest.mark.fuse
BS = 2 * MiB


@pytest.fixture(autouse=True)
def _needs_fuse() -> None:
    require_fuse()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "m").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    make_shard(root / "m" / "model.safetensors", 6, 1024, seed=5)  # 24 MiB
    (root / "blob.bin").write_bytes(os.urandom(8 * BS + 123))
    return root


@pytest.fixture
def origin(model: Path) -> Iterator[Origin]:
    with Origin(model) as o:
        yield o


@pytest.fixture
def manifest(tmp_path: Path, origin: Origin, model: Path) -> Path:
    path = tmp_path / "m.json"
    write_manifest(origin, model, path)
    return path


def _views(cache: Path) -> list[str]:
    """View mounts of ``cache`` still in the mount table."""
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if f"{cache.resolve()}/view." in line]


def _guards(cache: Path) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(c.endswith(b"ttfs/vfs/gate.py") for c in cmd) and any(
            str(cache.resolve()).encode() in c for c in cmd
        ):
            found.append(int(pid))
    return found


def _left_clean(cache: Path) -> bool:
    return not _views(cache) and not _guards(cache)


def test_cold_files_are_links_and_loaders_read_them_while_fetched(
    tmp_path: Path, manifest: Path, model: Path, origin: Origin
) -> None:
    cache = tmp_path / "cache"
    with mounted(manifest, tmp_path / "mnt", cache, "--lazy-links", "--no-prefetch") as m:
        mnt = m.mountpoint
        blob = mnt / "blob.bin"
        assert blob.is_symlink()  # the very first lookup, nothing fetched yet
        target = os.readlink(blob)
        assert target.startswith(f"{cache.resolve()}/view.{m.pid}/"), target
        doc = file_status(blob)
        assert doc["served_by"] == "kernel" and doc["local_bytes"] == 0, doc
        root = status(mnt)
        assert root["lazy_links"] == "on" and root["fast_path"] == "on", root

        want = (model / "blob.bin").read_bytes()
        fd = os.open(blob, os.O_RDONLY)
        try:
            at = 5 * BS + 100
            assert os.pread(fd, 4096, at) == want[at : at + 4096]
        finally:
            os.close(fd)
        doc = file_status(blob)
        assert 0 < doc["local_bytes"] <= 2 * BS, doc  # the range's block, not the file
        assert not doc["complete"] and doc["reads"] == 0  # no read reached the FUSE handler

        loaded = run_py(
            "import sys, hashlib\n"
            "from safetensors.numpy import load_file\n"
            "import numpy as np\n"
            "d = load_file(sys.argv[1])\n"
            "h = hashlib.sha256()\n"
            "for k in sorted(d): h.update(k.encode()); h.update(d[k].tobytes())\n"
            "m = np.memmap(sys.argv[2], dtype=np.uint8, mode='r')\n"
            "print(h.hexdigest(), hashlib.sha256(m[:]).hexdigest())\n",
            str(mnt / "m" / "model.safetensors"),
            str(blob),
        )
        expected = run_py(
            "import sys, hashlib\n"
            "from safetensors.numpy import load_file\n"
            "d = load_file(sys.argv[1])\n"
            "h = hashlib.sha256()\n"
            "for k in sorted(d): h.update(k.encode()); h.update(d[k].tobytes())\n"
            "print(h.hexdigest())\n",
            str(model / "m" / "model.safetensors"),
        )
        assert loaded.stdout.split() == [expected.stdout.strip(), sha256_file(model / "blob.bin")]
        root = status(mnt)
        assert root["lazy_reads"] >= 3 and root["trace"]["recorded_blocks"] > 0, root
        assert all(file_status(mnt / n)["reads"] == 0 for n in ("blob.bin", "m/model.safetensors"))

        done = ttfs("materialize", "--no-progress", str(mnt), timeout=120)
        assert done.returncode == 0, done.stderr
        held = status(mnt)["lazy_reads"]
        assert sha256_file(blob) == sha256_file(model / "blob.bin")  # 1 MiB reads, verified
        assert status(mnt)["lazy_reads"] == held  # a verified blob is not asked about any more
        assert file_status(blob)["verified"]
    wait_for(lambda: _left_clean(cache), 30, "the view to be unmounted and the guard to exit")
    assert not list(cache.glob("view.*"))


def test_threads_mapping_different_shards_at_once_get_their_own_bytes(tmp_path: Path) -> None:
    """Four loader threads (as vLLM's) map four cold shards through lazy links at once: each
    mapping is held until its whole shard is local (a bulk request per shard, first come first
    served; no prefetch, so every byte is fetched for a held mapping), and every thread reads
    exactly its shard's tensors."""
    root = tmp_path / "src"
    root.mkdir()
    for i in range(4):
        make_shard(root / f"model-{i}.safetensors", 4, 512 + 128 * i, seed=i)  # 8-14 MiB
    with Origin(root) as origin:
        manifest = tmp_path / "m.json"
        write_manifest(origin, root, manifest)
        cache = tmp_path / "cache"
        code = (
            "import sys, hashlib, threading\n"
            "from safetensors.numpy import load_file\n"
            "out = {}\n"
            "def load(p):\n"
            "    d = load_file(p); h = hashlib.sha256()\n"
            "    for k in sorted(d): h.update(k.encode()); h.update(d[k].tobytes())\n"
            "    out[p] = h.hexdigest()\n"
            "ts = [threading.Thread(target=load, args=(p,)) for p in sys.argv[1:]]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "print(' '.join(out[p] for p in sys.argv[1:]))\n"
        )
        names = [f"model-{i}.safetensors" for i in range(4)]
        expected = run_py(code, *(str(root / n) for n in names)).stdout.split()
        with mounted(manifest, tmp_path / "mnt", cache, "--lazy-links", "--no-prefetch") as m:
            paths = [m.mountpoint / n for n in names]
            # A listing (readdirplus) may come before the blobs are opened: those entries are
            # regular files first, then links once the opener gets to them.
            ls = subprocess.run(
                ["ls", "-l", str(m.mountpoint)], capture_output=True, text=True, check=True
            )
            assert all(n in ls.stdout for n in names), ls.stdout
            wait_for(lambda: all(p.is_symlink() for p in paths), 30, "every name to be a link")
            assert run_py(code, *(str(p) for p in paths)).stdout.split() == expected
            root_status = status(m.mountpoint)
            assert root_status["lazy_reads"] >= 4 and root_status["lazy_links"] == "on"
        wait_for(lambda: _left_clean(cache), 30, "the view to be unmounted and the guard to exit")


def test_a_failed_fetch_fails_the_read_with_eio_not_zeros(
    tmp_path: Path, origin: Origin, model: Path
) -> None:
    manifest = tmp_path / "m.json"
    write_manifest(origin, model, manifest)
    doc = json.loads(manifest.read_text())
    for p in doc["pointers"]:  # the origin answers 404: not retried
        p["resolution"]["url"] = p["resolution"]["url"].replace("blob.bin", "gone.bin")
    manifest.write_text(json.dumps(doc))
    cache = tmp_path / "cache"
    with mounted(manifest, tmp_path / "mnt", cache, "--lazy-links", "--no-prefetch") as m:
        blob = m.mountpoint / "blob.bin"
        assert blob.is_symlink()
        with open(blob, "rb") as f, pytest.raises(OSError) as failed:
            f.read(4096)
        assert failed.value.errno == errno.EIO
        assert "gone.bin" in m.log_text() or file_status(blob)["error"]
    wait_for(lambda: _left_clean(cache), 30, "the view to be unmounted and the guard to exit")


_STALE_READER = r"""
import os, sys, time
path, ready, go = sys.argv[1:4]
fd = os.open(path, os.O_RDONLY)
while os.read(fd, 1 << 20):
    pass
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.05)
try:
    os.pread(fd, 4096, 0)
    print("data", flush=True)
except OSError as e:
    print("errno", e.errno, flush=True)
"""


def test_a_reader_of_a_blob_that_failed_verification_gets_eio_not_its_bytes(
    tmp_path: Path, origin: Origin, model: Path
) -> None:
    """The origin's bytes do not match the manifest hash: a reader that read them while they
    were fetched (unverified, as through the daemon) holds a cache file that the failed
    verification replaced; from then on its reads fail with EIO instead of returning bytes the
    mount knows are wrong, and the name is no longer a link to them."""
    manifest = tmp_path / "m.json"
    write_manifest(origin, model, manifest)
    doc = json.loads(manifest.read_text())
    for p in doc["pointers"]:
        if p["file_name"].endswith("blob.bin"):
            p["hash"] = "0" * 64
    manifest.write_text(json.dumps(doc))
    cache = tmp_path / "cache"
    with mounted(manifest, tmp_path / "mnt", cache, "--lazy-links", "--no-prefetch") as m:
        blob = m.mountpoint / "blob.bin"
        assert blob.is_symlink()
        ready, go = tmp_path / "ready", tmp_path / "go"
        reader = subprocess.Popen(
            [sys.executable, "-c", _STALE_READER, str(blob), str(ready), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(ready.exists, 60, "the reader to read the whole file")
            wait_for(lambda: file_status(blob)["error"], 60, "the verification to fail")
            go.touch()
            out, _ = reader.communicate(timeout=30)
        finally:
            reader.kill()
        assert out.split() == ["errno", str(errno.EIO)], out
        assert "does not match" in (file_status(blob)["error"] or "")
    wait_for(lambda: _left_clean(cache), 30, "the view to be unmounted and the guard to exit")


_HELD_READER = r"""
import os, sys, time
path, first, held, ready = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
fd = os.open(path, os.O_RDONLY)
head = os.pread(fd, 4096, first)
print("head", head.hex()[:16], flush=True)
open(ready, "w").close()
for at in (held, held + 4 * 1024 * 1024):
    try:
        data = os.pread(fd, 4096, at)
        print("read", at, "zeros" if data == bytes(len(data)) else "data", flush=True)
    except OSError as e:
        print("read", at, "errno", e.errno, flush=True)
try:
    os.pread(fd, 4096, first)
    print("again data", flush=True)
except OSError as e:
    print("again errno", e.errno, flush=True)
"""


def test_kill_9_of_the_daemon_fails_held_reads_with_eio_never_zeros(
    tmp_path: Path, manifest: Path, model: Path, origin: Origin
) -> None:
    cache = tmp_path / "cache"
    with mounted(manifest, tmp_path / "mnt", cache, "--lazy-links", "--no-prefetch") as m:
        blob = m.mountpoint / "blob.bin"
        with open(blob, "rb") as f:
            f.read(4096)  # block 0 is local
        origin.faults = Faults(stall_rate=1.0, stall_seconds=60)  # every later fetch hangs
        ready = tmp_path / "ready"
        reader = subprocess.Popen(
            [sys.executable, "-c", _HELD_READER, str(blob), "0", str(5 * BS), str(ready)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(ready.exists, 30, "the reader's first read")
            time.sleep(0.5)  # its next read is held by the gate, its fetch stalled
            assert reader.poll() is None
            os.kill(m.pid, signal.SIGKILL)
            out, _ = reader.communicate(timeout=30)
        finally:
            reader.kill()
        want = (model / "blob.bin").read_bytes()[:8].hex()
        assert out.splitlines() == [
            f"head {want}",
            f"read {5 * BS} errno {errno.EIO}",  # held when the daemon died
            f"read {5 * BS + 4 * MiB} errno {errno.EIO}",  # asked after: the guard answers
            f"again errno {errno.EIO}",  # even a local range: only the daemon knew it whole
        ], out
    wait_for(lambda: _left_clean(cache), 30, "the guard to unmount the view and exit")


def test_a_cache_without_pre_content_events_keeps_the_daemon_path(
    tmp_path: Path, manifest: Path, model: Path
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no tmpfs at /dev/shm")
    cache = shm / f"ttfs-lazy-{os.getpid()}-{tmp_path.name}"
    try:
        with mounted(manifest, tmp_path / "mnt", cache, "--lazy-links", "--no-prefetch") as m:
            blob = m.mountpoint / "blob.bin"
            assert sha256_file(blob) == sha256_file(model / "blob.bin")
            root = status(m.mountpoint)
            assert root["lazy_links"].startswith("off: "), root
            assert "lazy links off" in m.log_text()
            assert file_status(blob)["reads"] > 0  # read through the daemon
        assert _left_clean(cache)
    finally:
        subprocess.run(["rm", "-rf", str(cache)], check=False)


def test_transformers_from_pretrained_through_a_cold_lazy_mount(tmp_path: Path) -> None:
    """transformers loads a sharded model through a cold ``--lazy-links`` mount (no prefetch:
    every byte is fetched for the loader's own reads and mappings) with the same logits as
    from the files themselves, and nothing it read went through the daemon's read handler."""
    from tests.test_mount_loaders import _BUILD, _LOAD  # transformers: a test dependency

    src = tmp_path / "tiny-llama"
    ref = tmp_path / "logits.pt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    run_py(_BUILD, str(src), str(ref), env=env, timeout=180)
    cache = tmp_path / "cache"
    with Origin(src) as origin:
        manifest = tmp_path / "m.json"
        names = write_manifest(origin, src, manifest)
        with mounted(manifest, tmp_path / "mnt", cache, "--lazy-links", "--no-prefetch") as m:
            assert all((m.mountpoint / n).is_symlink() for n in names)
            out = run_py(_LOAD, str(m.mountpoint), str(src), str(ref), env=env, timeout=180)
            assert int(out.stdout.strip()) >= 2
            assert all(file_status(m.mountpoint / n)["reads"] == 0 for n in names)
            assert status(m.mountpoint)["lazy_reads"] > 0
    wait_for(lambda: _left_clean(cache), 30, "the view to be unmounted and the guard to exit")


def test_a_killed_guard_is_replaced_before_a_clean_stop_leaves_a_reader_behind(
    tmp_path: Path, manifest: Path, origin: Origin
) -> None:
    """``kill -9`` of the guard alone, then a clean stop of the daemon while a reader still holds
    a partial file: the daemon starts a new guard before it lets go of the group, so the
    reader's next read of an unfetched range fails with EIO instead of returning zeros."""
    cache = tmp_path / "cache"
    ready, go = tmp_path / "ready", tmp_path / "go"
    code = (
        "import os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "os.pread(fd, 4096, 0)\n"
        "open(sys.argv[2], 'w').close()\n"
        "while not os.path.exists(sys.argv[3]):\n"
        "    time.sleep(0.05)\n"
        "try:\n"
        "    d = os.pread(fd, 4096, int(sys.argv[4]))\n"
        "    print('zeros' if d == bytes(len(d)) else 'data')\n"
        "except OSError as e:\n"
        "    print('errno', e.errno)\n"
    )
    with mounted(manifest, tmp_path / "mnt", cache, "--lazy-links", "--no-prefetch") as m:
        blob = m.mountpoint / "blob.bin"
        reader = subprocess.Popen(
            [sys.executable, "-c", code, str(blob), str(ready), str(go), str(6 * BS)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(ready.exists, 30, "the reader's first read")
            (guard,) = _guards(cache)
            os.kill(guard, signal.SIGKILL)
            wait_for(lambda: not _guards(cache), 10, "the guard to die")
        except BaseException:
            reader.kill()
            raise
    try:
        assert _guards(cache), "no guard after the daemon stopped with a reader in the view"
        go.touch()
        out, _ = reader.communicate(timeout=30)
    finally:
        reader.kill()
    assert out.split() == ["errno", str(errno.EIO)], out
    wait_for(lambda: _left_clean(cache), 30, "the new guard to unmount the view and exit")


_MANY_READERS = r"""
import hashlib, json, os, resource, sys, threading
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
root, names = sys.argv[1], json.load(open(sys.argv[2]))
fds = {n: os.open(os.path.join(root, n), os.O_RDONLY) for n in names}  # lookups, nothing held
barrier = threading.Barrier(len(names) + 1)
out = {}
def read(name):
    barrier.wait()
    try:
        data = b""
        while chunk := os.read(fds[name], 1 << 20):
            data += chunk
        out[name] = hashlib.sha256(data).hexdigest()
    except OSError as e:
        out[name] = f"errno {e.errno}"
threads = [threading.Thread(target=read, args=(n,)) for n in names]
for t in threads:
    t.start()
print("opened", flush=True)
barrier.wait()
for t in threads:
    t.join()
print(json.dumps(out), flush=True)
"""


@contextlib.contextmanager
def _many_held_readers(
    tmp_path: Path, n: int
) -> Iterator[tuple[Origin, int, Path, dict[str, str], Callable[[], dict[str, str]]]]:
    """A ``--lazy-links`` daemon under ``ulimit -n 1024`` over ``n`` small files of a slow
    origin (1 s per request), and ``n`` reader threads each holding a read of its own file.
    Yields the origin, the daemon's pid, its cache, the files' sha256 and a function that waits
    for the readers and returns what each got (a sha256 or ``errno N``)."""
    files = write_small_files(tmp_path / "src", n)
    with Origin(tmp_path / "src", latency=1.0) as origin:
        manifest = tmp_path / "m.json"
        write_manifest(origin, tmp_path / "src", manifest)
        names = tmp_path / "names.json"
        names.write_text(json.dumps(sorted(files)))
        mnt, cache = tmp_path / "mnt", tmp_path / "cache"
        args = ("--lazy-links", "--no-prefetch")
        with mounted_under_ulimit(1024, manifest, mnt, cache, *args) as (pid, _):
            reader = subprocess.Popen(
                [sys.executable, "-c", _MANY_READERS, str(mnt), str(names)],
                stdout=subprocess.PIPE,
                text=True,
            )

            def results() -> dict[str, str]:
                out, _ = reader.communicate(timeout=120)
                got: dict[str, str] = json.loads(out)
                return got

            try:
                assert reader.stdout is not None
                assert reader.stdout.readline() == "opened\n"
                time.sleep(2.0)  # every thread's read is held (32 fetched per second)
                want = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
                yield origin, pid, cache, want, results
            finally:
                reader.kill()


def test_more_held_reads_than_the_daemons_open_file_limit(tmp_path: Path) -> None:
    """1,200 threads each read a different cold file at once through a daemon started under
    ``ulimit -n 1024`` (each held read arrives with a descriptor): reads beyond the daemon's
    budget wait in the kernel's queue instead of failing (a group that cannot open the
    event's descriptor denies the read), and every reader gets its own bytes."""
    with _many_held_readers(tmp_path, 1200) as (origin, pid, cache, want, results):
        held = len(os.listdir(f"/proc/{pid}/fd"))
        waiting = status(tmp_path / "mnt")["lazy_waiting"]
        assert 250 <= waiting <= 1024 // 4, waiting  # the budget; the rest queue in the kernel
        origin.latency = 0.0
        got = results()
        assert {n: v for n, v in got.items() if v != want[n]} == {}
        assert held < 1024, held
        after = status(tmp_path / "mnt")
        assert after["lazy_links"] == "on" and after["lazy_waiting"] == 0, after
        log = (cache.parent / "mnt-daemon.log").read_text()
        assert "Too many open files" not in log and "lazy links:" not in log


def test_kill_9_with_more_held_reads_than_the_open_file_limit_fails_them_all(
    tmp_path: Path,
) -> None:
    """``kill -9`` of the daemon while 1,400 reads are held, more than 1,024 of them still
    queued in the kernel: the guard (same limit) takes them a few at a time and fails every
    one with EIO; none gets the sparse file's zeros or a kernel EPERM, and the guard outlives
    them all."""
    with _many_held_readers(tmp_path, 1400) as (origin, pid, cache, want, results):
        origin.latency = 60.0  # nothing more arrives before the kill
        os.kill(pid, signal.SIGKILL)
        got = results()
        eio = f"errno {errno.EIO}"
        assert {n: v for n, v in got.items() if v not in (want[n], eio)} == {}
        assert sum(v == eio for v in got.values()) > 1300  # the few read before it: their bytes
    wait_for(lambda: _left_clean(cache), 30, "the guard to unmount the view and exit")


def test_readers_killed_while_their_reads_are_held_leave_nothing_behind(
    tmp_path: Path, manifest: Path, model: Path, origin: Origin
) -> None:
    """``kill -9`` of 16 readers whose reads are held: the daemon's answers find no reader
    (the kernel dropped the reads), it closes their descriptors and serves the next reader of
    the same range its bytes."""
    cache = tmp_path / "cache"
    with mounted(manifest, tmp_path / "mnt", cache, "--lazy-links", "--no-prefetch") as m:
        blob = m.mountpoint / "blob.bin"
        with open(blob, "rb") as f:
            f.read(4096)  # block 0 is local
        before = len(os.listdir(f"/proc/{m.pid}/fd"))
        origin.latency = 3.0  # the next fetches take 3 s to start
        readers = []
        for i in range(16):
            ready = tmp_path / f"ready-{i}"
            args = [str(blob), "0", str((1 + i % 6) * BS), str(ready)]
            readers.append((subprocess.Popen([sys.executable, "-c", _HELD_READER, *args]), ready))
        try:
            for _, ready in readers:
                wait_for(ready.exists, 30, "a reader's first read")
            wait_for(lambda: status(m.mountpoint)["lazy_waiting"] == 16, 30, "16 held reads")
            for reader, _ in readers:
                reader.kill()
                reader.wait(timeout=10)
        finally:
            for reader, _ in readers:
                reader.kill()
        origin.latency = 0.0
        want = (model / "blob.bin").read_bytes()
        out = run_py(
            "import sys\nf = open(sys.argv[1], 'rb')\nf.seek(int(sys.argv[2]))\n"
            "sys.stdout.write(f.read(4096).hex())",
            str(blob),
            str(3 * BS),
        )
        assert out.stdout == want[3 * BS : 3 * BS + 4096].hex()
        wait_for(lambda: len(os.listdir(f"/proc/{m.pid}/fd")) <= before + 2, 30, "fds closed")
        after = status(m.mountpoint)
        assert after["lazy_links"] == "on" and after["lazy_waiting"] == 0, after
        assert "cannot answer" not in m.log_text()
    wait_for(lambda: _left_clean(cache), 30, "the view to be unmounted and the guard to exit")
