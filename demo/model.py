"""Generate a small but real Llama-style model repo for the demo, tests and benchmarks.

The files are what a Hugging Face repo holds: ``config.json``, ``generation_config.json``,
tokenizer files, ``model.safetensors.index.json`` and several safetensors shards with many
tensors. The weights are random float16 written with numpy only (no torch needed to generate),
with the exact names and shapes ``transformers``' ``LlamaForCausalLM`` expects, so
``AutoModelForCausalLM.from_pretrained`` loads it. Nothing is downloaded.

Also builds a bptr manifest for any directory served by :class:`~demo.origin.Origin`,
with the hashes the Hugging Face creator would write (sha256 for large files, git blob SHA-1
for small ones, hashtype ``etag``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LFS_THRESHOLD = 10 * 1024 * 1024  # the origin serves files >= this through the CDN redirect


@dataclass(frozen=True, slots=True)
class ModelShape:
    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    shards: int = 4

    @classmethod
    def for_size(cls, target_bytes: int, shards: int = 4) -> ModelShape:
        """A shape whose float16 weights total roughly ``target_bytes``."""
        per_layer = 2 * (2 * 1024 * 1024 + 2 * 256 * 1024 + 3 * 1024 * 2816)
        embeddings = 2 * 2 * 32000 * 1024
        layers = max(1, round((target_bytes - embeddings) / per_layer))
        return cls(num_hidden_layers=layers, shards=shards)


def _tensors(shape: ModelShape) -> Iterator[tuple[str, tuple[int, ...]]]:
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    kv = h // shape.num_attention_heads * shape.num_key_value_heads
    yield "model.embed_tokens.weight", (v, h)
    for n in range(shape.num_hidden_layers):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def generate_model(out: Path, shape: ModelShape | None = None, *, seed: int = 0) -> Path:
    """Write a sharded model repo into ``out`` (skipped when ``out/.complete`` matches)."""
    from safetensors.numpy import save_file

    shape = shape or ModelShape()
    marker = out / ".complete"
    fingerprint = json.dumps({"shape": dataclasses.asdict(shape), "seed": seed})
    if marker.exists() and marker.read_text() == fingerprint:
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = list(_tensors(shape))
    total = sum(int(np.prod(s)) * 2 for _, s in tensors)
    per_shard = -(-total // shape.shards)
    weight_map: dict[str, str] = {}
    shard: dict[str, np.ndarray[Any, Any]] = {}
    size = 0
    index = 1
    names = [f"model-{k:05d}-of-{shape.shards:05d}.safetensors" for k in range(1, 1 + shape.shards)]

    def flush() -> None:
        nonlocal shard, size, index
        if shard:
            save_file(shard, str(out / names[index - 1]), metadata={"format": "pt"})
            shard, size, index = {}, 0, index + 1

    for name, dims in tensors:
        if name.endswith("norm.weight"):
            arr = np.ones(dims, dtype=np.float16)
        else:
            arr = (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float16)
        nbytes = arr.nbytes
        if size and size + nbytes > per_shard and index < shape.shards:
            flush()
        shard[name] = arr
        weight_map[name] = names[index - 1]
        size += nbytes
    flush()
    used = sorted(set(weight_map.values()))
    for stale in names:
        if stale not in used:
            (out / stale).unlink(missing_ok=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 16}, indent=2)
    )
    vocab = {f"tok{k}": k for k in range(min(shape.vocab_size, 2000))}
    (out / "tokenizer.json").write_text(
        json.dumps(
            {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "tok0"}}
        )
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "tok1", "eos_token": "tok2", "model_max_length": 2048})
    )
    marker.write_text(fingerprint)
    return out


def git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(
    files: dict[str, Path], urls: dict[str, str], *, model_path: str = "", volume_folder: str = ""
) -> dict[str, Any]:
    """A bptr manifest for ``files`` (relative name -> local path) served at ``urls``.

    With ``model_path`` the file names are absolute ``{model_path}/{volume_folder}/{name}`` like
    the upstream creator writes; without, they are relative to the download dir.
    """
    pointers = []
    for rel, path in sorted(files.items()):
        size = path.stat().st_size
        digest = sha256_file(path) if size >= LFS_THRESHOLD else git_blob_sha1(path)
        if model_path:
            file_name = os.path.join(model_path, volume_folder, rel)
        else:
            file_name = os.path.join(volume_folder, rel) if volume_folder else rel
        pointers.append(
            {
                "resolution": {
                    "resolution_type": "http",
                    "url": urls[rel],
                    "expiration_timestamp": 4044816725,
                },
                "uid": f"demo:{rel}",
                "file_name": file_name,
                "hashtype": "etag",
                "hash": digest,
                "size": size,
                "runtime_secret_name": "hf_access_token",
            }
        )
    return {"pointers": pointers, "models": None}


def model_files(root: Path) -> dict[str, Path]:
    """Every regular file under ``root`` (relative name -> path), skipping dot files."""
    return {
        str(p.relative_to(root)): p
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }
