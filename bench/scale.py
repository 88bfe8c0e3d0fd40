"""Scale check: a mount of a manifest with many files under a low open-file limit.

    .venv/bin/python -m bench.scale                      # 20,000 files + two 256 MiB shards
    .venv/bin/python -m bench.scale --files 100000 --shard-mib 0 --no-read --no-materialize
    .venv/bin/python -m bench.scale --files 2000 --shard-mib 8   # a quick look (~1 min)

It writes ``--files`` small files (40 directories, 8 B to ~1 KiB each) plus ``--shards``
shards of ``--shard-mib`` MiB under ``--work``, serves them with the suite's counting origin
(in this process, on 127.0.0.1), builds a bptr manifest, then runs ``ttfs mount`` under
``ulimit -n --nofile`` (soft and hard, as a systemd unit with LimitNOFILE=1024 would) and
measures, each as a separate process:

* mount: ``ttfs mount`` until it returns (the tree is visible);
* find: ``find MNT -type f | wc -l`` (every file listed, checked against the manifest);
* materialize: ``ttfs materialize MNT`` (everything local and verified);
* read: a child reads every file and compares its sha256 with the manifest's;
* status: ``ttfs status --json MNT``;

then the daemon's peak RSS (VmHWM), its descriptors, its CPU seconds and its workers'
(utime + stime from /proc, robust to other load on the machine), and whether it is still alive.
Wall-clock times are reported as measured; on a shared machine quote the CPU figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from demo.origin import Origin
from ttfs.procs import process_alive

from .procs import proc_usage, tree_usage

REPO = Path(__file__).resolve().parent.parent
FAR_FUTURE = 4044816725


def write_files(src: Path, n: int, shards: int, shard_mib: int) -> dict[str, tuple[int, str]]:
    """The model's files; returns ``name -> (size, sha256)``, cached beside them."""
    meta = src / ".meta.json"
    key = f"{n}-{shards}-{shard_mib}"
    if meta.exists():
        doc = json.loads(meta.read_text())
        if doc.get("key") == key:
            return {k: (v[0], v[1]) for k, v in doc["files"].items()}
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    files: dict[str, tuple[int, str]] = {}
    for i in range(n):
        rel = f"d{i % 40:02d}/f{i:06d}.txt"
        data = (f"{i}\n" * (1 + i % 257)).encode()
        (src / rel).parent.mkdir(exist_ok=True)
        (src / rel).write_bytes(data)
        files[rel] = (len(data), hashlib.sha256(data).hexdigest())
    rng = random.Random(0)
    for s in range(shards):
        rel = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        h = hashlib.sha256()
        with open(src / rel, "wb") as f:
            for _ in range(shard_mib):
                chunk = rng.randbytes(1 << 20)
                f.write(chunk)
                h.update(chunk)
        files[rel] = (shard_mib << 20, h.hexdigest())
    meta.write_text(json.dumps({"key": key, "files": files}))
    return files


def write_manifest(origin: Origin, files: dict[str, tuple[int, str]], path: Path) -> None:
    pointers = [
        {
            "resolution": {
                "resolution_type": "http",
                "url": origin.url(name),
                "expiration_timestamp": FAR_FUTURE,
            },
            "uid": name,
            "file_name": name,
            "hashtype": "sha256",
            "hash": digest,
            "size": size,
        }
        for name, (size, digest) in files.items()
    ]
    path.write_text(json.dumps({"pointers": pointers, "models": None}))


def timed(cmd: list[str], timeout: float, nofile: int | None = None) -> tuple[float, str, str]:
    """Run ``cmd`` (under ``ulimit -n nofile`` if given); (wall seconds, stdout, stderr).

    Raises:
        RuntimeError: it failed.
    """
    if nofile is not None:
        cmd = ["sh", "-c", f'ulimit -n {nofile} && exec "$@"', "sh", *cmd]
    t0 = time.monotonic()
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
    )
    seconds = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds, done.stdout, done.stderr


_READER = """
import hashlib, json, os, sys
expected = json.load(open(sys.argv[2]))
bad = 0
for name, (size, digest) in expected.items():
    h = hashlib.sha256()
    with open(os.path.join(sys.argv[1], name), "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    bad += h.hexdigest() != digest
print(bad)
"""


def proc_figures(pid: int) -> dict[str, Any]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
    daemon, tree = proc_usage(pid), tree_usage(pid)
    assert daemon is not None and tree is not None, f"the daemon (pid {pid}) is gone"
    return {
        "peak_rss_mib": round(daemon.hwm / 2**20, 1),
        "rss_mib": round(rss / 1024, 1),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "cpu_s": round(daemon.cpu, 2),
        "workers_cpu_s": round(tree.cpu - daemon.cpu, 2),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work).resolve()
    src, mnt, cache = work / "src", work / "mnt", work / "cache"
    t0 = time.monotonic()
    files = write_files(src, args.files, args.shards if args.shard_mib else 0, args.shard_mib)
    print(f"model: {len(files)} files ({time.monotonic() - t0:.1f}s to prepare)", flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    mnt.mkdir(parents=True, exist_ok=True)
    expected = work / "expected.json"
    expected.write_text(json.dumps(files))
    out: dict[str, Any] = {"files": len(files), "nofile": args.nofile}
    ttfs = [sys.executable, "-m", "ttfs"]
    with Origin(src) as origin:
        manifest = work / "manifest.json"
        write_manifest(origin, files, manifest)
        log = work / "daemon.log"
        log.unlink(missing_ok=True)
        mount = [*ttfs, "mount", "--cache-dir", str(cache), "--log-file", str(log)]
        if not args.prefetch:
            mount.append("--no-prefetch")
        secs, _, err = timed([*mount, str(manifest), str(mnt)], 600, args.nofile)
        pid = int(re.search(r"\(pid (\d+),", err).group(1))  # type: ignore[union-attr]
        out["mount_s"] = round(secs, 2)
        print(f"mount: {secs:.2f}s (pid {pid})", flush=True)
        try:
            secs, stdout, _ = timed(["sh", "-c", f"find {mnt} -type f | wc -l"], 600)
            out["find_s"] = round(secs, 2)
            out["listed"] = int(stdout.strip())
            print(f"find: {secs:.2f}s, {out['listed']} files", flush=True)
            if args.materialize:
                secs, _, _ = timed([*ttfs, "materialize", "--no-progress", str(mnt)], 3600)
                out["materialize_s"] = round(secs, 2)
                print(f"materialize: {secs:.2f}s", flush=True)
            if args.read:
                secs, stdout, _ = timed(
                    [sys.executable, "-c", _READER, str(mnt), str(expected)], 3600
                )
                out["read_s"], out["read_mismatches"] = round(secs, 2), int(stdout)
                print(f"read all: {secs:.2f}s, {out['read_mismatches']} mismatches", flush=True)
            if args.status:
                try:
                    secs, stdout, _ = timed([*ttfs, "status", "--json", str(mnt)], 600)
                    out["status_s"] = round(secs, 2)
                    print(f"status --json: {secs:.2f}s", flush=True)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    out["status_error"] = str(e)[-300:]
                    print(f"status --json failed: {out['status_error']}", flush=True)
            out["alive"] = process_alive(pid)
            if out["alive"]:
                out.update(proc_figures(pid))
            text = log.read_text(errors="replace")
            out["emfile_in_log"] = "Too many open files" in text
            limit = re.search(r"open-file limit \(RLIMIT_NOFILE\) .*", text)
            out["limit_log"] = limit.group(0) if limit else None
        finally:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)
            deadline = time.monotonic() + 30
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if process_alive(pid):
                os.kill(pid, 15)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--files", type=int, default=20000, help="small files [20000]")
    p.add_argument("--shards", type=int, default=2, help="big shards [2]")
    p.add_argument("--shard-mib", type=int, default=256, help="MiB per shard; 0: none [256]")
    p.add_argument("--nofile", type=int, default=1024, help="ulimit -n of the mount [1024]")
    p.add_argument("--work", default=str(REPO / ".work" / "scale"), help="[.work/scale]")
    p.add_argument("--no-read", dest="read", action="store_false", help="skip reading all")
    p.add_argument("--no-materialize", dest="materialize", action="store_false")
    p.add_argument("--no-status", dest="status", action="store_false")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false")
    args = p.parse_args(argv)
    out = run(args)
    print(json.dumps(out, indent=1))
    ok = out.get("alive") and out.get("listed") == out["files"] and not out.get("read_mismatches")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
