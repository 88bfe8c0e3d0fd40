"""One owner per cache directory, and how other ttfs processes use it.

A cache directory (its block store: data files, index, journals) belongs to one *owner* process
at a time: the one holding ``flock`` on ``<cache>/owner.lock`` (:mod:`.lock`). The owner serves
the others on a unix socket (:mod:`.server`); a ``ttfs resolve`` or ``lazy_data_resolve`` that
finds the cache owned asks the owner to complete and verify its blobs (:mod:`.client`) and then
links or copies them from the store. Nothing else ever writes a store it does not own.
"""

from .lock import OwnerInfo, OwnerLock, claim, claim_or_wait, read_owner

__all__ = ["OwnerInfo", "OwnerLock", "claim", "claim_or_wait", "read_owner"]
