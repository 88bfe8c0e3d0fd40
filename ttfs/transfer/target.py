"""What a worker needs from a provider: the resolved target of a pointer.

Kept here, below ``providers`` and free of httpx, so the fetch layer can ask for targets without
importing the providers package (a mount imports httpx only once it serves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..manifest import Pointer


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
