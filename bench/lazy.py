"""``python -m bench --only lazy``: a cold mount that loads is as fast as one that materializes.

The questions of issue #11, on the ``cdn`` profile (nginx, 25 MB/s per connection + 20 ms per
request), for four safetensors shards of 512 MiB and of 1 GiB (float16, 16 MiB tensors):

* ``materialize``: cold ``ttfs mount`` + ``ttfs materialize`` (the reference);
* ``load``: cold ``ttfs mount`` + ``safetensors.numpy.load_file`` of every shard in turn;
* ``load (trace)``: the same, on a cache that holds only the access trace a ``load`` recorded
  (a new replica that got the trace from the shared cache: docs/mount.md, "Access traces");
* ``4 threads``: cold mount + four threads each loading a different shard at once;
* the three load rows again with ``--lazy-links`` (files being fetched are links too, read by
  the kernel, each read held until its range is local: docs/mount.md, "Lazy links");
* ``first tensor``: start of ``ttfs mount`` (with and without ``--lazy-links``) to one tensor in
  the middle of a cold shard, the loader's interpreter start included, against ``rclone mount
  --vfs-cache-mode full`` on the same nginx (only at the largest shard size).

Every row starts cold (cache deleted); the mount is started with ``--max-connections 32``.
Wall seconds are the median (min-max) of ``--runs`` interleaved runs, with the ratio to
``materialize``; CPU seconds (daemon + CLI + reader) are robust to a loaded machine. Targets:
load <= 1.15x, load with a trace <= 1.05x, four threads <= 1.15x, first tensor <= 2x rclone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .fastpath import make_model, sha256
from .mounts import RcloneMount, Reader, TtfsMount
from .nginx import Nginx
from .procs import CHILDREN, REPO, BenchError, rmtree, with_repo_path

MiB = 1 << 20
ROWS = (
    "materialize",
    "load",
    "load_trace",
    "threads",
    "load_lazy",
    "load_trace_lazy",
    "threads_lazy",
)
LABELS = {
    "materialize": "mount + materialize",
    "load": "mount + load_file of every shard",
    "load_trace": "same, with a recorded trace",
    "threads": "mount + 4 threads, 4 shards",
    "load_lazy": "`--lazy-links`: mount + load_file of every shard",
    "load_trace_lazy": "`--lazy-links`: same, with a recorded trace",
    "threads_lazy": "`--lazy-links`: mount + 4 threads, 4 shards",
}
TARGETS = {"load": 1.15, "load_trace": 1.05, "threads": 1.15}
TARGETS.update({f"{k}_lazy": v for k, v in list(TARGETS.items())})
TENSOR = {"ttfs": "ttfs mount", "lazy": "ttfs mount --lazy-links", "rclone": "rclone mount"}


def write_manifest(nginx: Nginx, sub: str, root: Path, names: list[str], out: Path) -> None:
    pointers = []
    for name in [*names, "config.json"]:
        pointers.append(
            {
                "resolution": {
                    "resolution_type": "http",
                    "url": nginx.url("cdn", f"{sub}/{name}"),
                    "expiration_timestamp": 4044816725,
                },
                "uid": name,
                "file_name": name,
                "hashtype": "sha256",
                "hash": sha256(root / name),
                "size": (root / name).stat().st_size,
            }
        )
    out.write_text(json.dumps({"pointers": pointers}))


def _middle(root: Path, shard: str) -> str:
    with open(root / shard, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    names = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    return str(names[len(names) // 2])


class Case:
    """One shard size: its model, manifest, caches and mountpoint under ``work``."""

    def __init__(self, work: Path, nginx: Nginx, shard_mib: int, reader: Reader) -> None:
        self.work, self.nginx, self.reader = work, nginx, reader
        self.sub = f"lazy-{shard_mib}"
        self.root = nginx.root / self.sub
        self.names = make_model(self.root, shard_mib, shards=4)
        self.manifest = work / f"manifest-{shard_mib}.json"
        write_manifest(nginx, self.sub, self.root, self.names, self.manifest)
        self.cache, self.mnt = work / f"cache-{shard_mib}", work / f"mnt-{shard_mib}"
        self.traces = work / f"traces-{shard_mib}"  # a trace a cold load recorded
        self.total = sum((self.root / n).stat().st_size for n in self.names)
        self.env = with_repo_path(
            {k: v for k, v in os.environ.items() if not k.startswith("TTFS_")}
        )
        self.env["TTFS_LOG"] = "warn"

    def mount(self, *args: str) -> TtfsMount:
        return TtfsMount(
            self.manifest, self.mnt, self.cache, *args, env=self.env, max_connections=32
        )

    def row(self, row: str) -> dict[str, float]:
        rmtree(self.cache)
        lazy = row.endswith("_lazy")
        row = row.removesuffix("_lazy")
        if row == "load_trace":
            if not self.traces.is_dir():
                raise BenchError("no recorded trace (run the load row first)")
            shutil.copytree(self.traces, self.cache / "traces")
        paths = [str(self.mnt / n) for n in self.names]
        with self.mount(*(["--lazy-links"] if lazy else [])) as m:
            t0 = time.monotonic()
            up = m.start()
            if row == "materialize":
                m.materialize()
                cpu_reader = 0.0
            else:
                op = "load_threads" if row == "threads" else "load_file"
                r = self.reader.call(op, paths=paths)
                cpu_reader = float(r["cpu"])
            wall = time.monotonic() - t0
            usage = m.usage()
            status = m.status()
        if lazy and status.get("lazy_links") != "on":
            raise BenchError(f"lazy links are {status.get('lazy_links')}")
        if row == "load" and not lazy and (self.cache / "traces").is_dir():
            rmtree(self.traces)
            shutil.copytree(self.cache / "traces", self.traces)
        cpu = (usage.cpu if usage else 0.0) + m.cli_cpu + cpu_reader
        fetched = float(status["fetcher"]["origin_bytes"])
        return {"wall": wall, "mount": up, "cpu": cpu, "fetched": fetched}

    def first_tensor(self, who: str) -> dict[str, float]:
        shard = self.names[len(self.names) // 2]
        name = _middle(self.root, shard)
        code = (
            "import sys; from safetensors import safe_open\n"
            "with safe_open(sys.argv[1], framework='numpy') as f: f.get_tensor(sys.argv[2])"
        )
        if who == "rclone":
            rcache = self.work / "rclone-cache"
            rmtree(rcache)
            ctx: TtfsMount | RcloneMount = RcloneMount(
                self.nginx.url("cdn", self.sub), self.work / "rmnt", rcache
            )
            mnt = self.work / "rmnt"
        else:
            rmtree(self.cache)
            ctx, mnt = self.mount(*(["--lazy-links"] if who == "lazy" else [])), self.mnt
        with ctx as m:
            t0 = time.monotonic()
            up = m.start()
            subprocess.run(
                [sys.executable, "-c", code, str(mnt / shard), name], check=True, timeout=300
            )
            wall = time.monotonic() - t0
        return {"wall": wall, "mount": up}


def _fmt(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.2f} ({min(values):.2f}-{max(values):.2f})"


def run(work: Path, nginx: Nginx, *, shard_sizes: list[int], runs: int) -> str:
    """Measure every shard size; returns the markdown report."""
    lines = [
        "## Lazy loads (cdn profile): cold mount + load vs cold mount + materialize",
        "",
        f"Four shards per size; {runs} interleaved run(s), wall seconds median (min-max); "
        "CPU = daemon + CLI + reader seconds (robust to load). First tensor: start of the "
        "mount to a middle tensor of a cold shard, the loader's interpreter start included.",
        "",
        "| shards | row | wall s | vs materialize | target | CPU s | MB fetched |",
        "|---|---|---|---|---|---|---|",
    ]
    tensor_lines: list[str] = []
    with Reader() as reader:
        for shard_mib in shard_sizes:
            print(f"bench lazy: {shard_mib} MiB shards: model ...", flush=True)
            case = Case(work, nginx, shard_mib, reader)
            rmtree(case.traces)
            samples: dict[str, list[dict[str, float]]] = {}
            for i in range(runs):
                for row in ROWS:
                    print(f"bench lazy: {shard_mib} MiB {row} {i + 1}/{runs}", end="", flush=True)
                    try:
                        s = case.row(row)
                    except BenchError as e:
                        print(f" FAILED: {e}", flush=True)
                        continue
                    print(f" {s['wall']:.2f} s", flush=True)
                    samples.setdefault(row, []).append(s)
            ref = statistics.median(s["wall"] for s in samples.get("materialize", [{"wall": 0}]))
            for row in ROWS:
                got = samples.get(row)
                if not got:
                    lines.append(f"| 4 x {shard_mib} MiB | {LABELS[row]} | failed | | | | |")
                    continue
                med = statistics.median(s["wall"] for s in got)
                ratio = f"{med / ref:.2f}x" if ref else "-"
                target = f"<= {TARGETS[row]}x" if row in TARGETS else ""
                if row in TARGETS and ref:
                    target += " met" if med / ref <= TARGETS[row] else " NOT met"
                cpu = statistics.median(s["cpu"] for s in got)
                mb = statistics.median(s["fetched"] for s in got) / 1e6
                lines.append(
                    f"| 4 x {shard_mib} MiB | {LABELS[row]} | {_fmt([s['wall'] for s in got])} "
                    f"| {ratio} | {target} | {cpu:.1f} | {mb:.0f} |"
                )
            if shard_mib == max(shard_sizes):
                t: dict[str, list[dict[str, float]]] = {who: [] for who in TENSOR}
                for i in range(runs):
                    for who in TENSOR:
                        print(f"bench lazy: first tensor {who} {i + 1}/{runs}", end="", flush=True)
                        try:
                            s = case.first_tensor(who)
                        except (BenchError, subprocess.SubprocessError) as e:
                            print(f" FAILED: {e}", flush=True)
                            continue
                        print(f" {s['wall']:.2f} s", flush=True)
                        t[who].append(s)
                if t["rclone"]:
                    theirs = statistics.median(s["wall"] for s in t["rclone"])
                    tensor_lines = [
                        "",
                        f"First tensor of a cold {shard_mib} MiB shard (start of the mount -> "
                        "tensor, loader start included), median (min-max):",
                        "",
                        "| mount | wall s | mount s | vs rclone | target |",
                        "|---|---|---|---|---|",
                    ]
                    for who in ("ttfs", "lazy"):
                        if not t[who]:
                            continue
                        ours = statistics.median(s["wall"] for s in t[who])
                        verdict = "met" if ours <= 2 * theirs else "NOT met"
                        tensor_lines.append(
                            f"| {TENSOR[who]} | {_fmt([s['wall'] for s in t[who]])} | "
                            f"{_fmt([s['mount'] for s in t[who]])} | {ours / theirs:.2f}x | "
                            f"<= 2x {verdict} |"
                        )
                    tensor_lines.append(
                        "| rclone mount --vfs-cache-mode full | "
                        f"{_fmt([s['wall'] for s in t['rclone']])} | "
                        f"{_fmt([s['mount'] for s in t['rclone']])} | 1.00x | |"
                    )
            rmtree(case.cache)
    return "\n".join(lines + tensor_lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lazy", description=__doc__.split("\n")[0])
    ap.add_argument("--shards", default="512,1024", help="shard sizes in MiB [512,1024]")
    ap.add_argument("--runs", type=int, default=1, help="interleaved runs [1]")
    ap.add_argument("--work", type=Path, default=REPO / ".work" / "bench-lazy")
    args = ap.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    (work / "data").mkdir(exist_ok=True)
    with CHILDREN, Nginx(work / "data", work / "nginx") as nginx:
        text = run(
            work, nginx, shard_sizes=[int(x) for x in args.shards.split(",") if x], runs=args.runs
        )
    print()
    print(text)
    print(f"bench lazy: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
