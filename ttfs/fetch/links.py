"""A b10fs hot start by symlink (``TTFS_SHARED_HOTSTART=symlink``): upstream's output, checked.

truss-transfer answers a cache hit with a symlink ``D -> <b10fs>/<hash>`` and checks only the
entry's size (spec §3.11.2): no byte moves, so its hot start costs nothing whatever the
filesystem. ttfs copies by default, into a plain local file (docs/b10fs.md says why); on ext4 or
from NFS that copy is every byte of the model. With this opt-in a resolve links as upstream does,
but only to an entry it may rely on at that moment:

* an entry whose identity matches a verification record (the trust rule of docs/b10fs.md, the
  same as a trusted copy's: the replicas' record beside the entry, or this store's own), or
* one whose content hashes to the manifest hash now; the hash pass also takes the block
  checksums, so it writes both records and the next replica trusts the entry without hashing.

An entry that fails its hash is moved aside (as a copy's follower does) and the file is fetched
as on any miss; an entry written while it was checked is not linked (the copy path decides).
``--no-verify`` and hashes that cannot be checked locally leave the size rule, as upstream.
What the output gives up, being the shared file, is in docs/b10fs.md.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..blocks import BlockStore, Checker, checker_for
from ..blocks.identity import BlobKey, key_of_open
from ..blocks.shared import RECORDED_FROM, EntryRecord, SharedCache
from ..blocks.store import block_sum
from ..config import SharedTrust
from ..manifest import Pointer


class Verdict(enum.Enum):
    """What the check of an entry found."""

    LINK = "link"  # trusted, hashed, or size-checked where a hash cannot be checked
    MISSING = "missing"  # no entry, wrong size, or written while it was checked
    CORRUPT = "corrupt"  # its content does not hash to the manifest hash


@dataclass(frozen=True, slots=True)
class LinkCheck:
    verdict: Verdict
    path: Path
    hashed: bool = False
    aside: Path | None = None


def check_entry(
    cache: SharedCache, trust: SharedTrust, store: BlockStore, pointer: Pointer, *, verify: bool
) -> LinkCheck:
    """Whether the output of ``pointer`` may be a symlink to its shared entry (blocking).

    The identity is read with a fresh open before the entry's atime touch (what the records
    describe) and again after it; a change in between (a write) means no link.
    """
    path = cache.path(pointer.hash)
    before = key_of_open(path)
    entry = cache.open_entry(pointer.hash, pointer.size) if before is not None else None
    after = key_of_open(path) if entry is not None else None  # after open_entry's atime touch
    if before is None or after is None or after.content != before.content:
        return LinkCheck(Verdict.MISSING, path)
    assert entry is not None
    checker = checker_for(pointer.hashtype, pointer.hash)
    if not verify or not checker.checkable:
        return LinkCheck(Verdict.LINK, path)  # upstream's size rule
    record = cache.read_record(pointer.hash) if pointer.size >= RECORDED_FROM else None
    recorded = record is not None and record.matches(before)
    if trust == "replicas" and recorded:
        return LinkCheck(Verdict.LINK, path)
    if trust != "off" and store.key_record("shared", pointer.hash) == before:
        return LinkCheck(Verdict.LINK, path)
    good, sums = _hash_entry(path, checker, pointer.size, store.block_size)
    now = key_of_open(path)
    if now is None or now.content != after.content:
        return LinkCheck(Verdict.MISSING, path)  # written while hashed: the bytes may be either
    if not good:  # ``entry`` still names the file hashed (same inode, size, mtime)
        return LinkCheck(Verdict.CORRUPT, path, hashed=True, aside=cache.mark_corrupt(entry))
    remember(cache, store, pointer.hash, now, sums, beside=not recorded)
    return LinkCheck(Verdict.LINK, path, hashed=True)


def remember(
    cache: SharedCache,
    store: BlockStore,
    blob_id: str,
    key: BlobKey,
    sums: Sequence[int],
    *,
    beside: bool = True,
) -> None:
    """Record the entry ``<blob_id>``, with identity ``key``, as verified (blocking): in
    ``store``'s index (its own record) and, if ``beside`` and the blob is big enough to have
    one (:data:`~ttfs.blocks.shared.RECORDED_FROM`), in the replicas' record with the block
    ``sums`` at the store's block size (docs/b10fs.md, "The trust rule"). Used by a hot start
    that hashed an entry (here) and by the tier's copies and publishes."""
    store.record_key("shared", blob_id, key)
    if beside and key.size >= RECORDED_FROM:
        cache.write_record(blob_id, EntryRecord.of(key, store.block_size, sums))


def _hash_entry(path: Path, checker: Checker, size: int, block_size: int) -> tuple[bool, list[int]]:
    """The entry's content against ``checker``, and its block checksums at ``block_size`` (one
    read pass into one reused buffer; hashlib and xxhash release the GIL)."""
    hasher = checker.new(size)
    sums: list[int] = []
    view = memoryview(bytearray(block_size))
    total = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while got := _fill(fd, view):
            piece = view[:got]
            hasher.update(piece)
            sums.append(block_sum(piece))
            total += got
            if got < block_size:
                break
    finally:
        os.close(fd)
    return total == size and hasher.hexdigest() == checker.expected, sums


def _fill(fd: int, view: memoryview) -> int:
    """Read into ``view`` until it is full or the file ends; returns the bytes read."""
    got = 0
    while got < len(view) and (n := os.readv(fd, [view[got:]])):
        got += n
    return got
