"""``python -m bench --only fastpath``: a materialized mount against the blob files themselves.

The question (issue #10): after ``ttfs materialize``, does a loader that reads through the mount
go as fast as one that reads the local files? For each shard size (512 MiB and 1 GiB, two shards
each), the model is fetched once from a loopback origin into a cache and materialized; then,
interleaved ``--runs`` times, every row reads the whole model with the page cache warm on the
blob files (the state after a materialize, or a remount on a warm cache):

* ``direct``: the blob files under ``<cache>/blobs`` (the ceiling);
* ``fast``: a fresh ``ttfs mount`` on that cache (the default: the fast path answers every file
  as a symlink into the blob store), first read after the mount;
* ``daemon``: the same with ``--no-fast-path`` (every read through the daemon's read handler).

Each is measured twice: 1 MiB ``readinto`` calls (``read``), and ``safetensors.numpy.load_file``
of every shard (``load``). Figures: wall GB/s (median, min-max), the ratio to ``direct`` (target
>= 0.8), CPU seconds per GB of the reader plus the daemon (robust to a loaded machine), how many
reads reached the daemon's handler, and the page-cache footprint after the read (``fincore`` on
the blob files plus the mount's own regular files, as a multiple of the model size; target ~1x).

Wall figures on a shared machine are noisy; the CPU figures are not. The page cache is never
dropped here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from demo.origin import Origin

from .mounts import Reader, TtfsMount
from .procs import CHILDREN, REPO, BenchError, proc_usage, rmtree, with_repo_path

MiB = 1 << 20
TENSOR = 16 * MiB
ROWS = ("direct", "fast", "daemon")
KINDS = ("read", "load")


def make_model(root: Path, shard_mib: int, shards: int = 2) -> list[str]:
    """Safetensors shards of float16 16 MiB tensors (reused when present)."""
    from safetensors.numpy import save_file

    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == str(shard_mib):
        return names
    rmtree(root)
    root.mkdir(parents=True)
    rng = np.random.default_rng(shard_mib)
    base = rng.standard_normal(TENSOR // 2, dtype=np.float32).astype(np.float16)
    per = shard_mib * MiB // TENSOR
    for s, name in enumerate(names):
        tensors = {f"layer{s:02d}.{i:03d}": base + np.float16(i) for i in range(per)}
        save_file(tensors, str(root / name))
        del tensors
    (root / "config.json").write_text(json.dumps({"model_type": "bench"}))
    marker.write_text(str(shard_mib))
    return names


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(origin: Origin, root: Path, names: list[str], out: Path) -> dict[str, str]:
    pointers, hashes = [], {}
    for name in [*names, "config.json"]:
        digest = sha256(root / name)
        hashes[name] = digest
        pointers.append(
            {
                "resolution": {
                    "resolution_type": "http",
                    "url": origin.url(name),
                    "expiration_timestamp": 4044816725,
                },
                "uid": name,
                "file_name": name,
                "hashtype": "sha256",
                "hash": digest,
                "size": (root / name).stat().st_size,
            }
        )
    out.write_text(json.dumps({"pointers": pointers}))
    return hashes


def resident(paths: list[Path]) -> int:
    """Bytes of ``paths`` in the page cache (fincore; a link is followed)."""
    if not paths:
        return 0
    done = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"fincore failed: {done.stderr.strip()}")
    return sum(int(x) for x in done.stdout.split())


def daemon_reads(mnt: Path) -> int:
    from ttfs.control import walk_status

    return sum(int(d["reads"]) for d in walk_status(mnt))


def measure(
    row: str,
    kind: str,
    *,
    reader: Reader,
    manifest: Path,
    cache: Path,
    mnt: Path,
    names: list[str],
    blobs: list[Path],
    env: dict[str, str],
) -> dict[str, float]:
    op: dict[str, Any] = {"op": "read", "buf": MiB} if kind == "read" else {"op": "load_file"}
    reader.call("read", paths=[str(b) for b in blobs])  # the blob files warm, every row
    if row == "direct":
        r = reader.call(paths=[str(b) for b in blobs], **op)
        footprint = resident(blobs)
        return {"seconds": r["seconds"], "cpu": r["cpu"], "reads": 0.0, "footprint": footprint}
    args = ["--no-prefetch"] + (["--no-fast-path"] if row == "daemon" else [])
    with TtfsMount(manifest, mnt, cache, *args, env=env) as mount:
        mount.start()
        assert mount.pid is not None
        before = proc_usage(mount.pid)
        paths = [mnt / n for n in names]
        r = reader.call(paths=[str(p) for p in paths], **op)
        after = proc_usage(mount.pid)
        daemon_cpu = after.cpu - before.cpu if before and after else 0.0
        links = sum(p.is_symlink() for p in paths)
        if row == "fast" and links != len(paths):
            raise BenchError(f"fast path: only {links} of {len(paths)} shards are links")
        own = [p for p in paths if not p.is_symlink()]
        footprint = resident(blobs) + resident(own)
        reads = daemon_reads(mnt)
    return {
        "seconds": r["seconds"],
        "cpu": r["cpu"] + daemon_cpu,
        "reads": float(reads),
        "footprint": float(footprint),
    }


def run(work: Path, *, shard_sizes: list[int], runs: int, reader: Reader | None = None) -> str:
    """Measure every shard size; returns the markdown report."""
    own_reader = reader is None
    reader = reader or Reader()
    env = with_repo_path({k: v for k, v in os.environ.items() if not k.startswith("TTFS_")})
    env["TTFS_LOG"] = "warn"
    lines = [
        "## Fast path: a materialized mount vs the blob files (warm page cache)",
        "",
        "`direct`: the blob files; `fast`: a fresh mount (symlinks into the blob store); "
        "`daemon`: `--no-fast-path`. First read after the mount; wall GB/s median (min-max) of "
        f"{runs} interleaved run(s); CPU s/GB = reader + daemon; footprint = page cache of the "
        "blob files + the mount's own files after the read, / model size.",
        "",
        "| shards | kind | row | GB/s | vs direct | CPU s/GB | daemon reads | footprint |",
        "|---|---|---|---|---|---|---|---|",
    ]
    try:
        for shard_mib in shard_sizes:
            root = work / f"model-{shard_mib}"
            print(f"bench fastpath: {shard_mib} MiB shards: model ...", flush=True)
            names = make_model(root, shard_mib)
            cache = work / f"cache-{shard_mib}"
            mnt = work / f"mnt-{shard_mib}"
            rmtree(cache)
            with Origin(root) as origin:
                manifest = work / f"manifest-{shard_mib}.json"
                hashes = write_manifest(origin, root, names, manifest)
                with TtfsMount(manifest, mnt, cache, env=env) as mount:
                    mount.start()
                    mount.materialize()
            blobs = [cache / "blobs" / hashes[n][:2] / hashes[n] for n in names]
            total = sum(b.stat().st_size for b in blobs)
            samples: dict[tuple[str, str], list[dict[str, float]]] = {}
            for i in range(runs):
                for kind in KINDS:
                    for row in ROWS:
                        label = f"{shard_mib} MiB {kind} {row} {i + 1}/{runs}"
                        print(f"bench fastpath: {label}", end="")
                        s = measure(
                            row,
                            kind,
                            reader=reader,
                            manifest=manifest,
                            cache=cache,
                            mnt=mnt,
                            names=names,
                            blobs=blobs,
                            env=env,
                        )
                        print(f" {total / s['seconds'] / 1e9:.2f} GB/s", flush=True)
                        samples.setdefault((kind, row), []).append(s)
            for kind in KINDS:
                ref = statistics.median(total / s["seconds"] for s in samples[(kind, "direct")])
                for row in ROWS:
                    got = samples[(kind, row)]
                    rates = [total / s["seconds"] / 1e9 for s in got]
                    med = statistics.median(rates)
                    cpu = statistics.median(s["cpu"] for s in got) / (total / 1e9)
                    reads = int(max(s["reads"] for s in got))
                    foot = statistics.median(s["footprint"] for s in got) / total
                    lines.append(
                        f"| 2 x {shard_mib} MiB | {kind} | {row} | {med:.2f} "
                        f"({min(rates):.2f}-{max(rates):.2f}) | {med * 1e9 / ref:.2f}x | "
                        f"{cpu:.2f} | {reads} | {foot:.2f}x |"
                    )
            rmtree(cache)
    finally:
        if own_reader:
            reader.close()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.fastpath", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--shards", default="512,1024", help="shard sizes in MiB [512,1024]")
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs [3]")
    ap.add_argument("--work", type=Path, default=REPO / ".work" / "bench-fastpath")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with CHILDREN:
        text = run(
            args.work.resolve(),
            shard_sizes=[int(x) for x in args.shards.split(",") if x],
            runs=args.runs,
        )
    print()
    print(text)
    print(f"bench fastpath: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
