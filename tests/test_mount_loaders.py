"""Model loaders through a real mount: safetensors (lazy), transformers, numpy.memmap.

The lazy test is the point of the mount: opening a 280 MiB shard and reading one tensor in the
middle must fetch the header, that tensor and at most one readahead window, which the
origin's byte counter checks. The transformers test loads a tiny random Llama built by the test
(nothing from a hub) and requires bit-identical logits.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.origin import Origin
from tests.mount_helpers import (
    daemon_env,
    make_shard,
    mounted,
    require_fuse,
    run_py,
    sha256_file,
    status,
    write_manifest,
)
from ttfs.units import MiB
from ttfs.vfs.readahead import ReadaheadConfig

pytestmark = pytest.mark.fuse
BS = 2 * MiB


@pytest.fixture(autouse=True)
def _needs_fuse() -> None:
    require_fuse()


@pytest.fixture(scope="module")
def big_shard(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[int, int]]]:
    """A 280 MiB safetensors shard: 70 float32 tensors of 4 MiB (1024 x 1024)."""
    root = tmp_path_factory.mktemp("big")
    ranges = make_shard(root / "model.safetensors", 70, 1024, seed=7)
    (root / "config.json").write_text("{}")
    return root, ranges


@pytest.fixture
def big_origin(big_shard: tuple[Path, dict[str, tuple[int, int]]]) -> Iterator[Origin]:
    with Origin(big_shard[0]) as o:
        yield o


_GET_TENSOR = r"""
import hashlib, json, sys, time
t0 = time.monotonic()
from safetensors import safe_open
t1 = time.monotonic()
with safe_open(sys.argv[1], framework="np") as f:
    keys = list(f.keys())
    x = f.get_tensor(sys.argv[2])
t2 = time.monotonic()
print(json.dumps({"keys": len(keys), "sha": hashlib.sha256(x.tobytes()).hexdigest(),
                  "import_s": t1 - t0, "tensor_s": t2 - t1}))
"""


def test_safe_open_one_middle_tensor_fetches_header_tensor_and_one_window(
    tmp_path: Path,
    big_shard: tuple[Path, dict[str, tuple[int, int]]],
    big_origin: Origin,
) -> None:
    root, ranges = big_shard
    size = (root / "model.safetensors").stat().st_size
    assert size >= 256 * MiB
    manifest = tmp_path / "m.json"
    write_manifest(big_origin, root, manifest)
    name = "layer035"
    start, end = ranges[name]
    with open(root / "model.safetensors", "rb") as f:
        header_end = 8 + int.from_bytes(f.read(8), "little")
        f.seek(start)
        want = hashlib.sha256(f.read(end - start)).hexdigest()
    t0 = time.monotonic()
    with mounted(manifest, tmp_path / "mnt", tmp_path / "cache", "--no-prefetch") as m:
        out = json.loads(run_py(_GET_TENSOR, str(m.mountpoint / "model.safetensors"), name).stdout)
        first_tensor = time.monotonic() - t0
        assert out["sha"] == want and out["keys"] == 70
        served = big_origin.stats.by_path["/files/model.safetensors"]
        header_blocks = -(-header_end // BS)
        tensor_blocks = (end - 1) // BS - start // BS + 1
        window_blocks = ReadaheadConfig().initial // BS
        # +1: the kernel's read-around of the first fault may start in the block before.
        budget = (header_blocks + tensor_blocks + window_blocks + 1) * BS
        assert served.bytes <= budget, (served.bytes, sorted(served.ranges))
        assert served.bytes < size // 10
        doc = status(m.mountpoint)
        print(
            f"\nmount {m.seconds:.2f}s; mount -> first tensor {first_tensor:.2f}s "
            f"(import {out['import_s']:.2f}s, safe_open+get_tensor {out['tensor_s']:.2f}s); "
            f"origin served {served.bytes / MiB:.0f} MiB of {size / MiB:.0f} MiB in "
            f"{len(served.ranges)} request(s) (budget {budget / MiB:.0f} MiB)"
        )
        assert doc["bytes_local"] == served.bytes  # what was fetched is what is local


_BUILD = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
torch.set_num_threads(1)
cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(cfg).eval()
model.save_pretrained(sys.argv[1], max_shard_size="200KB")
ids = (torch.arange(0, 48) * 7 % 1000).reshape(1, 48)
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[2])
"""

_LOAD = r"""
import glob, mmap, os, sys
import numpy as np, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
mnt, src, ref = sys.argv[1:4]
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(mnt).eval()
ids = (torch.arange(0, 48) * 7 % 1000).reshape(1, 48)
with torch.no_grad():
    logits = model(ids).logits
assert torch.equal(logits, torch.load(ref)), "logits differ"
shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(mnt, "*.safetensors")))
assert len(shards) >= 2, shards
for name in shards:
    a, b = load_file(os.path.join(mnt, name)), load_file(os.path.join(src, name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
# numpy.memmap opens with MAP_SHARED (mmap.ACCESS_READ): needs the page cache, not direct_io.
want = open(os.path.join(src, shards[0]), "rb").read()
mm = np.memmap(os.path.join(mnt, shards[0]), dtype=np.uint8, mode="r")
assert mm._mmap is not None and bytes(mm) == want
with open(os.path.join(mnt, shards[-1]), "rb") as f:
    raw = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    assert raw[:] == open(os.path.join(src, shards[-1]), "rb").read()
print(len(shards))
"""


def test_transformers_safetensors_and_numpy_memmap_through_the_mount(tmp_path: Path) -> None:
    src = tmp_path / "tiny-llama"
    ref = tmp_path / "logits.pt"
    env = daemon_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    run_py(_BUILD, str(src), str(ref), env=env, timeout=180)
    assert (src / "model.safetensors.index.json").exists()
    with Origin(src) as origin:
        manifest = tmp_path / "m.json"
        # Upstream-style absolute names; mounted elsewhere, their common directory is removed.
        names = write_manifest(origin, src, manifest, prefix="/app/model_cache/tiny-llama/")
        with mounted(manifest, tmp_path / "mnt", tmp_path / "cache") as m:
            assert sorted(os.listdir(m.mountpoint)) == sorted(names)
            out = run_py(_LOAD, str(m.mountpoint), str(src), str(ref), env=env, timeout=180)
            assert int(out.stdout.strip()) >= 2
            for name in names:
                assert sha256_file(m.mountpoint / name) == sha256_file(src / name)
