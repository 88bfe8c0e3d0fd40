"""Block store: sparse data files per blob, presence index, verification, eviction."""

from . import perms
from .hashing import Checker, checker_for
from .store import Blob, BlobSpec, BlockStore, RunWriter, StoreStatistics

__all__ = [
    "Blob",
    "BlobSpec",
    "BlockStore",
    "Checker",
    "RunWriter",
    "StoreStatistics",
    "checker_for",
    "perms",
]
