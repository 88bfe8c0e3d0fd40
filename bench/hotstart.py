"""What a b10fs hot start costs: ttfs's verified copy against upstream's symlink + first read.

``python -m bench.hotstart [--shards 4] [--shard-mib 256] [--repeats 3] [--tree DIR ...]
[--dir DIR]``:
an origin process serves the shards; one ``ttfs resolve`` fills a local b10fs directory; then,
for each ``--tree`` (a ttfs checkout, e.g. an older commit unpacked with ``git archive``) in
turn (alternating), ``--repeats`` times: a hot resolve into a fresh download dir with an empty
block store (a new replica), then another with the same store after its data files were deleted
(an eviction: the trust records stay), then a new replica under ``TTFS_SHARED_TRUST=store`` and
one under ``TTFS_SHARED_HOTSTART=symlink``, each in a fresh interpreter of that tree measuring the
resolve call alone: its CPU-seconds (the process and its waited-for children) and wall seconds,
and then with one full read of the output added (what the model's first load pays on top). The
upstream figure is a symlink per shard plus one full read through it, in a fresh interpreter
too: the same read measured in the bench's own process took a fifth of the time. The
shards are page-cache hot; on a reflinking filesystem (``--dir`` on XFS or btrfs) ttfs's output
shares the entries' blocks but not their cached pages, so its first read may go to the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from demo.model import build_manifest

from .procs import with_repo_path
from .scaling import start_origins, stop_origins

CHUNK = 1 << 20
HERE = Path(__file__).resolve().parent.parent


# Run in a fresh interpreter of the tree under test: the resolve alone is measured (imports,
# start-up and the worker pool are not part of a hot start; TTFS_WORKERS=0, none is started).
_ONE = """
import json, resource, sys, time, trio
from pathlib import Path
from ttfs.telemetry.logs import setup_logging
setup_logging("info")
from ttfs.config import Settings
from ttfs.manifest import load_manifest
from ttfs.resolve import resolve
def cpu():
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
pointers = load_manifest(sys.argv[1]).pointers
settings = Settings.from_env()
c0, t0 = cpu(), time.perf_counter()
report = trio.run(lambda: resolve(pointers, sys.argv[2], settings, progress=False))
c1, t1 = cpu(), time.perf_counter()
buf = bytearray(8 << 20)
for path in sorted(Path(sys.argv[2]).rglob("*")):
    if path.is_file():
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
print(json.dumps({"cpu": c1 - c0, "wall": t1 - t0, "read_cpu": cpu() - c1,
                  "read_wall": time.perf_counter() - t1, "hot": report.b10fs_hot_starts_files}))
"""


def resolve(
    tree: Path, manifest: Path, out: Path, env: dict[str, str], store: Path | None = None
) -> dict[str, float]:
    """CPU-s, wall-s, hot files and files verified by the trust rule of one resolve, in a
    process of ``tree``'s ttfs (block store ``store``, else beside ``out``)."""
    extra = {"TTFS_CACHE_DIR": str(store)} if store is not None else {}
    done = subprocess.run(
        [sys.executable, "-c", _ONE, str(manifest), str(out)],
        env={**env, **extra, "PYTHONPATH": str(tree), "TTFS_WORKERS": "0"},
        cwd=tree,
        check=True,
        capture_output=True,
        text=True,
    )
    row = dict(json.loads(done.stdout.strip().splitlines()[-1]))
    row["trusted"] = done.stderr.count("recorded for its unchanged b10cache entry")
    return row


def evict(store: Path) -> None:
    """Delete a block store's data files (its index, and the trust records in it, stay)."""
    for path in (store / "blobs").rglob("*"):
        if path.is_file():
            path.unlink()


# Upstream's hot start, in a fresh interpreter like the ttfs rows: a symlink per entry, then
# one full read through it (argv: the output directory, then the entries).
_UPSTREAM = """
import os, resource, sys, time
from pathlib import Path
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
out = Path(sys.argv[1])
out.mkdir()
buf = bytearray(8 << 20)
c0, t0 = cpu(), time.perf_counter()
for entry in sys.argv[2:]:
    link = out / Path(entry).name
    os.symlink(entry, link)
    with open(link, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
print(cpu() - c0, time.perf_counter() - t0)
"""


def symlink_and_read(entries: list[Path], out: Path) -> tuple[float, float]:
    done = subprocess.run(
        [sys.executable, "-c", _UPSTREAM, str(out), *map(str, entries)],
        check=True,
        capture_output=True,
        text=True,
    )
    cpu_s, wall_s = done.stdout.split()
    return float(cpu_s), float(wall_s)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tree", action="append", type=Path, default=[])
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the shared directory, block stores and outputs go (e.g. an XFS or btrfs "
        "mount, where the kernel copy is a reflink); default: the temporary directory",
    )
    args = parser.parse_args()
    trees = args.tree or [HERE]
    work = Path(tempfile.mkdtemp(prefix="bench-hot-", dir=args.dir))
    root = work / "origin"
    root.mkdir()
    files: dict[str, Path] = {}
    rng = random.Random(2)
    for i in range(args.shards):
        path = root / f"model-{i + 1:05d}-of-{args.shards:05d}.safetensors"
        with path.open("wb") as f:
            for _ in range(args.shard_mib):
                f.write(rng.randbytes(CHUNK))
        files[path.name] = path
    origins = start_origins(root, 1, with_repo_path(os.environ))
    try:
        base = origins[0].base_url
        manifest = work / "manifest.json"
        manifest.write_text(
            json.dumps(build_manifest(files, {n: f"{base}/files/{n}" for n in files}))
        )
        empty = work / "empty.json"
        empty.write_text(json.dumps({"pointers": []}))
        shared = work / "b10fs"
        env = {
            **os.environ,
            "BASETEN_FS_ENABLED": "1",
            "USE_BASETEN_FS_TRUSS_TRANSFER": "1",
            "TRUSS_TRANSFER_CACHE_DIR": str(shared),
            "TRUSS_TRANSFER_B10FS_MIN_REQUIRED_AVAILABLE_SPACE_GB": "0",
            "TRUSS_TRANSFER_B10FS_DOWNLOAD_SPEED_MBPS": "1",
            "TTFS_STATS_FILE": str(work / "stats.json"),
            "TTFS_LOG": "warn",
        }
        resolve(trees[0], manifest, work / "fill", env)  # the first replica: cold, publishes
        shutil.rmtree(work / "fill")
        entries = sorted(p for p in shared.iterdir() if "." not in p.name)
        assert len(entries) == args.shards, entries
        results: dict[str, dict[str, float]] = {}
        rows: dict[str, list[dict[str, float]]] = {}
        for run in range(args.repeats):
            for i, tree in enumerate(trees):  # alternating, so load drifts hit both alike
                # A new replica (empty store), then the same replica again after its local
                # copies were evicted (its records kept); then a new replica that trusts only
                # its own records (as every new replica did before the replicas' records); then
                # a new replica that links instead of copying.
                kinds = (
                    ("new replica", "", {}),
                    ("same replica, evicted", "", {}),
                    (
                        "new replica, TTFS_SHARED_TRUST=store",
                        "-strict",
                        {"TTFS_SHARED_TRUST": "store"},
                    ),
                    # Upstream's output (a symlink per file) once the records vouch for them.
                    (
                        "new replica, TTFS_SHARED_HOTSTART=symlink",
                        "-link",
                        {"TTFS_SHARED_HOTSTART": "symlink"},
                    ),
                )
                for kind, suffix, extra in kinds:
                    store = work / f"store-{i}-{run}{suffix}"
                    out = work / f"hot-{run}"
                    row = resolve(tree, manifest, out, {**env, **extra}, store)
                    assert row["hot"] == args.shards, row
                    shutil.rmtree(out)
                    evict(store)
                    rows.setdefault(f"{tree}: {kind}", []).append(row)
                    print(
                        json.dumps({"tree": str(tree), "kind": kind, "run": run, **row}), flush=True
                    )
                for store in work.glob(f"store-{i}-{run}*"):
                    shutil.rmtree(store)
        for tree, mine in rows.items():
            results[tree] = {
                "cpu_s": round(statistics.median(r["cpu"] for r in mine), 2),
                "wall_s": round(statistics.median(r["wall"] for r in mine), 2),
                "with_first_read_cpu_s": round(
                    statistics.median(r["cpu"] + r["read_cpu"] for r in mine), 2
                ),
                "with_first_read_wall_s": round(
                    statistics.median(r["wall"] + r["read_wall"] for r in mine), 2
                ),
            }
        links = []
        for run in range(args.repeats):
            out = work / f"link-{run}"
            links.append(symlink_and_read(entries, out))
            shutil.rmtree(out)
        results["symlink + one read"] = {
            "cpu_s": round(statistics.median(r[0] for r in links), 2),
            "wall_s": round(statistics.median(r[1] for r in links), 2),
        }
        print(json.dumps({"medians": results}), flush=True)
    finally:
        stop_origins(origins)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
