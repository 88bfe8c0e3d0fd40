"""How fast Python model code runs while ``LazyDataResolverV2`` resolves: in-process vs child.

``python -m bench.gil [--size-mib 256] [--repeats 5] [--files 2]``: the origin runs in its own
process (``python -m demo.origin``), so the only Python in this process besides the "model" is
the resolve's (in-process mode) or nothing but a pipe read (child mode). Each repeat measures,
for each mode in turn, a counting loop's iterations/s in the main thread for ``--idle`` seconds
idle, then while a fresh resolve into a new directory runs; the ratio to that idle baseline is
what the model keeps. Prints one JSON line per measurement and the medians. CPU seconds: this
process's own (loop + in-process resolve), the part of it outside the loop's thread (what
competes with the model for the GIL; unlike the ratio, not skewed by other load on the machine)
and its waited-for children's (child resolve and workers), per resolve.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from demo.model import build_manifest

from .procs import with_repo_path
from .scaling import start_origins, stop_origins

CHUNK = 1 << 20


def count_for(seconds: float, stop: threading.Event | None = None) -> tuple[int, float, float]:
    """Iterations of a pure-Python loop for ``seconds`` (or until ``stop``); (n, elapsed, the
    loop thread's own CPU seconds)."""
    n = 0
    x = 0
    c0 = time.thread_time()
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        for i in range(1000):
            x = (x + i * i) % 1_000_003
        n += 1000
        now = time.perf_counter()
        if now >= end or (stop is not None and stop.is_set()):
            return n, now - t0, time.thread_time() - c0


def cpu() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def one(mode: str, work: Path, idle: float, run: int) -> dict[str, Any]:
    import truss_transfer

    os.environ["TTFS_RESOLVE_CHILD"] = mode
    out = work / f"out-{mode}-{run}"
    base_n, base_t, _ = count_for(idle)
    done = threading.Event()
    me0, kids0 = cpu()
    t0 = time.perf_counter()
    resolver = truss_transfer.LazyDataResolverV2(out)
    threading.Thread(target=lambda: (resolver.block_until_download_complete(), done.set())).start()
    n, t, loop_cpu = count_for(3600, done)
    done.wait()
    wall = time.perf_counter() - t0
    me1, kids1 = cpu()
    shutil.rmtree(out)
    return {
        "mode": mode,
        "run": run,
        "ratio": round((n / t) / (base_n / base_t), 3),
        "resolve_wall_s": round(wall, 2),
        "self_cpu_s": round(me1 - me0, 2),
        # The caller's CPU outside the model's thread: the resolve's Python that competes for
        # the GIL (in-process) or the wait and log relay (child). Independent of machine load.
        "caller_other_cpu_s": round(me1 - me0 - loop_cpu, 3),
        "children_cpu_s": round(kids1 - kids0, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--idle", type=float, default=2.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-gil-"))
    root = work / "origin"
    root.mkdir()
    files: dict[str, Path] = {}
    rng = random.Random(1)
    per_file = args.size_mib * CHUNK // args.files
    for i in range(args.files):
        path = root / f"model-{i}.safetensors"
        with path.open("wb") as f:
            for _ in range(per_file // CHUNK):
                f.write(rng.randbytes(CHUNK))
        files[path.name] = path
    origins = start_origins(root, 1, with_repo_path(os.environ))
    try:
        base = origins[0].base_url
        urls = {name: f"{base}/files/{name}" for name in files}
        manifest = work / "manifest.json"
        manifest.write_text(json.dumps(build_manifest(files, urls)))
        os.environ["TTFS_MANIFEST_PATHS"] = str(manifest)
        os.environ["TTFS_STATS_FILE"] = str(work / "stats.json")
        os.environ.setdefault("TTFS_LOG", "warn")
        rows = []
        for run in range(args.repeats):
            for mode in ("off", "auto"):
                row = one(mode, work, args.idle, run)
                print(json.dumps(row), flush=True)
                rows.append(row)
        for mode in ("off", "auto"):
            mine = [r for r in rows if r["mode"] == mode]
            summary = {
                key: statistics.median(r[key] for r in mine)
                for key in (
                    "ratio",
                    "resolve_wall_s",
                    "self_cpu_s",
                    "caller_other_cpu_s",
                    "children_cpu_s",
                )
            }
            print(json.dumps({"median": mode, **summary}), flush=True)
    finally:
        stop_origins(origins)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
