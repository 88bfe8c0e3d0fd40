"""The verification follower: hash a blob in order while it downloads, then accept or discard it.

One task per blob being fetched (started by the blob's first request) hashes the contiguous
prefix of present blocks in a worker thread (sha256 / git blob SHA-1 / md5; hashlib releases
the GIL), so by the time the last block lands only the tail is left to hash instead of the
whole blob. A mismatch discards the blob and asks for it once more; a second mismatch fails it
with :class:`~ttfs.errors.IntegrityError`. A corrupt shared-cache entry is not the origin's
fault and costs no attempt. A blob becoming done calls the fetcher's done listeners.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..blocks import BlockStore
from ..errors import IntegrityError, TtfsError
from .runs import Counters

if TYPE_CHECKING:
    from .source import Source
    from .tiers import SharedTier

log = logging.getLogger(__name__)

# Blocks hashed per trip to the thread pool (32 x 2 MiB).
_SPAN = 32


class Verifier:
    """Runs the follower of each blob; ``refetch`` queues a discarded blob again."""

    def __init__(
        self,
        store: BlockStore,
        tier: SharedTier | None,
        verify: bool,
        refetch: Callable[[Source], None],
        notify: Callable[[Source], None],
        counters: Counters | None = None,
        done_listeners: list[Callable[[Source], None]] | None = None,
    ) -> None:
        self.counters = counters if counters is not None else Counters()
        self.store = store
        self.tier = tier
        self.verify = verify
        self.refetch = refetch
        self.notify = notify
        self.done_listeners = done_listeners if done_listeners is not None else []

    def must_verify(self, source: Source) -> bool:
        return self.verify and source.blob.spec.checker.checkable

    async def follow(self, source: Source) -> None:
        """Hash the blob while it downloads, then mark it verified (or discard it)."""
        blob = source.blob
        checker = blob.spec.checker
        verify = self.must_verify(source)
        tier = self.tier
        try:
            while True:
                hasher = checker.new(blob.size) if verify else None
                shared_before = source.shared_bytes
                trusted: bool | None = None  # decided when the first blocks have landed
                k = 0
                while k < blob.n_blocks:
                    if not blob.present[k]:
                        await source.changed.wait()
                        continue
                    if trusted is None:
                        trusted = hasher is not None and tier is not None and tier.trusted(source)
                    j = k + 1
                    while j < blob.n_blocks and blob.present[j] and j - k < _SPAN:
                        j += 1
                    if hasher is not None and not trusted:
                        # Mapped: the blob is not linked anywhere yet (Blob.hash_blocks says why).
                        await trio.to_thread.run_sync(
                            functools.partial(blob.hash_blocks, hasher, k, j, mapped=True)
                        )
                    k = j
                if trusted and hasher is not None:
                    assert tier is not None
                    if await tier.confirm_trust(source):
                        self.counters.shared_trusted += 1
                    elif tier.borrowed_sums(source):
                        # The block checksums came with the record, not from these bytes: a
                        # hash could pass the bytes but not them. Start over from the origin.
                        tier.on_changed(source)
                        log.warning(
                            "%s: its b10cache entry changed while it was copied; discarding "
                            "and fetching it from the origin",
                            source.pointer.file_name,
                        )
                        await trio.to_thread.run_sync(blob.discard)
                        source.discards += 1
                        self.refetch(source)
                        continue
                    else:
                        trusted = False  # written, replaced or mixed with other bytes: hash
                        await trio.to_thread.run_sync(blob.hash_blocks, hasher, 0, blob.n_blocks)
                if hasher is None or trusted or hasher.hexdigest() == checker.expected:
                    if hasher is not None:
                        blob.verified = True
                        self.counters.blobs_verified += 1
                    await trio.to_thread.run_sync(self.store.mark_verified, blob)
                    source.done.set()
                    if trusted:
                        log.info(
                            "verified %s (%s, recorded for its unchanged b10cache entry)",
                            source.pointer.file_name,
                            checker.algorithm,
                        )
                    elif hasher is not None:
                        log.info("verified %s (%s)", source.pointer.file_name, checker.algorithm)
                    if tier is not None:
                        tier.on_done(source)
                    for on_done in self.done_listeners:
                        on_done(source)
                    return
                self.counters.errors["IntegrityError"] += 1
                if tier is None or not await tier.on_mismatch(source, shared_before):
                    source.verify_attempts += 1
                if source.verify_attempts >= 2:
                    self.counters.blobs_failed += 1
                    source.failure = IntegrityError(
                        f"{source.pointer.file_name}: content does not match "
                        f"{checker.algorithm} {checker.expected} (fetched twice)"
                    )
                    log.error("%s", source.failure)
                    if tier is not None:
                        tier.on_failed(source)
                    return
                log.warning(
                    "%s: %s mismatch; discarding and fetching again",
                    source.pointer.file_name,
                    checker.algorithm,
                )
                await trio.to_thread.run_sync(blob.discard)
                source.discards += 1
                self.refetch(source)
        except TtfsError as e:
            source.failure = e
            log.error("cannot verify %s: %s", source.pointer.file_name, e)
            if tier is not None:
                tier.on_failed(source)
        finally:
            self.notify(source)
