"""The one small interface every origin implements.

A provider turns a manifest pointer into bytes: ``read_range(pointer, start, end, sink)`` streams
``[start, end)`` of the object into ``sink`` in order, in chunks of a few hundred KiB, and raises
a :class:`~ttfs.errors.ProviderError` subclass when it cannot. It does not retry transient
failures itself: the scheduler owns retries so that a broken body resumes at the first block that
did not land, not at the start of the range.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..manifest import Pointer
from ..transfer.target import WireProvider, WireTarget

__all__ = ["Provider", "Sink", "WireProvider", "WireTarget", "redact_url"]

Sink = Callable[[memoryview], None]


class Provider(Protocol):
    """A read-only origin. One instance serves every pointer of its resolution type."""

    name: str

    async def read_range(self, pointer: Pointer, start: int, end: int, sink: Sink) -> None:
        """Stream bytes ``[start, end)`` of the pointer's object into ``sink``.

        Raises:
            TransientError: worth retrying (timeout, reset, short body, 408/429/5xx).
            ObjectNotFound, AccessDenied, StaleManifest: permanent for this pointer.
        """
        ...

    async def aclose(self) -> None: ...


def redact_url(url: str) -> str:
    """A URL safe to log: no query string (signatures, tokens) and no userinfo."""
    base = url.split("?", 1)[0].split("#", 1)[0]
    scheme, sep, rest = base.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
