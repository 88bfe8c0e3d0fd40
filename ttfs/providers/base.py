"""The one small interface every origin implements.

A provider turns a manifest pointer into bytes: ``read_range(pointer, start, end, sink)`` streams
``[start, end)`` of the object into ``sink`` in order, in chunks of a few hundred KiB, and raises
a :class:`~ttfs.errors.ProviderError` subclass when it cannot. It does not retry transient
failures itself: the scheduler owns retries so that a broken body resumes at the first block that
did not land, not at the start of the range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..manifest import Pointer

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


@dataclass(frozen=True, slots=True)
class WireTarget:
    """Where a worker process GETs a pointer's bytes: a final URL and the headers to send.

    Both may carry credentials (a signed query, ``Authorization``): never logged, hidden from
    ``repr``.
    """

    url: str = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)


@runtime_checkable
class WireProvider(Protocol):
    """A provider whose ranges a worker process can fetch (the coordinator resolves, signs)."""

    async def wire_target(self, pointer: Pointer) -> WireTarget | None:
        """The resolved target of ``pointer``, or None when a range must go in process first
        (a redirect not followed yet: that range follows it and caches the result)."""
        ...

    def forget_wire_target(self, pointer: Pointer) -> None:
        """Drop a cached target a worker was refused with (expired URL or token)."""
        ...


def redact_url(url: str) -> str:
    """A URL safe to log: no query string (signatures, tokens) and no userinfo."""
    base = url.split("?", 1)[0].split("#", 1)[0]
    scheme, sep, rest = base.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
