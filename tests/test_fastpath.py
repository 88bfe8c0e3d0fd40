"""The fast path on real mounts: verified files become symlinks into the blob store.

What is proved here, through the kernel, with the CLI's detached daemon:

* a remount on a warm cache answers every verified file as a link from the first lookup, and
  reading it never reaches the daemon's read handler (``reads`` stays 0);
* a live mount switches a file to a link once its blob is verified, while a reader that opened
  it before keeps reading (and an mmap of it keeps working);
* loaders (safetensors, numpy memmap, torch.load(mmap=True), transformers) see the same files;
* a blob file changed after verification is never served as verified: the next open goes
  through the daemon, the blob is checked again, refetched, and the link comes back;
* a blob served by a link is pinned against eviction;
* ``--no-fast-path`` and ``TTFS_FAST_PATH=0`` keep every read in the daemon;
* a bind mount of the mountpoint elsewhere keeps working; ``ttfs status`` says how each file
  is served.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
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
    ttfs,
    wait_for,
    write_manifest,
)
from ttfs.control import file_status, walk_status
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
    make_shard(root / "m" / "model.safetensors", 6, 1024, seed=3)  # 24 MiB
    (root / "blob.bin").write_bytes(os.urandom(6 * BS + 123))
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


def _materialize(mnt: Path) -> None:
    done = ttfs("materialize", "--no-progress", str(mnt), timeout=120)
    assert done.returncode == 0, done.stderr


def _all_links(mnt: Path, names: list[str]) -> bool:
    return all((mnt / n).is_symlink() for n in names)


NAMES = ["config.json", "m/model.safetensors", "blob.bin"]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_remount_on_warm_cache_serves_links_from_the_first_read(
    tmp_path: Path, manifest: Path, model: Path, origin: Origin
) -> None:
    cache = tmp_path / "cache"
    with mounted(manifest, tmp_path / "mnt", cache) as m:
        _materialize(m.mountpoint)
    served = origin.stats.bytes_sent
    with mounted(manifest, tmp_path / "mnt2", cache, "--no-prefetch") as m:
        mnt = m.mountpoint
        for name in NAMES:
            p = mnt / name
            st = os.lstat(p)  # the very first lookup of the name
            assert p.is_symlink(), json.dumps(file_status(p))
            target = os.readlink(p)
            assert target.startswith(str(cache.resolve() / "blobs")), target
            assert os.path.isfile(p) and os.path.getsize(p) == (model / name).stat().st_size
            assert st.st_size == len(os.fsencode(target))
            assert sha256_file(p) == sha256_file(model / name)
            doc = file_status(p)
            assert doc["served_by"] == "kernel" and doc["link"] == target
            assert doc["reads"] == 0 and doc["verified"]
        root = status(mnt)
        assert root["served_by_kernel"] == len(NAMES) and root["fast_path"] == "on"
        assert sorted(d["path"] for d in walk_status(mnt)) == sorted(NAMES)
        assert all(d["reads"] == 0 for d in walk_status(mnt))
        shown = ttfs("status", str(mnt))
        assert shown.returncode == 0, shown.stderr
        assert "kernel" in shown.stdout and f"{len(NAMES)} file(s); fast path on" in shown.stdout
        assert "changed after verification" not in m.log_text()  # no needless recheck
    assert origin.stats.bytes_sent == served  # nothing fetched again


def test_live_switch_keeps_open_handles_and_mmaps_working(
    tmp_path: Path, manifest: Path, model: Path
) -> None:
    """A reader opens the shard (and maps it) while it is still a regular file served by the
    daemon; the mount then materializes and the name turns into a link; the old handle and the
    old mapping keep reading correct bytes, and a new open gets the link."""
    reader = r"""
import mmap, os, sys, hashlib
path, go, done = sys.argv[1:4]
f = open(path, "rb")
mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
head = f.read(1 << 20)
print("islink-before", os.path.islink(path), flush=True)
open(go, "w").close()
while not os.path.exists(done):
    pass
rest = f.read()
print("handle", hashlib.sha256(head + rest).hexdigest(), flush=True)
print("mmap", hashlib.sha256(mm[:]).hexdigest(), flush=True)
print("islink-after", os.path.islink(path), flush=True)
"""
    with mounted(manifest, tmp_path / "mnt", tmp_path / "cache", "--no-prefetch") as m:
        mnt = m.mountpoint
        path = mnt / "m" / "model.safetensors"
        go, done = tmp_path / "go", tmp_path / "done"
        child = subprocess.Popen(
            [os.sys.executable, "-c", reader, str(path), str(go), str(done)],  # type: ignore[attr-defined]
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(go.exists, 60, "the reader to open the file")
            assert not path.is_symlink()
            _materialize(mnt)
            wait_for(lambda: _all_links(mnt, NAMES), 30, "every name to become a link")
            done.touch()
            out, _ = child.communicate(timeout=60)
        finally:
            child.kill()
        want = sha256_file(model / "m" / "model.safetensors")
        assert "islink-before False" in out
        assert f"handle {want}" in out and f"mmap {want}" in out
        assert "islink-after True" in out
        assert file_status(path)["served_by"] == "kernel"


def test_loaders_read_through_the_fast_path(
    tmp_path: Path, manifest: Path, model: Path, origin: Origin
) -> None:
    """safetensors (safe_open, load_file), numpy.memmap and torch.load(mmap=True) read the
    links of a remount on a warm cache; the daemon's read handler is never called."""
    pytest.importorskip("torch")
    cache = tmp_path / "cache"
    run_py(
        "import sys, torch\n"
        "torch.save({'w': torch.arange(1 << 20, dtype=torch.float32)}, sys.argv[1])",
        str(model / "ckpt.pt"),
    )
    write_manifest(origin, model, manifest)
    with mounted(manifest, tmp_path / "mnt", cache) as m:
        _materialize(m.mountpoint)
    with mounted(manifest, tmp_path / "mnt2", cache, "--no-prefetch") as m:
        mnt = m.mountpoint
        out = run_py(
            """
import os, sys, numpy as np, torch
from safetensors import safe_open
from safetensors.numpy import load_file
mnt, src = sys.argv[1:3]
p = mnt + "/m/model.safetensors"
assert os.path.islink(p) and os.path.isfile(p)
t, ref = load_file(p), load_file(src + "/m/model.safetensors")
assert t.keys() == ref.keys() and all((t[k] == ref[k]).all() for k in t)
with safe_open(p, "np") as f:
    assert (f.get_tensor("layer002") == ref["layer002"]).all()
mm = np.memmap(mnt + "/blob.bin", dtype=np.uint8, mode="r")
assert bytes(mm) == open(src + "/blob.bin", "rb").read()
ck = torch.load(mnt + "/ckpt.pt", mmap=True, weights_only=True)
assert torch.equal(ck["w"], torch.arange(1 << 20, dtype=torch.float32))
print("ok")
""",
            str(mnt),
            str(model),
        )
        assert out.stdout.strip() == "ok"
        docs = list(walk_status(mnt))
        assert all(d["served_by"] == "kernel" and d["reads"] == 0 for d in docs), docs


def test_transformers_from_pretrained_through_the_fast_path(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tests.test_mount_loaders import _BUILD, _LOAD

    src = tmp_path / "tiny-llama"
    ref = tmp_path / "logits.pt"
    env = daemon_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    run_py(_BUILD, str(src), str(ref), env=env, timeout=180)
    cache = tmp_path / "cache"
    with Origin(src) as origin:
        manifest = tmp_path / "m.json"
        names = write_manifest(origin, src, manifest)
        with mounted(manifest, tmp_path / "mnt", cache) as m:
            _materialize(m.mountpoint)
            wait_for(lambda: _all_links(m.mountpoint, names), 30, "links")
            out = run_py(_LOAD, str(m.mountpoint), str(src), str(ref), env=env, timeout=180)
            assert int(out.stdout.strip()) >= 2
            assert all(d["served_by"] == "kernel" for d in walk_status(m.mountpoint))


def _tamper(path: str, offset: int) -> None:
    """Overwrite 4 KiB of a blob file in place, then put its mtime back (a careful tamperer)."""
    st = os.stat(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xee" * 4096, offset)
    finally:
        os.close(fd)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_blob_changed_after_verification_is_never_served_as_verified(
    tmp_path: Path, manifest: Path, model: Path, origin: Origin
) -> None:
    """A write into a linked blob file (mtime restored) is caught by the next open: the open
    goes to the daemon, which drops the changed block, fetches it again from the origin and
    serves the right bytes; once verified again the name is a link again."""
    cache = tmp_path / "cache"
    want = sha256_file(model / "blob.bin")
    with mounted(manifest, tmp_path / "mnt", cache) as m:
        mnt = m.mountpoint
        _materialize(mnt)
        p = mnt / "blob.bin"
        wait_for(p.is_symlink, 30, "the link")
        target = os.readlink(p)
        before = origin.stats.bytes_sent
        _tamper(target, 3 * BS + 10)
        # A fresh reader process: its open walks through the link, readlink sees the change.
        out = run_py(
            "import hashlib, sys\n"
            "print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())",
            str(p),
        )
        assert out.stdout.strip() == want
        assert origin.stats.bytes_sent - before >= BS  # the changed block came from the origin
        wait_for(p.is_symlink, 30, "the link to come back after the recheck")
        doc = file_status(p)
        assert doc["served_by"] == "kernel" and doc["verified"] and doc["reads"] >= 1
        assert sha256_file(Path(target)) == want  # the blob file itself was repaired
        assert "changed block(s) dropped" in m.log_text()


def test_a_change_between_mounts_that_keeps_size_and_mtime_is_caught(
    tmp_path: Path, manifest: Path, model: Path, origin: Origin
) -> None:
    """The index trusts a verified blob by size and mtime; a mount that served it as a link
    also remembers ctime and inode, so the next mount checks the blob again before linking it
    (and repairs it from the origin)."""
    cache = tmp_path / "cache"
    want = sha256_file(model / "blob.bin")
    with mounted(manifest, tmp_path / "mnt", cache) as m:
        _materialize(m.mountpoint)
        wait_for((m.mountpoint / "blob.bin").is_symlink, 30, "the link")
        target = os.readlink(m.mountpoint / "blob.bin")
    _tamper(target, 10)
    before = origin.stats.bytes_sent
    with mounted(manifest, tmp_path / "mnt2", cache, "--no-prefetch") as m:
        p = m.mountpoint / "blob.bin"
        assert sha256_file(p) == want
        wait_for(p.is_symlink, 30, "the link after the recheck")
        assert sha256_file(p) == want and sha256_file(Path(target)) == want
        assert "blob.bin: blob file changed after verification" in m.log_text()
    assert origin.stats.bytes_sent - before == BS  # exactly the changed block, again


def test_no_fast_path_flag_and_env_keep_reads_in_the_daemon(
    tmp_path: Path, manifest: Path, model: Path
) -> None:
    cache = tmp_path / "cache"
    with mounted(manifest, tmp_path / "mnt", cache) as m:
        _materialize(m.mountpoint)
    for args, env in ((("--no-fast-path",), None), ((), daemon_env(TTFS_FAST_PATH="0"))):
        with mounted(manifest, tmp_path / "mnt2", cache, *args, env=env) as m:
            p = m.mountpoint / "m" / "model.safetensors"
            assert not p.is_symlink()
            assert sha256_file(p) == sha256_file(model / "m" / "model.safetensors")
            doc = file_status(p)
            assert doc["served_by"] == "daemon" and doc["reads"] > 0
            assert doc["fast_path"] == "off (--no-fast-path)"
            assert status(m.mountpoint)["served_by_kernel"] == 0


def test_a_bind_mount_of_the_mountpoint_reads_through_the_links(
    tmp_path: Path, manifest: Path, model: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    with mounted(manifest, tmp_path / "mnt", tmp_path / "cache") as m:
        _materialize(m.mountpoint)
        wait_for(lambda: _all_links(m.mountpoint, NAMES), 30, "links")
        subprocess.run(["mount", "--bind", str(m.mountpoint), str(other)], check=True)
        try:
            for name in NAMES:
                assert (other / name).is_symlink()
                assert sha256_file(other / name) == sha256_file(model / name)
            assert all(d["served_by"] == "kernel" for d in walk_status(other))
        finally:
            subprocess.run(["umount", "-l", str(other)], check=False)


def test_a_reader_that_cannot_see_the_cache_turns_the_fast_path_off(
    tmp_path: Path, manifest: Path, model: Path
) -> None:
    """A process in its own mount namespace, where the cache directory is hidden (as in a
    container given only the mountpoint), opens a file of the mount: the link would dangle, so
    the fast path turns off for the mount and the open is served by the daemon."""
    cache = tmp_path / "cache"
    with mounted(manifest, tmp_path / "mnt", cache) as m:
        mnt = m.mountpoint
        _materialize(mnt)
        wait_for(lambda: _all_links(mnt, NAMES), 30, "links")
        script = (
            f"mount -t tmpfs none {cache.resolve()} && "
            f"sha256sum {mnt / 'blob.bin'} && test ! -L {mnt / 'blob.bin'}"
        )
        done = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[0] == sha256_file(model / "blob.bin")
        root = status(mnt)
        assert root["served_by_kernel"] == 0 and "does not see the cache" in root["fast_path"]
        assert not (mnt / "blob.bin").is_symlink()


def test_another_user_who_cannot_read_the_cache_gets_the_daemon_path(
    tmp_path: Path, manifest: Path, model: Path
) -> None:
    """Root mounts with allow_other; the cache lies under a 0700 directory. A reader running as
    nobody could not follow a link into it, so its lookup turns the fast path off for the
    mount and it reads the right bytes through the daemon."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    cache = tmp_path / "cache"  # under pytest's 0700 base directory
    public = Path(tempfile.mkdtemp(prefix="ttfs-fastpath-"))
    try:
        public.chmod(0o755)
        with mounted(manifest, public / "mnt", cache, "--allow-other") as m:
            mnt = m.mountpoint
            _materialize(mnt)
            wait_for(lambda: _all_links(mnt, NAMES), 30, "links")
            done = subprocess.run(
                [*NOBODY, "sha256sum", str(mnt / "blob.bin")],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout.split()[0] == sha256_file(model / "blob.bin")
            root = status(mnt)
            assert root["served_by_kernel"] == 0 and "cannot read the cache" in root["fast_path"]
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_linked_blobs_survive_the_mounts_eviction(
    tmp_path: Path, manifest: Path, model: Path, origin: Origin
) -> None:
    """With ``--cache-size`` far below the model, the mount's evictor removes another model's
    blob from the cache but never a blob a link of this mount points to."""
    cache = tmp_path / "cache"
    (model / "other.bin").write_bytes(os.urandom(3 * BS))
    other = tmp_path / "other.json"
    write_manifest(origin, model, other, names=["other.bin"])
    with mounted(other, tmp_path / "mnt-other", cache) as m:
        _materialize(m.mountpoint)
    other_blob = Path(os.path.realpath(cache)) / "blobs"
    other_files = [p for p in other_blob.rglob("*") if p.is_file() and "." not in p.name]
    assert len(other_files) == 1
    with mounted(manifest, tmp_path / "mnt", cache, "--cache-size", "1M") as m:
        mnt = m.mountpoint
        _materialize(mnt)
        wait_for(lambda: _all_links(mnt, NAMES), 30, "links")
        wait_for(lambda: not other_files[0].exists(), 30, "the other model's blob to be evicted")
        for name in NAMES:
            assert os.path.exists(os.readlink(mnt / name))
            assert sha256_file(mnt / name) == sha256_file(model / name)
        assert status(mnt)["served_by_kernel"] == len(NAMES)
