"""The background prefetch plan: which byte ranges of a model to fetch first, in loader order.

A mount (and ``ttfs materialize``) fetches every byte of every file in the background at
PREFETCH priority. The *order* decides how soon a model loader stops waiting, so it follows
what loaders read first (docs/mount.md, "Prefetch order"; anchors lesson 11):

1. **Small files whole** (< :data:`SMALL_FILE_LIMIT`): ``config.json``, tokenizer files and the
   ``*.safetensors.index.json`` files that say which shard holds which tensor.
2. **Every safetensors shard's header**: the 8-byte little-endian header length, then the JSON
   header itself. Loaders open every shard (and read its header) before reading any tensor.
3. **Shard bodies** in the order of the index files' ``weight_map`` (the order in which
   transformers loads them), then the remaining shards in manifest order.
4. **Everything else** (``.bin``, ``.gguf``, large non-weight files) in manifest order.

The plan is a pure function of the pointers plus a way to read a few bytes (the caller passes
the fetcher's read at PREFETCH priority), so it is tested without a fetcher or a kernel.
:func:`initial_segments` are the ranges that can be asked for before anything was read (step 1
and the first bytes of each shard); :func:`plan` reads headers and index files and returns the
whole ordered list. Requesting segments in list order is enough: the scheduler serves blocks
of one priority first-come first-served.

A header that cannot be read or parsed is not an error here: that shard is fetched whole in
step 3, and the failure surfaces where the bytes are actually needed.
"""

from __future__ import annotations

import enum
import json
import logging
import posixpath
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from ..manifest import Pointer
from ..units import MiB

log = logging.getLogger(__name__)

SMALL_FILE_LIMIT = 16 * MiB
"""Files below this size are fetched whole first. 16 MiB covers configs, tokenizers (a 10 MiB
``tokenizer.json`` is common) and index files, and is the scheduler's background unit, so each
costs one ranged request."""

HEADER_PREFIX = 8
"""Bytes of the little-endian u64 that precedes a safetensors JSON header."""

MAX_HEADER = 100 * MiB
"""safetensors itself refuses headers above 100 MB; a bigger length means "not safetensors"."""

SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"

Reader = Callable[[Pointer, int, int], Awaitable[bytes]]
"""``await read(pointer, offset, length)``: bytes of a file (fetching them if needed)."""


class Stage(enum.IntEnum):
    """Why a segment is in the plan; also its rank (lower goes first)."""

    SMALL = 1
    HEADER = 2
    BODY = 3
    REST = 4


@dataclass(frozen=True, slots=True)
class Segment:
    """Bytes ``[start, end)`` of ``pointer``'s file, fetched at ``stage``."""

    pointer: Pointer
    start: int
    end: int
    stage: Stage


def is_shard(pointer: Pointer) -> bool:
    return pointer.file_name.endswith(SAFETENSORS_SUFFIX)


def is_index(pointer: Pointer) -> bool:
    return pointer.file_name.endswith(INDEX_SUFFIX)


def header_length(prefix: bytes, file_size: int) -> int | None:
    """The JSON header length announced by a shard's first 8 bytes, or None if implausible."""
    if len(prefix) < HEADER_PREFIX:
        return None
    (n,) = struct.unpack("<Q", prefix[:HEADER_PREFIX])
    if n == 0 or n > MAX_HEADER or HEADER_PREFIX + n > file_size:
        return None
    return int(n)


def weight_map_files(index_json: bytes, index_name: str) -> list[str]:
    """Shard file names (manifest spelling) in order of first appearance in ``weight_map``.

    ``weight_map`` values are relative to the index file's directory. An unreadable index
    yields ``[]`` (the shards then go in manifest order).
    """
    try:
        doc = json.loads(index_json)
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict):
            return []
    except (ValueError, KeyError, TypeError):
        log.info("prefetch: %s is not a usable safetensors index", index_name)
        return []
    base = posixpath.dirname(index_name)
    seen: dict[str, None] = {}
    for value in weight_map.values():
        if isinstance(value, str):
            seen.setdefault(posixpath.join(base, value) if base else value, None)
    return list(seen)


def _split(
    pointers: Sequence[Pointer], small_limit: int
) -> tuple[list[Pointer], list[Pointer], list[Pointer]]:
    small: list[Pointer] = []
    shards: list[Pointer] = []
    rest: list[Pointer] = []
    for p in pointers:
        if p.size < small_limit:
            small.append(p)
        elif is_shard(p):
            shards.append(p)
        else:
            rest.append(p)
    # Index files first among the small ones: the planner reads them.
    small.sort(key=lambda p: not is_index(p))
    return small, shards, rest


def initial_segments(
    pointers: Sequence[Pointer], *, small_limit: int = SMALL_FILE_LIMIT
) -> list[Segment]:
    """What can be requested before anything was read: small files, then shard prefixes."""
    small, shards, _ = _split(pointers, small_limit)
    segments = [Segment(p, 0, p.size, Stage.SMALL) for p in small if p.size]
    segments += [Segment(p, 0, HEADER_PREFIX, Stage.HEADER) for p in shards]
    return segments


async def plan(
    pointers: Sequence[Pointer], read: Reader, *, small_limit: int = SMALL_FILE_LIMIT
) -> list[Segment]:
    """The whole prefetch plan in fetch order (see the module docstring).

    Reads each shard's header and every index file through ``read``, concurrently. Never
    raises for unreadable headers or indexes (it falls back to whole files / manifest order);
    cancellation propagates.
    """
    small, shards, rest = _split(pointers, small_limit)
    headers: dict[str, int | None] = {}
    orders: dict[str, list[str]] = {}

    async def read_header(p: Pointer) -> None:
        try:
            prefix = await read(p, 0, HEADER_PREFIX)
        except Exception as e:  # the read path reports it; here it only changes the order
            log.info("prefetch: cannot read the header of %s: %s", p.file_name, e)
            headers[p.file_name] = None
            return
        headers[p.file_name] = header_length(prefix, p.size)

    async def read_index(p: Pointer) -> None:
        try:
            data = await read(p, 0, p.size)
        except Exception as e:
            log.info("prefetch: cannot read %s: %s", p.file_name, e)
            return
        orders[p.file_name] = weight_map_files(data, p.file_name)

    async with trio.open_nursery() as nursery:
        for p in shards:
            nursery.start_soon(read_header, p)
        for p in small:
            if is_index(p):
                nursery.start_soon(read_index, p)

    segments = [Segment(p, 0, p.size, Stage.SMALL) for p in small if p.size]
    body_start: dict[str, int] = {}
    for p in shards:
        n = headers.get(p.file_name)
        if n is None:
            body_start[p.file_name] = 0
            continue
        body_start[p.file_name] = HEADER_PREFIX + n
        segments.append(Segment(p, 0, HEADER_PREFIX + n, Stage.HEADER))

    by_name = {p.file_name: p for p in shards}
    ordered: dict[str, Pointer] = {}
    for index in small:  # index files, in manifest order
        for name in orders.get(index.file_name, ()):
            if name in by_name:
                ordered.setdefault(name, by_name[name])
    for p in shards:
        ordered.setdefault(p.file_name, p)
    for p in ordered.values():
        start = body_start[p.file_name]
        if start < p.size:
            segments.append(Segment(p, start, p.size, Stage.BODY))
    segments += [Segment(p, 0, p.size, Stage.REST) for p in rest if p.size]
    return segments
