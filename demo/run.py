"""``make run``: the end-to-end demo on the embedded local origin.

1. Generates a sharded Llama-style model (~300 MB) once, under ``.work/demo``.
2. Serves it from :class:`~demo.origin.Origin` like Hugging Face does: a hub that answers
   ``resolve`` URLs with a 302 to a signed CDN URL on a second port.
3. Writes a bptr manifest for it and runs the real CLI: ``ttfs resolve`` from a cold cache, a
   second time (nothing is fetched), and ``python -m truss_transfer`` (the drop-in).
4. Checks every output byte against the source and prints what happened.
5. Slows the origin down to a CDN-like 25 MB/s per connection + 20 ms, mounts the manifest
   lazily from a cold cache, reads one tensor, loads the model with transformers through the
   mount (logits compared with a load from the source), runs ``ttfs materialize`` and
   ``ttfs status``, and unmounts.

With a real manifest the same is ``ttfs resolve manifest.json DIR`` (or ``ttfs mount``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .model import ModelShape, build_manifest, generate_model, model_files, sha256_file
from .origin import Origin

REPO = "demo-org/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _run(args: list[str], env: dict[str, str]) -> float:
    shown = ["<loader script>" if a == _LOAD else a for a in args]
    print("$ " + " ".join(shown), flush=True)
    t0 = time.monotonic()
    subprocess.run(args, env=env, check=True)
    return time.monotonic() - t0


def main() -> None:
    work = Path(os.environ.get("TTFS_DEMO_DIR", ".work/demo")).resolve()
    origin_root = work / "origin"
    model_dir = origin_root / REPO
    _say(f"generating a model repo under {model_dir} (once)")
    t0 = time.monotonic()
    generate_model(model_dir, ModelShape())
    files = model_files(model_dir)
    total = sum(p.stat().st_size for p in files.values())
    print(f"{len(files)} files, {total / 1e6:.1f} MB ({time.monotonic() - t0:.1f}s)")

    with Origin(origin_root) as origin:
        _say(f"local origin: hub {origin.base_url}, CDN {origin.cdn_url}")
        urls = {rel: origin.hf_url(REPO, REVISION, rel) for rel in files}
        manifest = work / "manifest.json"
        manifest.write_text(json.dumps(build_manifest(files, urls), indent=2))
        print(f"manifest: {manifest} ({len(files)} pointers, HF-style resolve URLs)")

        env = dict(
            os.environ,
            TTFS_CACHE_DIR=str(work / "cache"),
            HF_ENDPOINT=origin.base_url,
            TTFS_STATS_FILE=str(work / "stats.json"),
        )
        out = work / "out"
        for path in (work / "cache", out, work / "out-truss"):
            shutil.rmtree(path, ignore_errors=True)
        ttfs = [sys.executable, "-m", "ttfs"]

        _say("cold resolve: every file fetched with parallel range GETs, verified, then placed")
        origin.reset_stats()
        secs = _run([*ttfs, "resolve", str(manifest), str(out), "--no-progress"], env)
        stats = origin.stats.snapshot()
        print(
            f"{total / 1e6:.1f} MB in {secs:.2f}s = {total / secs / 1e6:.0f} MB/s "
            f"(process start included); origin sent {stats.bytes_sent / 1e6:.1f} MB in "
            f"{stats.data_requests} data requests"
        )

        _say("checking every byte against the source")
        for rel, src in files.items():
            if sha256_file(out / rel) != sha256_file(src):
                raise SystemExit(f"MISMATCH: {rel}")
        print(f"all {len(files)} files identical")

        _say("second resolve: everything is already there and verified")
        origin.reset_stats()
        secs = _run([*ttfs, "resolve", str(manifest), str(out), "--no-progress"], env)
        print(f"{secs:.2f}s, origin data requests: {origin.stats.snapshot().data_requests}")

        _say("the truss_transfer drop-in, reading /static-bptr-style manifest paths")
        env_truss = dict(env, TTFS_MANIFEST_PATHS=str(manifest))
        _run([sys.executable, "-m", "truss_transfer", str(work / "out-truss")], env_truss)
        stats_file = json.loads((work / "stats.json").read_text())
        print(
            f"stats file: success={stats_file['success']}, "
            f"{stats_file['total_manifest_size_bytes']} bytes, "
            f"{len(stats_file['file_downloads'])} files placed from the warm cache"
        )

        if os.geteuid() == 0 and Path("/dev/fuse").exists():
            _mount_demo(origin, manifest, model_dir, work, env)
        else:
            _say("skipping the mount part: it needs root and /dev/fuse")

    _say("done. Try: ttfs resolve --help, ttfs mount --help")


_LOAD = """
import sys, time, json
t0 = time.monotonic()
from safetensors import safe_open
mnt, src = sys.argv[1], sys.argv[2]
index = json.load(open(mnt + "/model.safetensors.index.json"))
name = "model.layers.3.mlp.down_proj.weight"
with safe_open(mnt + "/" + index["weight_map"][name], "np") as f:
    t = f.get_tensor(name)
print(f"first tensor {name} {tuple(t.shape)}: {time.monotonic() - t0:.2f}s after the mount")
import torch
from transformers import AutoModelForCausalLM
t1 = time.monotonic()
model = AutoModelForCausalLM.from_pretrained(mnt, dtype=torch.float32)
print(f"transformers from_pretrained through the mount: {time.monotonic() - t1:.2f}s")
ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
ids = torch.arange(1, 17).unsqueeze(0)
with torch.no_grad():
    same = torch.equal(model(ids).logits, ref(ids).logits)
print("logits identical to a load from the source:", same)
sys.exit(0 if same else 1)
"""


def _mount_demo(
    origin: Origin, manifest: Path, model_dir: Path, work: Path, env: dict[str, str]
) -> None:
    mnt = work / "mnt"
    subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
    mnt.mkdir(exist_ok=True)
    cache = work / "cache-mount"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(env, TTFS_CACHE_DIR=str(cache))
    ttfs = [sys.executable, "-m", "ttfs"]
    origin.rate_limit = 25_000_000
    origin.latency = 0.02
    _say("lazy mount from a cold cache; the origin now serves 25 MB/s per connection, +20 ms")
    origin.reset_stats()
    t0 = time.monotonic()
    _run([*ttfs, "mount", str(manifest), str(mnt)], env)
    print(
        f"mounted in {time.monotonic() - t0:.2f}s: "
        f"{len(list(mnt.iterdir()))} entries visible, sizes from the manifest"
    )
    try:
        _say("loading through the mount while the background prefetch runs")
        _run([sys.executable, "-c", _LOAD, str(mnt), str(model_dir)], env)
        _say("ttfs materialize: block until every byte is local and verified")
        _run([*ttfs, "materialize", str(mnt), "--no-progress"], env)
        _run([*ttfs, "status", str(mnt)], env)
        stats = origin.stats.snapshot()
        print(f"origin: {stats.bytes_sent / 1e6:.1f} MB in {stats.data_requests} data requests")
    finally:
        _run([*ttfs, "umount", str(mnt)], env)
        origin.rate_limit = None
        origin.latency = 0.0


if __name__ == "__main__":
    main()
