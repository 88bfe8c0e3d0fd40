"""The client side: ask the owner of a cache directory to complete and verify blobs.

Used by ``ttfs resolve`` / ``lazy_data_resolve`` when another process (a mount, another resolve)
owns the cache: the owner fetches through its own single-flight queue and reports each verified
blob's data file, which the caller then links or copies into place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .. import errors
from ..errors import TtfsError
from ..manifest import Pointer
from .lock import OwnerInfo, this_command
from .protocol import LineStream, ProtocolError


class OwnerGone(Exception):
    """The owner cannot serve us (no socket, refused, or it went away mid-way).

    ``connected`` says whether it had been serving us: then its successor may be us.
    """

    def __init__(self, message: str, *, connected: bool) -> None:
        super().__init__(message)
        self.connected = connected


@dataclass(frozen=True, slots=True)
class Completed:
    """A blob the owner verified: its data file in the owner's store."""

    blob_id: str
    path: Path
    origin_bytes: int


def _error(name: str, message: str) -> TtfsError:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, TtfsError) and cls is not errors.DownloadError:
        try:
            return cls(message)
        except TypeError:
            pass
    return TtfsError(message)


async def complete_via_owner(
    owner: OwnerInfo,
    pointers: Sequence[Pointer],
    on_done: Callable[[Completed], Awaitable[None]],
) -> None:
    """Have ``owner`` complete every blob of ``pointers``; ``on_done`` runs as each is verified
    (in a task of its own; it must not raise: it records its own failures).

    Raises:
        OwnerGone: the owner does not serve clients or went away before the end.
        DownloadError: the owner could not fetch or verify a blob (its cause is the owner's
            error class).
        TtfsError: the owner refused the request.
    """
    if not owner.socket:
        raise OwnerGone(f"{owner.describe()} does not serve other processes", connected=False)
    try:
        stream = await trio.open_unix_socket(owner.socket)
    except OSError as e:
        raise OwnerGone(f"cannot reach {owner.describe()}: {e}", connected=False) from e
    lines = LineStream(stream)
    unique = {p.hash: p for p in pointers}
    failure: BaseException | None = None
    async with stream, trio.open_nursery() as nursery:
        try:
            await lines.send(
                {
                    "op": "complete",
                    "client": f"pid {os.getpid()} ({this_command()})",
                    "pointers": [p.to_json() for p in unique.values()],
                }
            )
            while failure is None:
                message = await lines.receive()
                if message is None:
                    failure = OwnerGone(f"{owner.describe()} went away", connected=True)
                    break
                event = message.get("event")
                if event == "end":
                    break
                if event == "done":
                    path = Path(str(message["path"]))
                    sent = int(message.get("origin_bytes", 0))
                    nursery.start_soon(on_done, Completed(str(message["hash"]), path, sent))
                elif event == "failed":
                    cause = _error(str(message.get("error")), str(message.get("message")))
                    pointer = unique.get(str(message.get("hash")))
                    name = pointer.file_name if pointer is not None else "(a blob)"
                    failure = errors.DownloadError(name, cause)
                else:
                    failure = TtfsError(f"the cache owner refused: {message.get('message')}")
        except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, KeyError) as e:
            failure = OwnerGone(f"lost {owner.describe()}: {e}", connected=True)
        if failure is not None:
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _ask(owner: OwnerInfo, request: dict[str, Any]) -> dict[str, Any]:
    """One short request and its one answer.

    Raises:
        OwnerGone: the owner cannot be reached or did not answer.
    """
    if not owner.socket:
        raise OwnerGone(f"{owner.describe()} does not serve other processes", connected=False)
    try:
        stream = await trio.open_unix_socket(owner.socket)
    except OSError as e:
        raise OwnerGone(f"cannot reach {owner.describe()}: {e}", connected=False) from e
    async with stream:
        lines = LineStream(stream)
        try:
            await lines.send(request)
            answer = await lines.receive()
        except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise OwnerGone(f"lost {owner.describe()}: {e}", connected=True) from e
    if answer is None:
        raise OwnerGone(f"{owner.describe()} went away", connected=True)
    return answer


async def outputs_match(owner: OwnerInfo, items: Sequence[tuple[Path, Pointer]]) -> list[bool]:
    """Which destinations are, by the owner's records (inode, mtime), the verified files an
    earlier resolve produced. False for all when the owner cannot say.
    """
    if not items:
        return []
    request = {
        "op": "outputs_match",
        "items": [{"path": str(d), "hash": p.hash, "size": p.size} for d, p in items],
    }
    try:
        answer = await _ask(owner, request)
    except OwnerGone:
        return [False] * len(items)
    results = answer.get("results")
    if not isinstance(results, list) or len(results) != len(items):
        return [False] * len(items)
    return [r is True for r in results]


async def record_outputs(owner: OwnerInfo, items: Sequence[tuple[Path, str]]) -> None:
    """Ask the owner to remember placed outputs (best effort: a later run hashes instead)."""
    if not items:
        return
    request = {"op": "record_outputs", "items": [{"path": str(d), "hash": h} for d, h in items]}
    with contextlib.suppress(OwnerGone):
        await _ask(owner, request)
