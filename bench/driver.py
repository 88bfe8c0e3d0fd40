"""``make bench``: ttfs against its peers on one origin, cold, interleaved, medians.

What it proves, per origin profile (``cdn``: 25 MB/s per connection + 20 ms per request;
``raw``: no limits; see :mod:`bench.nginx`):

* **Eager download** (wall time, GB/s, ratio to ttfs resolve, CPU s/GB, peak RSS, origin
  requests and bytes per GB delivered): ``ttfs resolve``; ``ttfs mount`` + ``ttfs materialize``;
  ``huggingface_hub.snapshot_download`` (defaults, ``HF_ENDPOINT`` at the fake hub);
  ``hf_transfer.download`` per file (huggingface_hub's old settings); ``aria2c`` with 16
  connections per file; ``rclone mount --vfs-cache-mode full`` on an http remote + reading every
  file. Each from a cold state: outputs and every cache deleted, dirty pages synced first.
* **Lazy figures**: time from starting ``ttfs mount`` to one tensor in the middle of a cold
  shard (ttfs with and without prefetch vs rclone mount); a full safetensors load of every shard
  through a cold mount vs ``ttfs materialize`` alone vs ``snapshot_download`` then load; a warm
  sequential read through the mount vs reading the cached blob files directly (page-cache hot,
  and after dropping the page cache, which is global and only done there).
* **Lazy loads** (``--only lazy``, :mod:`bench.lazy`): cold mount + ``load_file`` of every
  shard (sequential, with a recorded access trace, four threads) vs cold mount + materialize at
  512 MiB and 1 GiB shards, and the first tensor of a cold 1 GiB shard vs rclone mount.
* **Fast path** (``--only fastpath``, :mod:`bench.fastpath`): a materialized mount read with
  1 MiB reads and with ``load_file``, fast path on and off, against the blob files, at 512 MiB
  and 1 GiB shards; page-cache footprint.

The model (config, tokenizer, index, 4 safetensors shards with many tensors) is generated once
under ``--work``; the fake hub (:mod:`bench.hub`) serves metadata and 302s to nginx for bytes.
Items run interleaved (A B C ... A B C ...) ``--runs`` times; tables give the median and the
min-max. Outputs are checked by size every run and by sha256 on the first run. Results are
printed and written to ``bench/results/<timestamp>.md``. Nothing is asserted: targets are
reported as met or not.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from demo.model import ModelShape, build_manifest, generate_model, model_files

from . import report
from .hub import REPO_ID, Hub
from .mounts import RcloneMount, Reader, TtfsMount
from .nginx import PROFILES, Nginx, OriginUse
from .procs import (
    CHILDREN,
    REPO,
    BenchError,
    drop_caches,
    machine_info,
    rmtree,
    run_measured,
    with_repo_path,
)

MiB = 1 << 20
Sample = dict[str, float]

EAGER = ("resolve", "materialize", "snapshot", "hf_transfer", "aria2c", "curl", "rclone")
LAZY = ("tensor", "tensor_noprefetch", "tensor_rclone", "load_mount", "warm_read", "snapshot_load")
# Own origin and model, run once, not per profile (bench/fastpath.py, bench/lazy.py).
SEPARATE = ("fastpath", "lazy")
ITEMS = EAGER + LAZY + SEPARATE


@dataclass
class Setup:
    args: argparse.Namespace
    work: Path
    data: Path
    model: Path
    files: dict[str, Path]
    sums: dict[str, str]
    hashes: dict[str, str]
    """rel -> manifest hash (the blob id in the ttfs cache)."""
    shards: list[str]
    tensor: tuple[str, str]
    """(shard, tensor name) of the middle tensor of the middle shard."""
    manifest: Path
    nginx: Nginx
    hub: Hub
    reader: Reader
    total: int = 0
    n_tensors: int = 0
    origin_cold: bool = False
    lazy_cache_complete: bool = False
    notes: list[str] = field(default_factory=list)

    # -- environment -----------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = with_repo_path(
            {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TTFS_"))}
        )
        env.update(
            HF_ENDPOINT=self.hub.base_url,
            HF_HOME=str(self.work / "hf-home"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            TTFS_LOG="warn",
        )
        # The https-* profiles' CA, trusted the usual way (httpx, ssl, requests, curl).
        env.update(self.nginx.ca.trust_env())
        return env

    def path(self, name: str) -> Path:
        return self.work / "run" / name

    def clean(self, *names: str) -> None:
        for name in names:
            rmtree(self.path(name))
        os.sync()  # the previous item's dirty pages must not be written back during this one

    def warm_origin(self) -> None:
        """Put the served files in the page cache (nginx serves from it in every figure)."""
        if not self.origin_cold:
            return
        self.reader.call("read", paths=[str(p) for p in self.files.values()])
        self.origin_cold = False

    def drop(self) -> bool:
        ok = drop_caches()
        self.origin_cold = self.origin_cold or ok
        return ok

    # -- checks ------------------------------------------------------------------------------
    def check_dir(self, root: Path, what: str, verify: bool) -> None:
        for rel, src in self.files.items():
            got = root / rel
            if not got.exists() or got.stat().st_size != src.stat().st_size:
                raise BenchError(f"{what}: {rel} missing or of the wrong size under {root}")
        if verify:
            paths = [str(root / rel) for rel in self.files]
            digests = self.reader.call("sha256", paths=paths)["digests"]
            for rel in self.files:
                if digests[str(root / rel)] != self.sums[rel]:
                    raise BenchError(f"{what}: {rel} has the wrong sha256")

    # -- origin counters ---------------------------------------------------------------------
    def mark(self) -> tuple[int, int, int]:
        st = self.hub.stats
        return self.nginx.mark(), st.requests, st.bytes_sent

    def origin(self, mark: tuple[int, int, int], wall: float) -> Sample:
        use: OriginUse = self.nginx.usage(mark[0])
        st = self.hub.stats
        return {
            "req": use.requests + st.requests - mark[1],
            "bytes": use.bytes + st.bytes_sent - mark[2],
            "conns": use.connections,
            "inflight": use.busy_seconds / wall if wall > 0 else 0.0,
            "peak": use.peak_inflight,
            "errors": use.errors,
        }


# -- the model ------------------------------------------------------------------------------
def prepare_model(work: Path, size_mib: int) -> tuple[Path, Path]:
    """Generate the model once; regenerate only when the size changes."""
    data = work / "data"
    model = data / REPO_ID
    marker = work / "model.json"
    want = json.dumps({"size_mib": size_mib, "shards": 4})
    if marker.exists() and marker.read_text() == want and model.is_dir():
        return data, model
    print(f"bench: generating a ~{size_mib} MiB model in {model} ...", flush=True)
    shutil.rmtree(model, ignore_errors=True)
    t0 = time.monotonic()
    generate_model(model, ModelShape.for_size(size_mib * MiB, shards=4))
    # generate_model leaves its marker in the repo; the hub and rclone would serve it.
    (model / ".complete").unlink(missing_ok=True)
    marker.write_text(want)
    print(f"bench: model generated in {time.monotonic() - t0:.1f} s", flush=True)
    return data, model


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(8 * MiB):
            h.update(b)
    return h.hexdigest()


def middle_tensor(model: Path, shards: list[str]) -> tuple[str, str]:
    shard = shards[len(shards) // 2]
    with open(model / shard, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    data_size = max(v["data_offsets"][1] for v in header.values())
    mid = data_size // 2
    for name, v in header.items():
        a, b = v["data_offsets"]
        if a <= mid < b:
            return shard, name
    return shard, next(iter(header))


# -- eager contenders -----------------------------------------------------------------------
def py(*args: str) -> list[str]:
    return [sys.executable, *args]


def resolve(s: Setup, profile: str, verify: bool) -> Sample:
    s.clean("out", "cache")
    mark = s.mark()
    m = run_measured(
        py(
            "-m",
            "ttfs",
            "resolve",
            str(s.manifest),
            str(s.path("out")),
            "--no-progress",
            "--cache-dir",
            str(s.path("cache")),
            "--max-connections",
            str(s.args.connections),
            "--log-level",
            "warn",
        ),
        env=s.env(),
    ).check("ttfs resolve")
    sample = {"wall": m.wall, "cpu": m.cpu, "rss": m.maxrss, **s.origin(mark, m.wall)}
    s.check_dir(s.path("out"), "ttfs resolve", verify)
    return sample


def materialize(s: Setup, profile: str, verify: bool) -> Sample:
    s.clean("cache")
    mark = s.mark()
    with TtfsMount(
        s.manifest,
        s.path("mnt"),
        s.path("cache"),
        env=s.env(),
        max_connections=s.args.connections,
    ) as mount:
        t0 = time.monotonic()
        mount.start()
        mount.materialize()
        wall = time.monotonic() - t0
        usage = mount.usage()
        sample = {"wall": wall, **s.origin(mark, wall)}
        if usage is not None:
            sample.update(cpu=usage.cpu + mount.cli_cpu, rss=usage.hwm)
        s.check_dir(s.path("mnt"), "ttfs mount + materialize", verify)
    return sample


def snapshot(s: Setup, profile: str, verify: bool) -> Sample:
    s.clean("hf-cache")
    mark = s.mark()
    m = run_measured(
        py("-m", "bench.clients", "snapshot", REPO_ID, str(s.path("hf-cache"))), env=s.env()
    ).check("snapshot_download")
    sample = {"wall": m.wall, "cpu": m.cpu, "rss": m.maxrss, **s.origin(mark, m.wall)}
    s.check_dir(Path(m.out.strip().splitlines()[-1]), "snapshot_download", verify)
    return sample


def cdn_urls(s: Setup, profile: str) -> dict[str, str]:
    """What the hub's 302 points at: every file straight from nginx."""
    return {rel: s.nginx.url(profile, f"{REPO_ID}/{rel}") for rel in s.files}


def hf_transfer(s: Setup, profile: str, verify: bool) -> Sample:
    s.clean("out")
    s.path("out").mkdir(parents=True)
    pairs = [f"{url}={rel}" for rel, url in cdn_urls(s, profile).items()]
    mark = s.mark()
    m = run_measured(
        py("-m", "bench.clients", "hf_transfer", str(s.path("out")), *pairs), env=s.env()
    ).check("hf_transfer")
    sample = {"wall": m.wall, "cpu": m.cpu, "rss": m.maxrss, **s.origin(mark, m.wall)}
    s.check_dir(s.path("out"), "hf_transfer", verify)
    return sample


def curl(s: Setup, profile: str, verify: bool) -> Sample:
    """curl: one connection per file, every file at once (the floor of a plain HTTP client)."""
    s.clean("out")
    out = s.path("out")
    out.mkdir(parents=True)
    cmd = ["curl", "-sS", "--fail", "--parallel", "--parallel-max", "64", "--create-dirs"]
    for rel, url in cdn_urls(s, profile).items():
        cmd += ["-o", str(out / rel), url]
    mark = s.mark()
    m = run_measured(cmd, env=s.env()).check("curl")
    sample = {"wall": m.wall, "cpu": m.cpu, "rss": m.maxrss, **s.origin(mark, m.wall)}
    s.check_dir(out, "curl", verify)
    return sample


def aria2c(s: Setup, profile: str, verify: bool) -> Sample:
    s.clean("out")
    out = s.path("out")
    out.mkdir(parents=True)
    listing = s.path("aria2c-input.txt")
    listing.write_text(
        "".join(f"{url}\n  out={rel}\n" for rel, url in cdn_urls(s, profile).items())
    )
    mark = s.mark()
    m = run_measured(
        [
            "aria2c",
            "--input-file",
            str(listing),
            "--dir",
            str(out),
            "--max-connection-per-server=16",
            "--split=16",
            "--min-split-size=1M",
            "--file-allocation=none",
            "--auto-file-renaming=false",
            "--allow-overwrite=true",
            "--summary-interval=0",
            "--console-log-level=warn",
            "--download-result=hide",
            f"--ca-certificate={s.nginx.ca.ca}",
        ],
        env=s.env(),
    ).check("aria2c")
    sample = {"wall": m.wall, "cpu": m.cpu, "rss": m.maxrss, **s.origin(mark, m.wall)}
    s.check_dir(out, "aria2c", verify)
    return sample


def rclone(s: Setup, profile: str, verify: bool) -> Sample:
    s.clean("rclone-cache")
    mark = s.mark()
    mnt = s.path("rmnt")
    with RcloneMount(
        s.nginx.url(profile, REPO_ID), mnt, s.path("rclone-cache"), ca=s.nginx.ca.ca
    ) as mount:
        t0 = time.monotonic()
        mount.start()
        cats = [
            subprocess.Popen(["cat", str(mnt / rel)], stdout=subprocess.DEVNULL) for rel in s.files
        ]
        for c in cats:
            CHILDREN.add(c.pid)
        try:
            failed = [c.args for c in cats if c.wait() != 0]
        finally:
            for c in cats:
                with contextlib.suppress(ProcessLookupError):
                    if c.poll() is None:
                        c.kill()
                        c.wait()
                CHILDREN.discard(c.pid)
        wall = time.monotonic() - t0
        if failed:
            raise BenchError(f"rclone mount: cat failed: {failed}")
        sample = {"wall": wall, **s.origin(mark, wall)}
        s.check_dir(mnt, "rclone mount", verify)
    sample.update(cpu=mount.cpu, rss=mount.maxrss)
    return sample


# -- lazy figures ---------------------------------------------------------------------------
def _first_tensor(s: Setup, profile: str, *args: str) -> Sample:
    s.clean("lcache")
    shard, name = s.tensor
    mark = s.mark()
    with TtfsMount(
        s.manifest,
        s.path("lmnt"),
        s.path("lcache"),
        *args,
        env=s.env(),
        max_connections=s.args.connections,
    ) as mount:
        t0 = time.monotonic()
        up = mount.start()
        got = s.reader.call("tensor", path=str(s.path("lmnt") / shard), name=name)
        wall = time.monotonic() - t0
        use = s.origin(mark, wall)
    return {"wall": wall, "mount": up, "tensor": got["seconds"], "fetched": use["bytes"]}


def tensor(s: Setup, profile: str, verify: bool) -> Sample:
    return _first_tensor(s, profile)


def tensor_noprefetch(s: Setup, profile: str, verify: bool) -> Sample:
    return _first_tensor(s, profile, "--no-prefetch")


def tensor_rclone(s: Setup, profile: str, verify: bool) -> Sample:
    s.clean("rclone-cache")
    shard, name = s.tensor
    mark = s.mark()
    mnt = s.path("rmnt")
    with RcloneMount(
        s.nginx.url(profile, REPO_ID), mnt, s.path("rclone-cache"), ca=s.nginx.ca.ca
    ) as mount:
        t0 = time.monotonic()
        up = mount.start()
        got = s.reader.call("tensor", path=str(mnt / shard), name=name)
        wall = time.monotonic() - t0
        use = s.origin(mark, wall)
    return {"wall": wall, "mount": up, "tensor": got["seconds"], "fetched": use["bytes"]}


def load_mount(s: Setup, profile: str, verify: bool) -> Sample:
    s.clean("lcache")
    s.lazy_cache_complete = False
    mnt = s.path("lmnt")
    mark = s.mark()
    with TtfsMount(
        s.manifest, mnt, s.path("lcache"), env=s.env(), max_connections=s.args.connections
    ) as mount:
        t0 = time.monotonic()
        up = mount.start()
        got = s.reader.call("load", paths=[str(mnt / rel) for rel in s.shards])
        wall = time.monotonic() - t0
        use = s.origin(mark, wall)
        usage = mount.usage()
        mount.materialize()  # untimed: leaves a complete cache for warm_read
        s.lazy_cache_complete = True
    sample = {"wall": wall, "mount": up, "load": got["seconds"], "fetched": use["bytes"]}
    if usage is not None:
        sample.update(cpu=usage.cpu, rss=usage.hwm)
    return sample


def warm_read(s: Setup, profile: str, verify: bool) -> Sample:
    mnt = s.path("lmnt")
    if not s.lazy_cache_complete:
        s.clean("lcache")
        with TtfsMount(s.manifest, mnt, s.path("lcache"), env=s.env()) as mount:
            mount.start()
            mount.materialize()
        s.lazy_cache_complete = True
    blobs = [s.path("lcache") / "blobs" / h[:2] / h for h in s.hashes.values()]
    missing = [str(b) for b in blobs if not b.exists()]
    if missing:
        raise BenchError(f"blob files not where expected: {missing[:2]}")
    direct = [str(b) for b in blobs]
    through = [str(mnt / rel) for rel in s.files]
    sample: Sample = {}
    with TtfsMount(s.manifest, mnt, s.path("lcache"), env=s.env()) as mount:
        mount.start()
        s.reader.call("read", paths=direct)  # the blobs in the page cache: "warm"
        sample["mount_read"] = s.reader.call("read", paths=through)["seconds"]
        sample["direct_read"] = s.reader.call("read", paths=direct)["seconds"]
        if s.args.drop_caches and s.drop():
            sample["mount_read_cold"] = s.reader.call("read", paths=through)["seconds"]
            s.drop()
            sample["direct_read_cold"] = s.reader.call("read", paths=direct)["seconds"]
        usage = mount.usage()
    sample["wall"] = sample["mount_read"]
    if usage is not None:
        sample["rss"] = usage.hwm
    return sample


def snapshot_load(s: Setup, profile: str, verify: bool) -> Sample:
    s.clean("hf-cache")
    m = run_measured(
        py("-m", "bench.clients", "snapshot_load", REPO_ID, str(s.path("hf-cache"))),
        env=s.env(),
    ).check("snapshot_download + load")
    doc = json.loads(m.out.strip().splitlines()[-1])
    return {"wall": m.wall, "download": doc["download"], "load": doc["load"]}


FUNCS: dict[str, Callable[[Setup, str, bool], Sample]] = {
    "resolve": resolve,
    "materialize": materialize,
    "snapshot": snapshot,
    "hf_transfer": hf_transfer,
    "aria2c": aria2c,
    "curl": curl,
    "rclone": rclone,
    "tensor": tensor,
    "tensor_noprefetch": tensor_noprefetch,
    "tensor_rclone": tensor_rclone,
    "load_mount": load_mount,
    "warm_read": warm_read,
    "snapshot_load": snapshot_load,
}


# -- the driver -----------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--size", default="1024,2048", help="model sizes in MiB, each a full run [1024,2048]"
    )
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs of each item [3]")
    ap.add_argument("--profiles", default=",".join(PROFILES), help=",".join(PROFILES))
    ap.add_argument("--only", default="", help=f"comma list of items: {','.join(ITEMS)}")
    ap.add_argument("--skip", default="", help="comma list of items to leave out")
    ap.add_argument("--connections", type=int, default=32, help="ttfs --max-connections [32]")
    ap.add_argument("--work", type=Path, default=REPO / ".work" / "bench")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument(
        "--no-drop-caches",
        dest="drop_caches",
        action="store_false",
        help="never drop the (global) page cache; skips the cold warm_read rows",
    )
    args = ap.parse_args(argv)
    only = [x for x in args.only.split(",") if x] or list(ITEMS)
    skip = {x for x in args.skip.split(",") if x}
    unknown = (set(only) | skip) - set(ITEMS)
    if unknown:
        ap.error(f"unknown items: {', '.join(sorted(unknown))}")
    args.items = [x for x in ITEMS if x in only and x not in skip]
    args.profile_list = [p for p in args.profiles.split(",") if p]
    if set(args.profile_list) - set(PROFILES):
        ap.error(f"profiles are {PROFILES}")
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    try:
        args.sizes = [int(x) for x in str(args.size).split(",") if x]
    except ValueError:
        ap.error("--size is a comma list of MiB, e.g. 1024,2048")
    if not args.sizes or min(args.sizes) < 1:
        ap.error("--size must name at least one size >= 1 MiB")
    if os.geteuid() != 0:
        args.drop_caches = False
    return args


def setup(args: argparse.Namespace, nginx: Nginx, hub: Hub, reader: Reader) -> Setup:
    work = args.work.resolve()
    data, model = nginx.root, nginx.root / REPO_ID
    files = model_files(model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    urls = {rel: hub.resolve_url(rel) for rel in files}
    manifest_doc = build_manifest(files, urls)
    manifest = work / "manifest.json"
    manifest.write_text(json.dumps(manifest_doc, indent=1))
    rel_of = {os.path.normpath(p["file_name"]): p["hash"] for p in manifest_doc["pointers"]}
    hashes = {rel: rel_of[os.path.normpath(rel)] for rel in files}
    sums = {rel: sha256(p) for rel, p in files.items()}
    s = Setup(
        args=args,
        work=work,
        data=data,
        model=model,
        files=files,
        sums=sums,
        hashes=hashes,
        shards=shards,
        tensor=middle_tensor(model, shards),
        manifest=manifest,
        nginx=nginx,
        hub=hub,
        reader=reader,
    )
    s.total = sum(p.stat().st_size for p in files.values())
    s.n_tensors = len(index["weight_map"])
    return s


def run_profile(s: Setup, profile: str, results: dict[str, list[Sample]]) -> None:
    s.hub.cdn_base = s.nginx.base(profile)
    s.origin_cold = True
    for run in range(s.args.runs):
        for item in s.args.items:
            s.warm_origin()
            label = f"[{profile} {run + 1}/{s.args.runs}] {item}"
            print(f"bench: {label} ...", end="", flush=True)
            try:
                sample = FUNCS[item](s, profile, run == 0)
            except BenchError as e:
                print(f" FAILED: {e}", flush=True)
                results.setdefault(item, []).append({"failed": 1.0})
                s.notes.append(f"{profile} {item} run {run + 1} failed: {str(e)[:300]}")
                continue
            except Exception as e:
                print(" FAILED (bug)", flush=True)
                traceback.print_exc()
                results.setdefault(item, []).append({"failed": 1.0})
                s.notes.append(f"{profile} {item} run {run + 1} failed: {e!r}")
                continue
            results.setdefault(item, []).append(sample)
            print(f" {sample.get('wall', 0.0):.2f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    texts = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    work = args.work.resolve()
    (work / "run").mkdir(parents=True, exist_ok=True)
    # Items with a harness of their own run once, whatever the sizes.
    separate = [x for x in args.items if x in SEPARATE]
    args.items = [x for x in args.items if x not in SEPARATE]
    extra = ""
    if "fastpath" in separate:
        from . import fastpath

        with CHILDREN:
            extra = fastpath.run(work / "fastpath", shard_sizes=[512, 1024], runs=args.runs)
    if "lazy" in separate:
        from . import lazy

        (work / "lazy" / "data").mkdir(parents=True, exist_ok=True)
        with CHILDREN, Nginx(work / "lazy" / "data", work / "lazy" / "nginx") as lazy_nginx:
            extra += lazy.run(work / "lazy", lazy_nginx, shard_sizes=[512, 1024], runs=args.runs)
    if separate and not args.items:
        print()
        print(extra)
        args.results.mkdir(parents=True, exist_ok=True)
        which = "+".join(separate)
        out = args.results / f"{time.strftime('%Y%m%d-%H%M%S')}-{which}.md"
        out.write_text(f"# ttfs bench ({which}), {started}\n\n{extra}")
        print(f"bench: results written to {out}")
        return 0
    for size in args.sizes:
        args.size = size
        texts.append(run_size(args))
    if extra:
        texts.append(extra)
    text = "\n\n".join(texts)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text(text)
    print(f"bench: results written to {out}")
    return 0


def run_size(args: argparse.Namespace) -> str:
    """Every profile and item for a model of ``args.size`` MiB; returns the report."""
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t_start = time.monotonic()
    info = machine_info()
    work = args.work.resolve()
    (work / "run").mkdir(parents=True, exist_ok=True)
    data, _model = prepare_model(work, args.size)
    all_results: dict[str, dict[str, list[Sample]]] = {}
    with CHILDREN, contextlib.ExitStack() as stack:
        nginx = stack.enter_context(Nginx(data, work / "nginx"))
        hub = Hub(data, nginx.base("cdn"))
        stack.enter_context(hub)
        reader = stack.enter_context(Reader())
        print("bench: hashing the model (manifest, hub, checks) ...", flush=True)
        hub.warm()
        s = setup(args, nginx, hub, reader)
        try:
            for profile in args.profile_list:
                results: dict[str, list[Sample]] = {}
                all_results[profile] = results
                run_profile(s, profile, results)
        except KeyboardInterrupt:
            print("\nbench: interrupted; reporting what was measured", flush=True)
            s.notes.append("interrupted before the end")
        finally:
            # Mounts are already gone (each item unmounts in its own finally).
            with contextlib.suppress(Exception):
                for name in ("out", "cache", "hf-cache", "rclone-cache", "lcache"):
                    rmtree(s.path(name))
    elapsed = time.monotonic() - t_start
    text = report.render(s, all_results, info=info, started=started, elapsed=elapsed)
    print()
    print(text)
    return text
