"""Eager download throughput: ttfs resolve vs curl vs hf_transfer on the same nginx origin.

Runs every contender from a cold state (outputs and ttfs cache deleted), interleaved A B C,
``--runs`` times, and prints median (min-max) wall time and GB/s per profile. Output files are
checked by size after every run and by sha256 after the first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ttfs.demo.model import build_manifest

from .nginx import Nginx

MiB = 1 << 20


def make_files(root: Path, total: int, count: int) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    each = total // count
    for i in range(count):
        p = root / f"shard-{i:02d}.bin"
        if not p.exists() or p.stat().st_size != each:
            with open(p, "wb") as f:
                for _ in range(each // (64 * MiB)):
                    f.write(os.urandom(64 * MiB))
                f.write(os.urandom(each % (64 * MiB)))
        files[p.name] = p
    return files


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(8 * MiB):
            h.update(b)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1024, help="total MiB")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profiles", default="raw,cdn")
    ap.add_argument("--work", default=".work/bench")
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    data = work / "data"
    files = make_files(data, args.size * MiB, args.files)
    total = sum(p.stat().st_size for p in files.values())
    sums = {name: sha(p) for name, p in files.items()}
    results: dict[str, dict[str, list[float]]] = {}
    with Nginx(data, work / "nginx") as nginx:
        for profile in args.profiles.split(","):
            urls = {n: nginx.url(profile, n) for n in files}
            manifest = work / f"manifest-{profile}.json"
            manifest.write_text(json.dumps(build_manifest(files, urls)))
            out = work / "out"
            cache = work / "cache"

            def clean() -> None:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(cache, ignore_errors=True)
                out.mkdir(parents=True)

            def ttfs() -> None:
                env = dict(
                    os.environ,
                    TTFS_CACHE_DIR=str(cache),
                    TTFS_MAX_CONNECTIONS=str(args.connections),
                    TTFS_LOG="warn",
                )
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "ttfs",
                        "resolve",
                        str(manifest),
                        str(out),
                        "--no-progress",
                    ],
                    env=env,
                    check=True,
                    capture_output=True,
                )

            def curl() -> None:
                cmd = ["curl", "-sS", "--fail", "--parallel", "--parallel-max", "16"]
                for n, u in urls.items():
                    cmd += ["-o", str(out / n), u]
                subprocess.run(cmd, check=True)

            def hf_transfer() -> None:
                code = (
                    "import hf_transfer,sys,json; a=json.loads(sys.argv[1])\n"
                    "for u,f in a: hf_transfer.download(url=u, filename=f, max_files=16, "
                    "chunk_size=10<<20)"
                )
                pairs = [[u, str(out / n)] for n, u in urls.items()]
                subprocess.run([sys.executable, "-c", code, json.dumps(pairs)], check=True)

            contenders: dict[str, Callable[[], None]] = {
                "ttfs resolve": ttfs,
                "curl --parallel (1 conn/file)": curl,
                "hf_transfer (16 conn/file)": hf_transfer,
            }
            times: dict[str, list[float]] = {k: [] for k in contenders}
            for run in range(args.runs):
                for name, fn in contenders.items():
                    clean()
                    t0 = time.monotonic()
                    fn()
                    times[name].append(time.monotonic() - t0)
                    for n, p in files.items():
                        got = out / n
                        assert got.stat().st_size == p.stat().st_size, (name, n)
                        if run == 0:
                            assert sha(got) == sums[n], (name, n)
            results[profile] = times
    print(
        f"\n## Eager download, {total / MiB:.0f} MiB in {len(files)} files, "
        f"{os.cpu_count()} cores, kernel {os.uname().release}, {args.runs} runs\n"
    )
    for profile, times in results.items():
        label = "raw loopback" if profile == "raw" else "cdn: 25 MB/s per connection, +20 ms"
        print(f"### {label}\n")
        print("| tool | median s | min-max s | GB/s (median) | ratio to ttfs |")
        print("|---|---|---|---|---|")
        base = statistics.median(times["ttfs resolve"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(
                f"| {name} | {med:.2f} | {min(ts):.2f}-{max(ts):.2f} | "
                f"{total / med / 1e9:.2f} | {med / base:.2f}x |"
            )
        print()


if __name__ == "__main__":
    main()
