"""The owner side: serve other ttfs processes' blob requests from this process's fetcher.

While it runs, the owner of a cache directory listens on a unix socket (recorded in the owner
lock) and completes and verifies the blobs a client names, through the same fetcher its own
work uses: the single-flight queue then guarantees that a blob two processes want is fetched
once. The client links or copies the verified data file itself, so bytes never cross the
socket. The blobs stay open in the fetcher (hence never evicted) until the owner exits.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

if sys.version_info < (3, 11):  # the builtin arrived in 3.11; trio depends on the backport
    from exceptiongroup import BaseExceptionGroup

from ..errors import ManifestError, TtfsError
from ..fetch import Fetcher, Priority
from ..manifest import Pointer, parse_manifest
from .lock import OwnerLock, socket_path
from .protocol import LineStream, ProtocolError

log = logging.getLogger(__name__)


async def _complete_one(fetcher: Fetcher, pointer: Pointer, lines: LineStream) -> None:
    try:
        source = await fetcher.add(pointer)
        before = source.origin_bytes
        await fetcher.complete(source, Priority.PREFETCH)
        await fetcher.settled(source)
    except TtfsError as e:
        await lines.send(
            {"event": "failed", "hash": pointer.hash, "error": type(e).__name__, "message": str(e)}
        )
        return
    await lines.send(
        {
            "event": "done",
            "hash": pointer.hash,
            "path": str(source.blob.path),
            "origin_bytes": source.origin_bytes - before,
        }
    )


def _outputs_match(fetcher: Fetcher, items: list[dict[str, Any]]) -> list[bool]:
    store = fetcher.store
    return [
        store.output_matches(Path(str(i["path"])), str(i["hash"]), int(i["size"])) for i in items
    ]


def _record_outputs(fetcher: Fetcher, items: list[dict[str, Any]]) -> None:
    for item in items:
        try:
            fetcher.store.record_output(Path(str(item["path"])), str(item["hash"]))
        except OSError as e:  # the client's path may not be visible here (another namespace)
            log.debug("cannot record output %s: %s", item.get("path"), e)


async def _outputs(fetcher: Fetcher, request: dict[str, Any], lines: LineStream) -> None:
    items = request.get("items")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        await lines.send({"event": "error", "message": "items must be a list of objects"})
        return
    try:
        if request["op"] == "outputs_match":
            results = await trio.to_thread.run_sync(_outputs_match, fetcher, items)
            await lines.send({"event": "matches", "results": results})
        else:
            await trio.to_thread.run_sync(_record_outputs, fetcher, items)
            await lines.send({"event": "recorded"})
    except (KeyError, TypeError, ValueError) as e:
        await lines.send({"event": "error", "message": f"bad item: {e}"})


async def _handle(fetcher: Fetcher, stream: trio.SocketStream) -> None:
    lines = LineStream(stream)
    try:
        request = await lines.receive()
        if request is None:
            return
        if request.get("op") in ("outputs_match", "record_outputs"):
            await _outputs(fetcher, request, lines)
            return
        if request.get("op") != "complete":
            await lines.send({"event": "error", "message": f"unknown op {request.get('op')!r}"})
            return
        try:
            manifest = parse_manifest(
                json.dumps({"pointers": request.get("pointers", [])}), source="client", fmt="json"
            )
        except ManifestError as e:
            await lines.send({"event": "error", "message": str(e)})
            return
        client = str(request.get("client", "?"))[:200]
        unique = {p.hash: p for p in manifest.pointers}
        log.info("serving %d blob(s) to %s", len(unique), client)
        async with trio.open_nursery() as nursery:
            for pointer in unique.values():
                nursery.start_soon(_complete_one, fetcher, pointer, lines)
        await lines.send({"event": "end"})
    except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
        log.info("an owner client went away: %s", e)
    finally:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()


@asynccontextmanager
async def serving(fetcher: Fetcher, lock: OwnerLock) -> AsyncIterator[None]:
    """Serve clients for the duration of the block, then remove the socket.

    Where the socket cannot be created (a read-only directory), the owner runs without it and
    other processes wait for it instead, as before this existed.
    """
    path = socket_path(lock.cache_dir)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a dead owner's socket: we hold the lock, so it is not live
        await sock.bind(str(path))
        sock.listen(64)
    except OSError as e:
        sock.close()
        log.warning("cannot serve other processes on %s: %s", path, e)
        yield
        return
    lock.advertise(path)
    try:
        async with trio.open_nursery() as nursery:
            listener = trio.SocketListener(sock)
            nursery.start_soon(
                trio.serve_listeners, lambda stream: _handle(fetcher, stream), [listener]
            )
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps what the body raised; callers catch TtfsError: hand it back alone.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        sock.close()
        try:
            os.unlink(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.debug("cannot remove %s: %s", path, e)
