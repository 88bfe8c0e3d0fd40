"""The prefetch planner: loader order (small files, shard headers, weight_map bodies, the rest)."""

from __future__ import annotations

import json
import struct

from tests.fakes import pointer_for
from ttfs.fetch.prefetch import (
    HEADER_PREFIX,
    Segment,
    Stage,
    header_length,
    initial_segments,
    plan,
    weight_map_files,
)
from ttfs.manifest import Pointer
from ttfs.units import MiB


def shard(header: dict[str, object], body: int) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(body)


class Files:
    """An in-memory "fetcher read" that records what the planner read."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.reads: list[tuple[str, int, int]] = []
        self.fail: set[str] = set()

    def pointers(self) -> list[Pointer]:
        return [pointer_for(name, data) for name, data in self.files.items()]

    async def read(self, pointer: Pointer, offset: int, length: int) -> bytes:
        self.reads.append((pointer.file_name, offset, length))
        if pointer.file_name in self.fail:
            raise OSError("origin down")
        return self.files[pointer.file_name][offset : offset + length]


def summary(segments: list[Segment]) -> list[tuple[str, str, int, int]]:
    return [(s.stage.name, s.pointer.file_name, s.start, s.end) for s in segments]


async def test_loader_order_small_then_headers_then_weight_map_then_rest() -> None:
    a = shard({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 17 * MiB)
    b = shard({"v": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 20 * MiB)
    index = {"weight_map": {"x": "model-00002.safetensors", "y": "model-00001.safetensors"}}
    files = Files(
        {
            "model-00001.safetensors": a,
            "big.bin": bytes(18 * MiB),
            "config.json": b"{}",
            "model-00002.safetensors": b,
            "model.safetensors.index.json": json.dumps(index).encode(),
        }
    )
    segments = await plan(files.pointers(), files.read)
    ha = HEADER_PREFIX + header_length(a[:8], len(a))  # type: ignore[operator]
    hb = HEADER_PREFIX + header_length(b[:8], len(b))  # type: ignore[operator]
    idx_len = len(files.files["model.safetensors.index.json"])
    assert summary(segments) == [
        # small files whole, index files first (the planner reads them)
        ("SMALL", "model.safetensors.index.json", 0, idx_len),
        ("SMALL", "config.json", 0, 2),
        # every shard header, manifest order
        ("HEADER", "model-00001.safetensors", 0, ha),
        ("HEADER", "model-00002.safetensors", 0, hb),
        # bodies in weight_map order: shard 2 holds the first tensor
        ("BODY", "model-00002.safetensors", hb, len(b)),
        ("BODY", "model-00001.safetensors", ha, len(a)),
        ("REST", "big.bin", 0, 18 * MiB),
    ]
    # It read exactly the 8-byte prefixes and the index, nothing of the bodies.
    assert sorted(files.reads) == [
        ("model-00001.safetensors", 0, 8),
        ("model-00002.safetensors", 0, 8),
        ("model.safetensors.index.json", 0, idx_len),
    ]


async def test_initial_segments_need_no_reads() -> None:
    files = Files({"m.safetensors": shard({}, 17 * MiB), "tokenizer.json": b"x" * 100})
    assert summary(initial_segments(files.pointers())) == [
        ("SMALL", "tokenizer.json", 0, 100),
        ("HEADER", "m.safetensors", 0, 8),
    ]


async def test_unreadable_header_or_index_falls_back_to_whole_files_in_manifest_order() -> None:
    good = shard({"a": {}}, 17 * MiB)
    files = Files(
        {
            "a.safetensors": bytes(8) + bytes(17 * MiB),  # header length 0: not safetensors
            "b.safetensors": good,
            "c.safetensors": shard({}, 17 * MiB),
            "model.safetensors.index.json": b"not json",
        }
    )
    files.fail.add("c.safetensors")
    segments = await plan(files.pointers(), files.read)
    hb = HEADER_PREFIX + header_length(good[:8], len(good))  # type: ignore[operator]
    assert [(s.stage, s.pointer.file_name, s.start) for s in segments] == [
        (Stage.SMALL, "model.safetensors.index.json", 0),
        (Stage.HEADER, "b.safetensors", 0),
        (Stage.BODY, "a.safetensors", 0),
        (Stage.BODY, "b.safetensors", hb),
        (Stage.BODY, "c.safetensors", 0),
    ]


def test_header_length_rejects_implausible_values() -> None:
    assert header_length(struct.pack("<Q", 100), 200) == 100
    assert header_length(struct.pack("<Q", 0), 200) is None
    assert header_length(struct.pack("<Q", 300), 200) is None  # beyond the file
    assert header_length(struct.pack("<Q", 2**40), 2**50) is None  # above safetensors' limit
    assert header_length(b"abc", 200) is None


def test_weight_map_names_are_relative_to_the_index_directory() -> None:
    index = {"weight_map": {"a": "s2.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}}
    raw = json.dumps(index).encode()
    assert weight_map_files(raw, "llama/model.safetensors.index.json") == [
        "llama/s2.safetensors",
        "llama/s1.safetensors",
    ]
    assert weight_map_files(raw, "model.safetensors.index.json") == [
        "s2.safetensors",
        "s1.safetensors",
    ]
    assert weight_map_files(b'{"weight_map": 3}', "x.index.json") == []
