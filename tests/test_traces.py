"""Access traces (issue 11): recorded by one replica, published to the shared cache, replayed by
the next cold start in the recorded order (the origin's request log shows it), and ignored
when the manifest changes. Real mounts, a real origin, the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import trio

from tests.fakes import FakeProvider, pointer_for, ramp
from tests.mount_helpers import mounted, require_fuse, status, wait_for, write_manifest
from tests.origin_helpers import records
from ttfs.blocks import BlockStore
from ttfs.config import Settings
from ttfs.fetch import open_fetcher
from ttfs.manifest import HttpResolution, Pointer
from ttfs.providers import ProviderSet
from ttfs.units import MiB
from ttfs.vfs import FsOptions, Tree, core, open_model_fs
from ttfs.vfs.trace import SHARED_DIR, Recorder, Trace, TraceStore, manifest_digest

BS = 2 * MiB


def _pointer(name: str, digest: str, size: int) -> Pointer:
    return Pointer(
        HttpResolution("http://x.invalid/" + name, 4044816725), name, name, "sha256", digest, size
    )


# -- units --------------------------------------------------------------------------------------


def test_recorder_keeps_first_reads_in_order_as_runs() -> None:
    r = Recorder("d", BS)
    r.on_read("b", range(4, 5))
    r.on_read("a", range(0, 3))
    r.on_read("a", range(3, 4))  # continues a's run
    r.on_read("b", range(4, 6))  # block 4 seen: only 5 is new, a new run after a's
    r.on_read("a", range(1, 2))  # seen
    assert r.trace.runs == [("b", 4, 4), ("a", 0, 3), ("b", 5, 5)]
    assert r.blocks == 6


def test_trace_is_ignored_when_stale_and_trimmed_to_the_manifest(tmp_path: Path) -> None:
    pointers = [_pointer("a", "h" * 64, 5 * BS), _pointer("b", "k" * 64, BS)]
    digest = manifest_digest(pointers)
    # URLs do not matter; a changed size (or hash, or name) is another model.
    moved = [_pointer("a", "h" * 64, 5 * BS), _pointer("b", "k" * 64, BS)]
    assert manifest_digest(list(reversed(moved))) == digest
    assert manifest_digest([_pointer("a", "h" * 64, 5 * BS + 1), pointers[1]]) != digest
    counts = {"h" * 64: 5, "k" * 64: 1}
    good = Trace(digest, BS, [("k" * 64, 0, 3), ("gone", 0, 1), ("h" * 64, 2, 9)])
    parsed, why = Trace.parse(good.dumps(), digest, BS, counts)
    assert why == "ok" and parsed is not None
    assert parsed.runs == [("k" * 64, 0, 0), ("h" * 64, 2, 4)]  # unknown blob dropped, clipped
    assert Trace.parse(good.dumps(), "other", BS, counts)[0] is None
    assert Trace.parse(good.dumps(), digest, 4 * MiB, counts)[0] is None
    assert Trace.parse("{not json", digest, BS, counts)[0] is None
    # The store prefers the local trace, falls back to the shared one.
    store = TraceStore(tmp_path / "cache", tmp_path / "shared")
    assert store.load(digest, BS, counts) == (None, "none")
    assert store.save(good) == ["local", "shared"]
    (tmp_path / "cache" / "traces" / f"{digest}.json").unlink()
    assert store.load(digest, BS, counts)[1] == "shared"
    store.save(Trace(digest, BS, [("h" * 64, 0, 0)]))
    trace, where = store.load(digest, BS, counts)
    assert where == "local" and trace is not None and trace.runs == [("h" * 64, 0, 0)]


async def test_reads_before_the_trace_task_starts_are_recorded(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loader's first reads may reach the mount before its trace task has computed the
    manifest's digest (a busy machine: that is a thread hop); they are the start of the trace
    and must not be lost. Here the digest takes a second, the reads come at once."""
    real = core.manifest_digest

    def slow_digest(pointers: object) -> str:
        time.sleep(1.0)
        return real(pointers)  # type: ignore[arg-type]

    monkeypatch.setattr(core, "manifest_digest", slow_digest)
    data = ramp(4 * BS + 5)
    pointer = pointer_for("m.bin", data)
    providers = ProviderSet(settings)
    providers.add("http", FakeProvider({"m.bin": data}))
    traces = TraceStore(tmp_path / "traces-home")
    tree = Tree.build([pointer])
    with BlockStore(settings.cache_dir, block_size=settings.block_size) as store:
        async with (
            open_fetcher(store, providers, settings) as fetcher,
            open_model_fs(tree, fetcher, FsOptions(prefetch=False, traces=traces)) as fs,
        ):
            node = fs.tree.child(fs.tree.root, "m.bin")
            assert node is not None
            fh = await fs.open(node.ino, os.O_RDONLY)
            assert await fs.read(fh, 3 * BS, 10) == data[3 * BS : 3 * BS + 10]
            assert await fs.read(fh, 0, 10) == data[:10]
            assert fs.status()["trace"]["state"] == "waiting"  # digest still running
            fs.release(fh)
            with trio.fail_after(30):
                while "manifest" not in fs.status()["trace"]:  # noqa: ASYNC110
                    await trio.sleep(0.05)
        # Saved at the end (it grew): both reads, in their order.
        saved = json.loads(next((tmp_path / "traces-home" / "traces").iterdir()).read_text())
        assert [tuple(r[1:]) for r in saved["runs"]] == [(3, 3), (0, 0)]


# -- real mounts --------------------------------------------------------------------------------


@pytest.fixture
def _fuse() -> None:
    require_fuse()


def _read_block(path: Path, block: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        assert len(os.pread(fd, 4096, block * BS)) == 4096
    finally:
        os.close(fd)


def _data_requests(origin: object) -> list[tuple[str, int]]:
    """(file, first byte) of every ranged GET, in the order the origin received them.

    The scheduler extends a run with the queued blocks that follow it, so a trace block is
    asserted on by where a request starts, and trace orders in these tests never put a block
    right after an earlier one of the same file."""
    out = []
    for r in records(origin, port="hub"):  # type: ignore[arg-type]
        rng = r.headers.get("range") or r.headers.get("Range")
        if r.method == "GET" and rng and r.path.startswith("/files/"):
            out.append((r.path.rsplit("/", 1)[1], int(rng.split("=")[1].split("-")[0])))
    return out


@pytest.mark.fuse
@pytest.mark.usefixtures("_fuse")
def test_trace_is_recorded_published_replayed_and_ignored_when_the_manifest_changes(
    tmp_path: Path,
) -> None:
    from demo.origin import Origin

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(6 * BS))
    (src / "b.bin").write_bytes(os.urandom(6 * BS))
    manifest, shared = tmp_path / "m.json", tmp_path / "shared"
    order = [("b.bin", 4), ("a.bin", 1), ("b.bin", 0), ("a.bin", 0)]
    with Origin(src) as origin:
        write_manifest(origin, src, manifest)
        # Replica 1, cold: a loader reads four blocks in an odd order; nothing else is fetched.
        mnt = tmp_path / "mnt1"
        args = ("--no-prefetch", "--shared-cache", str(shared))
        with mounted(manifest, mnt, tmp_path / "cache1", *args):
            for name, block in order:
                _read_block(mnt / name, block)
            # >= 4: under load the kernel may read around a block into its neighbour.
            wait_for(lambda: status(mnt)["trace"].get("saved_blocks", 0) >= 4, timeout=60)
            doc = status(mnt)["trace"]
            assert doc["source"] == "none" and doc["saved_to"] == ["local", "shared"]
        digest = doc["manifest"]
        published = json.loads((shared / SHARED_DIR / f"{digest}.json").read_text())
        runs = published["runs"]
        assert [r[1] for r in runs[:4]] == [4, 1, 0, 0], runs  # first blocks, in read order
        assert (tmp_path / "cache1" / "traces" / f"{digest}.json").exists()

        # Replica 2: a new local cache, the same shared cache; prefetch on, one background
        # connection so the origin sees the fetches one after another. No reader at all. The
        # shared tier looks each blob up before fetching it, which may swap whole blobs, so
        # here each file's first request is its first trace block, not the plan's block 0.
        origin.reset_stats()
        mnt = tmp_path / "mnt2"
        one_at_a_time = ("--max-connections", "2")
        with mounted(
            manifest, mnt, tmp_path / "cache2", "--shared-cache", str(shared), *one_at_a_time
        ):
            wait_for(lambda: status(mnt)["prefetch"]["state"] == "done", timeout=60)
            doc = status(mnt)["trace"]
            assert doc["source"] == "shared" and doc["replayed_blocks"] == 4
        seen = _data_requests(origin)
        assert next(s for s in seen if s[0] == "b.bin") == ("b.bin", 4 * BS), seen
        assert next(s for s in seen if s[0] == "a.bin") == ("a.bin", 1 * BS), seen

        # Replica 1 again, its blobs gone but its local trace kept, no shared tier: the origin
        # sees the recorded order exactly, before the prefetch plan's own order.
        for sub in ("blobs", "index"):
            shutil.rmtree(tmp_path / "cache1" / sub, ignore_errors=True)
        origin.reset_stats()
        mnt = tmp_path / "mnt1"
        with mounted(manifest, mnt, tmp_path / "cache1", *one_at_a_time):
            wait_for(lambda: status(mnt)["prefetch"]["state"] == "done", timeout=60)
            assert status(mnt)["trace"]["source"] == "local"
        seen = _data_requests(origin)
        assert seen[:2] == [(name, block * BS) for name, block in order[:2]], seen
        # Each trace block is first fetched in trace order. (A run may reach the origin as
        # several requests, so the neighbours of a trace block can come between two of them.)
        firsts = [seen.index((name, block * BS)) for name, block in order]
        assert firsts == sorted(firsts), seen

        # The manifest changes (a.bin has new bytes): the trace is another model's, ignored.
        (src / "a.bin").write_bytes(os.urandom(6 * BS))
        write_manifest(origin, src, manifest)
        origin.reset_stats()
        mnt = tmp_path / "mnt3"
        with mounted(
            manifest, mnt, tmp_path / "cache3", "--shared-cache", str(shared), *one_at_a_time
        ):
            wait_for(lambda: status(mnt)["prefetch"]["state"] == "done", timeout=60)
            doc = status(mnt)["trace"]
            assert doc["source"] == "none" and "replayed_blocks" not in doc
        seen = _data_requests(origin)
        # Plain prefetch order: each file from its first byte, not from its first trace block.
        assert next(s for s in seen if s[0] == "b.bin") == ("b.bin", 0), seen
        assert next(s for s in seen if s[0] == "a.bin") == ("a.bin", 0), seen
