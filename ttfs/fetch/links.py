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
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ..blocks import BlockStore, checker_for
from ..blocks.identity import BlobKey, key_of_open
from ..blocks.shared import RECORDED_FROM, EntryRecord, SharedCache
from ..config import SharedTrust
from ..manifest import Pointer

log = logging.getLogger(__name__)


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
    if before is None or cache.open_entry(pointer.hash, pointer.size) is None:  # + atime touch
        return LinkCheck(Verdict.MISSING, path)
    after = key_of_open(path)
    if after is None or after.content != before.content:
        return LinkCheck(Verdict.MISSING, path)
    checker = checker_for(pointer.hashtype, pointer.hash)
    if not verify or not checker.checkable:
        return LinkCheck(Verdict.LINK, path)  # upstream's size rule (logged by the caller)
    record = cache.read_record(pointer.hash) if pointer.size >= RECORDED_FROM else None
    recorded = record is not None and record.matches(before)
    if trust == "replicas" and recorded:
        return LinkCheck(Verdict.LINK, path)
    if trust != "off" and store.key_record("shared", pointer.hash) == before:
        return LinkCheck(Verdict.LINK, path)
    good, sums = _hash_entry(path, pointer, store.block_size)
    now = key_of_open(path)
    if now is None or now.content != after.content:
        return LinkCheck(Verdict.MISSING, path)  # written while hashed: the bytes may be either
    if not good:
        entry = cache.open_entry(pointer.hash, pointer.size)
        aside = cache.mark_corrupt(entry) if entry is not None else None
        return LinkCheck(Verdict.CORRUPT, path, hashed=True, aside=aside)
    _remember(cache, store, pointer, now, sums, recorded)
    return LinkCheck(Verdict.LINK, path, hashed=True)


def _hash_entry(path: Path, pointer: Pointer, block_size: int) -> tuple[bool, tuple[int, ...]]:
    """The entry's content against the manifest hash, and its block checksums at ``block_size``
    (one read pass into one reused buffer; hashlib and xxhash release the GIL)."""
    checker = checker_for(pointer.hashtype, pointer.hash)
    hasher = checker.new(pointer.size)
    sums: list[int] = []
    buf = bytearray(block_size)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        total = 0
        while True:
            got = 0
            while got < block_size:
                n = os.readv(fd, [view[got:]])
                if n == 0:
                    break
                got += n
            if got == 0:
                break
            piece = view[:got]
            hasher.update(piece)
            sums.append(xxhash.xxh3_64_intdigest(piece))
            total += got
            if got < block_size:
                break
    finally:
        os.close(fd)
    return total == pointer.size and hasher.hexdigest() == checker.expected, tuple(sums)


def _remember(
    cache: SharedCache,
    store: BlockStore,
    pointer: Pointer,
    key: BlobKey,
    sums: tuple[int, ...],
    recorded: bool,
) -> None:
    """Record a hashed entry as verified, in this store and beside the entry (the trust rule):
    the next hot start of any replica links or copies it without hashing."""
    store.record_key("shared", pointer.hash, key)
    if not recorded and pointer.size >= RECORDED_FROM:
        cache.write_record(
            pointer.hash, EntryRecord(key.ino, key.size, key.mtime_ns, store.block_size, sums)
        )


def place_symlink(target: Path, dest: Path) -> None:
    """Make ``dest`` a symlink to ``target`` (absolute) atomically: a temporary name beside it,
    then a rename over whatever was there (a file, an older link; never through it)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_dir() and not dest.is_symlink():
        raise IsADirectoryError(f"destination is a directory: {dest}")
    tmp = dest.parent / f".{dest.name}.ttfs-{os.getpid()}-{os.urandom(4).hex()}.tmp"
    os.symlink(os.path.abspath(target), tmp)
    try:
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
