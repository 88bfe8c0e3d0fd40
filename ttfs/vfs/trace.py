"""Access traces: the order in which a model's blocks were first read, replayed on the next
cold start so the bytes a loader wants arrive before it asks (docs/mount.md, "Access traces").

None of the anchors (hf-mount, Mountpoint-S3, gcsfuse, rclone, truss-transfer) keep one; the
closest is stargz's prefetch landmark, which the image builder must record by hand. Here every
mount records its own:

* **Key.** A trace belongs to one *model*: the sha256 of the manifest's sorted
  ``(file_name, hash, size)`` triples (:func:`manifest_digest`). URLs are left out, so a
  re-signed manifest keeps its trace; any change of a file, hash or size is another model.
* **What is recorded.** The first read of each block through the mount, in order, run-length
  encoded as ``[blob hash, first block, last block]`` (a sequential read of a 1 GiB shard is
  one entry). Present or not: a replayed trace makes the blocks present, and the next
  recording must still see the loader's order.
* **Where.** ``<cache>/traces/<digest>.json``, and with a shared cache (b10fs)
  ``<shared>/.ttfs-traces/<digest>.json`` (a subdirectory: the b10fs cleanup and truss-transfer
  only look at the directory's files). Both are written to a temporary name and renamed.
* **Chosen.** The local trace, else the shared one. A trace whose version, digest or block
  size does not match is ignored (logged); entries naming a blob the manifest lacks or blocks
  past its end are dropped.
* **Replaced.** A mount saves its recording after reads stop for :data:`SAVE_QUIET` seconds
  and at unmount, when it covers more blocks than the trace it started with (a full load
  replaces a partial one; a warm restart whose reads hit the page cache never shrinks one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..blocks import perms
from ..manifest import Pointer

log = logging.getLogger(__name__)

VERSION = 1
LOCAL_DIR = "traces"
SHARED_DIR = ".ttfs-traces"
SAVE_QUIET = 5.0
"""Seconds without a newly read block after which a grown recording is saved: a loader's
reads come in bursts a fraction of a second apart, and a finished load stays quiet."""


def manifest_digest(pointers: Iterable[Pointer]) -> str:
    """The model key: sha256 of the sorted ``file_name\\0hash\\0size`` lines."""
    lines = sorted(f"{p.file_name}\0{p.hash}\0{p.size}" for p in pointers)
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass(slots=True)
class Trace:
    """Blocks in first-read order, as runs ``(blob id, first block, last block)``."""

    digest: str
    block_size: int
    runs: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def blocks(self) -> int:
        return sum(last - first + 1 for _, first, last in self.runs)

    def dumps(self) -> str:
        return json.dumps(
            {
                "version": VERSION,
                "manifest": self.digest,
                "block_size": self.block_size,
                "runs": [list(r) for r in self.runs],
            },
            separators=(",", ":"),
        )

    @classmethod
    def parse(
        cls, text: str, digest: str, block_size: int, n_blocks: Mapping[str, int]
    ) -> tuple[Trace | None, str]:
        """The trace in ``text`` for this model, or None and why it is ignored.

        ``n_blocks`` maps every blob of the current manifest to its block count; runs naming
        other blobs or blocks past the end are dropped (the rest is still a good order).
        """
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict):
                return None, "not a trace document"
            if doc.get("version") != VERSION:
                return None, f"version {doc.get('version')!r} (expected {VERSION})"
            if doc.get("manifest") != digest:
                return None, "recorded for another manifest"
            if doc.get("block_size") != block_size:
                return None, f"block size {doc.get('block_size')} (now {block_size})"
            runs: list[tuple[str, int, int]] = []
            for blob_id, first, end in doc["runs"]:
                n = n_blocks.get(blob_id)
                if n is None or not isinstance(first, int) or not isinstance(end, int):
                    continue
                last = min(end, n - 1)
                if 0 <= first <= last:
                    runs.append((str(blob_id), first, last))
        except (ValueError, KeyError, TypeError) as e:
            return None, f"unreadable ({e})"
        return cls(digest, block_size, runs), "ok"


class Recorder:
    """Collects the first read of each block, in order (cheap: one set lookup per block).

    It records from the mount's first read on; the trace is named (:meth:`name`) once the
    manifest's digest is computed, before anything is saved.
    """

    def __init__(self, digest: str = "", block_size: int = 0) -> None:
        self.trace = Trace(digest, block_size)
        self._seen: set[tuple[str, int]] = set()

    def name(self, digest: str, block_size: int) -> None:
        self.trace.digest, self.trace.block_size = digest, block_size

    def on_read(self, blob_id: str, blocks: range) -> None:
        runs = self.trace.runs
        for index in blocks:
            key = (blob_id, index)
            if key in self._seen:
                continue
            self._seen.add(key)
            if runs and runs[-1][0] == blob_id and runs[-1][2] == index - 1:
                runs[-1] = (blob_id, runs[-1][1], index)
            else:
                runs.append((blob_id, index, index))

    @property
    def blocks(self) -> int:
        return len(self._seen)


class TraceStore:
    """The trace files of one cache directory and, optionally, of the shared cache."""

    def __init__(self, cache_dir: Path, shared_dir: Path | None = None) -> None:
        self.local = cache_dir / LOCAL_DIR
        self.shared = shared_dir / SHARED_DIR if shared_dir is not None else None

    def _paths(self, digest: str) -> list[tuple[str, Path]]:
        paths = [("local", self.local / f"{digest}.json")]
        if self.shared is not None:
            paths.append(("shared", self.shared / f"{digest}.json"))
        return paths

    def load(
        self, digest: str, block_size: int, n_blocks: Mapping[str, int]
    ) -> tuple[Trace | None, str]:
        """The trace to replay and where it came from (``local``, ``shared``, or ``none``).

        Blocking (it may read a network filesystem): call it from a worker thread.
        """
        for where, path in self._paths(digest):
            try:
                text = path.read_text()
            except OSError:
                continue
            trace, why = Trace.parse(text, digest, block_size, n_blocks)
            if trace is not None and trace.runs:
                return trace, where
            log.info("ignoring the %s access trace %s: %s", where, path, why)
        return None, "none"

    def save(self, trace: Trace) -> list[str]:
        """Write the trace locally and to the shared cache; return where it was written.

        Blocking; never raises (a trace is an optimisation: failing to keep one is logged).
        """
        text = trace.dumps()
        written: list[str] = []
        for where, path in self._paths(trace.digest):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                if where == "local":  # in the private cache: names a private model's files
                    perms.make_private_dir(path.parent)
                    with open(
                        perms.open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w"
                    ) as f:
                        f.write(text)
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp.write_text(text)
                os.replace(tmp, path)
                written.append(where)
            except OSError as e:
                log.warning("cannot write the %s access trace %s: %s", where, path, e)
                with contextlib.suppress(OSError):
                    tmp.unlink()
        return written


def block_counts(pointers: Sequence[Pointer], block_size: int) -> dict[str, int]:
    """Blob id -> number of blocks, for :meth:`TraceStore.load`."""
    return {p.hash: max(1, -(-p.size // block_size)) if p.size else 0 for p in pointers}
