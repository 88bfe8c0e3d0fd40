"""Many-core scaling of ``ttfs resolve``: does throughput grow with processes and connections?

On the 2-core VM a Python client is CPU-bound at ~0.5 GB/s; the design answer is to spread a
download over several processes on many-core hosts. This script measures that on a bigger
machine (the 16-core GPU box: Ubuntu 24.04, Python 3.12, no network, no nginx, no libfuse).

It generates ~4 GiB of files (``--size-gib``, ``--files``; once, reused), serves them from
``--origins`` local :class:`demo.origin.Origin` processes (sendfile, no limits; files
spread round-robin over them), then runs ``ttfs resolve`` at every combination of

* 1, 4 and 16 resolve processes at once (``--procs``), each resolving a disjoint subset of
  the files into the same output directory, each with its own cache dir (``--shared-cache``:
  one cache dir for all), and
* 1x, 4x and 16x the default ``--max-connections`` per process (``--scales``, base 32),

from a cold state each time (outputs and caches deleted, dirty pages synced), and prints one
table: wall time, GB/s, CPU seconds of the resolve processes (total and per GB), their largest
peak RSS, and the CPU seconds the origins spent (to show whether the origin was the limit).

Needs only the ttfs source tree (run from the repo root: ``python bench/scaling.py``) and the
wheels of ttfs's runtime dependencies (trio, httpx and theirs, diskcache, xxhash, click,
PyYAML). No pyfuse3, no numpy, no nginx. Takes ~2-4 minutes on 16 cores. Prints everything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.procs import (  # noqa: E402
    CHILDREN,
    BenchError,
    machine_info,
    proc_usage,
    stop_pid,
    with_repo_path,
)

MiB = 1 << 20
GB = 1e9
CHUNK = 4 * MiB


# -- data -----------------------------------------------------------------------------------
def _write_file(job: tuple[str, int, int]) -> tuple[str, int, str]:
    """Write one file of distinct chunks (a random base, each chunk stamped) and hash it."""
    path, index, size = job
    base = bytearray(os.urandom(CHUNK))
    h = hashlib.sha256()
    with open(path, "wb") as f:
        done = 0
        chunk = 0
        while done < size:
            base[:16] = index.to_bytes(8, "little") + chunk.to_bytes(8, "little")
            piece = memoryview(base)[: min(CHUNK, size - done)]
            f.write(piece)
            h.update(piece)
            done += len(piece)
            chunk += 1
    return os.path.basename(path), size, h.hexdigest()


def make_data(data: Path, total: int, count: int) -> list[tuple[str, int, str]]:
    """``count`` files totalling ``total`` bytes under ``data`` (reused when already there)."""
    data.mkdir(parents=True, exist_ok=True)
    info = data / "files.json"
    want = {"total": total, "count": count}
    if info.exists():
        doc = json.loads(info.read_text())
        if doc.get("want") == want and all(
            (data / n).is_file() and (data / n).stat().st_size == s for n, s, _ in doc["files"]
        ):
            return [(str(n), int(s), str(h)) for n, s, h in doc["files"]]
    each = total // count
    jobs = [(str(data / f"part-{i:03d}.bin"), i, each) for i in range(count)]
    t0 = time.monotonic()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(min(count, os.cpu_count() or 1)) as pool:
        files = pool.map(_write_file, jobs)
    info.write_text(json.dumps({"want": want, "files": files}))
    print(f"scaling: wrote {total / GB:.1f} GB in {time.monotonic() - t0:.1f} s", flush=True)
    return files


# -- origins --------------------------------------------------------------------------------
@dataclass
class OriginProc:
    proc: subprocess.Popen[str]
    base_url: str


def start_origins(data: Path, n: int, env: dict[str, str]) -> list[OriginProc]:
    origins = []
    for _ in range(n):
        proc = subprocess.Popen(
            [sys.executable, "-m", "demo.origin", str(data), "--log-level", "ERROR"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        CHILDREN.add(proc.pid)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise BenchError("an origin process did not start")
        origins.append(OriginProc(proc, json.loads(line)["base_url"]))
    return origins


def stop_origins(origins: list[OriginProc]) -> None:
    for o in origins:
        stop_pid(o.proc.pid)
        CHILDREN.discard(o.proc.pid)


# -- runs -----------------------------------------------------------------------------------
@dataclass
class Result:
    procs: int
    conns: int
    wall: float
    cpu: float
    rss: int
    origin_cpu: float


def run_many(
    cmds: list[list[str]], env: dict[str, str], timeout: float
) -> tuple[float, float, int]:
    """Start every command at once; (wall until the last exits, CPU s of all, max peak RSS)."""
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        for cmd in cmds
    ]
    for p in procs:
        CHILDREN.add(p.pid)
    cpu = 0.0
    rss = 0
    pending = {p.pid: p for p in procs}
    failures = []
    try:
        while pending:
            for pid, p in list(pending.items()):
                usage = proc_usage(pid)
                if usage is not None:
                    rss = max(rss, usage.hwm)
                got, status, ru = os.wait4(pid, os.WNOHANG)
                if got:
                    cpu += ru.ru_utime + ru.ru_stime
                    p.returncode = os.waitstatus_to_exitcode(status)
                    if p.returncode != 0:
                        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
                        failures.append(f"rc {p.returncode}: {err[-1500:]}")
                    del pending[pid]
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"resolve ran past {timeout:.0f} s")
            time.sleep(0.005)
        wall = time.monotonic() - t0
    finally:
        for p in procs:
            if p.returncode is None:
                stop_pid(p.pid)
            CHILDREN.discard(p.pid)
            if p.stderr is not None:
                p.stderr.close()
    if failures:
        raise BenchError("ttfs resolve failed: " + failures[0])
    return wall, cpu, rss


def origin_cpu(origins: list[OriginProc]) -> float:
    return sum(u.cpu for o in origins if (u := proc_usage(o.proc.pid)) is not None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--files", type=int, default=32)
    ap.add_argument("--origins", type=int, default=4, help="origin processes [4]")
    ap.add_argument("--procs", default="1,4,16", help="parallel resolve processes [1,4,16]")
    ap.add_argument("--scales", default="1,4,16", help="x --max-connections per process")
    ap.add_argument("--base-connections", type=int, default=32)
    ap.add_argument("--runs", type=int, default=1, help="repeats of the grid (median)")
    ap.add_argument("--shared-cache", action="store_true", help="one cache dir for all")
    ap.add_argument("--work", type=Path, default=REPO / ".work" / "scaling")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per resolve run")
    args = ap.parse_args(argv)
    procs_list = [int(x) for x in args.procs.split(",") if x]
    scales = [int(x) for x in args.scales.split(",") if x]
    if max(procs_list) > args.files:
        ap.error("--files must be at least the largest --procs")

    t_start = time.monotonic()
    print("# ttfs resolve scaling\n")
    print("| machine | |\n|---|---|")
    for key, value in machine_info(tools=False):
        print(f"| {key} | {value} |")
    print(flush=True)

    work = args.work.resolve()
    data = work / "data"
    files = make_data(data, int(args.size_gib * (1 << 30)), args.files)
    total = sum(s for _, s, _ in files)
    env = with_repo_path(dict(os.environ, TTFS_LOG="warn"))
    results: dict[tuple[int, int], list[Result]] = {}
    with CHILDREN:
        origins = start_origins(data, args.origins, env)
        try:
            urls = {
                name: f"{origins[i % len(origins)].base_url}/files/{name}"
                for i, (name, _, _) in enumerate(files)
            }
            for run in range(args.runs):
                for p in procs_list:
                    manifests = []
                    for k in range(p):
                        pointers = [
                            {
                                "resolution": {
                                    "resolution_type": "http",
                                    "url": urls[name],
                                    "expiration_timestamp": 4044816725,
                                },
                                "uid": name,
                                "file_name": name,
                                "hashtype": "sha256",
                                "hash": digest,
                                "size": size,
                            }
                            for i, (name, size, digest) in enumerate(files)
                            if i % p == k
                        ]
                        m = work / f"manifest-{p}-{k}.json"
                        m.write_text(json.dumps({"pointers": pointers, "models": None}))
                        manifests.append(m)
                    for scale in scales:
                        conns = args.base_connections * scale
                        out = work / "out"
                        caches = work / "caches"
                        shutil.rmtree(out, ignore_errors=True)
                        shutil.rmtree(caches, ignore_errors=True)
                        out.mkdir(parents=True)
                        os.sync()
                        cmds = [
                            [
                                sys.executable,
                                "-m",
                                "ttfs",
                                "resolve",
                                str(m),
                                str(out),
                                "--no-progress",
                                "--log-level",
                                "warn",
                                "--max-connections",
                                str(conns),
                                "--cache-dir",
                                str(caches / ("all" if args.shared_cache else str(k))),
                            ]
                            for k, m in enumerate(manifests)
                        ]
                        print(
                            f"scaling: run {run + 1}: {p} process(es) x {conns} connections ...",
                            end="",
                            flush=True,
                        )
                        before = origin_cpu(origins)
                        wall, cpu, rss = run_many(cmds, env, args.timeout)
                        o_cpu = origin_cpu(origins) - before
                        for name, size, _ in files:
                            got = out / name
                            if not got.is_file() or got.stat().st_size != size:
                                raise BenchError(f"{name} missing or of the wrong size")
                        print(f" {wall:.2f} s, {total / wall / GB:.2f} GB/s", flush=True)
                        results.setdefault((p, conns), []).append(
                            Result(p, conns, wall, cpu, rss, o_cpu)
                        )
        finally:
            stop_origins(origins)
            shutil.rmtree(work / "out", ignore_errors=True)
            shutil.rmtree(work / "caches", ignore_errors=True)

    print(
        f"\n{total / GB:.2f} GB in {len(files)} files from {args.origins} origin process(es) "
        f"(demo.origin, sendfile), {args.runs} run(s), medians; "
        f"{'one shared cache dir' if args.shared_cache else 'one cache dir per process'}.\n"
    )
    print(
        "| resolve processes | --max-connections each | total | wall s | GB/s "
        "| client CPU s | CPU s per GB | cores busy | peak RSS per process MiB | origin CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (p, conns), rs in results.items():
        wall = statistics.median(r.wall for r in rs)
        cpu = statistics.median(r.cpu for r in rs)
        rss = max(r.rss for r in rs)
        o_cpu = statistics.median(r.origin_cpu for r in rs)
        print(
            f"| {p} | {conns} | {p * conns} | {wall:.2f} | {total / wall / GB:.2f} | {cpu:.1f} "
            f"| {cpu / (total / GB):.2f} | {cpu / wall:.1f} | {rss / MiB:.0f} | {o_cpu:.1f} |"
        )
    print(f"\nscaling: done in {(time.monotonic() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
