"""Where the CPU of ``ttfs resolve`` goes, on the raw profile (no limits: CPU is the limit).

``python -m bench.profile [--size MiB] [--runs N] [--patch MODULE]`` serves the bench model
from nginx ``/raw/`` (plain URLs, no hub, so only the data path is sampled), runs ``ttfs
resolve`` under ``py-spy record`` (native frames off, idle threads off), and prints

* the wall time, CPU seconds and CPU s per GB of the resolve (from ``wait4``),
* the top functions by self time (the leaf frame of each sample) and by inclusive time (every
  function on the sampled stack, once per sample), as shares of all CPU samples.

The sampled run is not timed; then ``--runs`` timed runs follow without py-spy, interleaved
with every ``--patch`` (``--no-spy`` skips the sampling): that is how a proposed cut is measured
without editing the core. ``--patch bench.cuts:NAME``
runs the resolve through :mod:`bench.cuts`, which applies the named monkeypatch first; the
table then compares CPU s per GB with and without it on the same origin, interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
from collections import Counter
from pathlib import Path

from demo.model import build_manifest, model_files

from .driver import prepare_model
from .hub import REPO_ID
from .nginx import Nginx
from .procs import CHILDREN, REPO, run_measured, with_repo_path
from .scaling import start_origins, stop_origins

GB = 1e9


def summarize(folded: Path, top: int) -> str:
    """Top self and inclusive functions of py-spy's raw (folded) output.

    Samples whose leaf is ``WorkerThread._work`` are trio's idle worker threads waiting for a
    job on a lock (py-spy counts that wait as active): they are left out. With ``--threads``
    the share of the main (trio) thread is shown too.
    """
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = idle = main = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames.pop(0) if frames[0].startswith("thread (") else ""
        if not frames or frames[-1].startswith("WorkerThread._work "):
            idle += n
            continue
        frames = [_func(f) for f in frames]
        total += n
        main += n if "MainThread" in thread else 0
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "no samples"
    out = [f"{total} samples ({idle} idle worker-thread samples left out)"]
    if main:
        out.append(f"main (trio) thread: {main / total:.0%} of the samples; the rest: workers")
    out += ["", "| self % | function |", "|---|---|"]
    out += [f"| {n / total:.1%} | `{f}` |" for f, n in self_c.most_common(top)]
    out += ["", "| inclusive % | function |", "|---|---|"]
    out += [f"| {n / total:.1%} | `{f}` |" for f, n in incl.most_common(top)]
    return "\n".join(out)


def _func(frame: str) -> str:
    """``fn (path/to/mod.py:123)`` -> ``fn (mod.py)``: lines of one function add up."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="model MiB [1024]")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples/s")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-spy", dest="spy", action="store_false")
    ap.add_argument(
        "--gil", action="store_true", help="sample only the thread holding the GIL (py-spy --gil)"
    )
    ap.add_argument("--patch", action="append", default=[], help="bench.cuts names to compare")
    ap.add_argument(
        "--origin",
        choices=("nginx", "python"),
        default="nginx",
        help="nginx /raw/, or demo.origin processes (sendfile) where there is no nginx",
    )
    ap.add_argument("--work", type=Path, default=REPO / ".work" / "bench")
    args = ap.parse_args(argv)
    work = args.work.resolve()
    data, _ = prepare_model(work, args.size)
    files = model_files(data / REPO_ID)
    total = sum(p.stat().st_size for p in files.values())
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if args.spy and not os.path.exists(spy):
        ap.error("py-spy not found: pip install py-spy (or use --no-spy)")
    variants = ["baseline", *args.patch]
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    env = with_repo_path(dict(os.environ, TTFS_LOG="warn"))
    with CHILDREN, contextlib.ExitStack() as stack:
        if args.origin == "nginx":
            nginx = stack.enter_context(Nginx(data, work / "nginx-profile"))
            urls = {rel: nginx.url("raw", f"{REPO_ID}/{rel}") for rel in files}
        else:
            origins = start_origins(data, 2, env)
            stack.callback(stop_origins, origins)
            urls = {
                rel: f"{origins[i % 2].base_url}/files/{REPO_ID}/{rel}"
                for i, rel in enumerate(files)
            }
        manifest = work / "manifest-raw-plain.json"
        manifest.write_text(json.dumps(build_manifest(files, urls)))

        def resolve(variant: str) -> list[str]:
            out, cache = work / "profile-out", work / "profile-cache"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
            os.sync()
            entry = ["-m", "ttfs"] if variant == "baseline" else ["-m", "bench.cuts", variant]
            return [
                sys.executable,
                *entry,
                "resolve",
                str(manifest),
                str(out),
                "--no-progress",
                "--cache-dir",
                str(cache),
                "--max-connections",
                str(args.connections),
            ]

        if args.spy:
            # Sampled runs are not timed: py-spy's own CPU would count in wait4's figure.
            for variant in variants:
                folded = work / f"profile-{variant}.txt"
                spy_cmd = [spy, "record", "-r", str(args.rate), "-f", "raw", "-o", str(folded)]
                spy_cmd += ["--gil"] if args.gil else ["--threads"]
                m = run_measured([*spy_cmd, "--", *resolve(variant)], env=env)
                m.check(f"py-spy record of resolve ({variant})")
                print(f"\n## {variant}: ttfs resolve, {total / GB:.2f} GB raw, under py-spy\n")
                print(summarize(folded, args.top), flush=True)
        for run in range(args.runs):
            for variant in variants:
                m = run_measured(resolve(variant), env=env).check(f"resolve ({variant})")
                times[variant].append((m.wall, m.cpu))
                print(
                    f"profile: {variant} run {run + 1}: {m.wall:.2f} s wall, {m.cpu:.2f} s CPU",
                    flush=True,
                )
        shutil.rmtree(work / "profile-out", ignore_errors=True)
        shutil.rmtree(work / "profile-cache", ignore_errors=True)
    print("\n| variant | runs | wall s median | GB/s | CPU s per GB median (min-max) |")
    print("|---|---|---|---|---|")
    for variant, ts in times.items():
        if not ts:
            continue
        wall = statistics.median(t[0] for t in ts)
        cpus = [t[1] / (total / GB) for t in ts]
        print(
            f"| {variant} | {len(ts)} | {wall:.2f} | {total / wall / GB:.2f} | "
            f"{statistics.median(cpus):.2f} ({min(cpus):.2f}-{max(cpus):.2f}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
