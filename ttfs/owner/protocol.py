"""The owner's wire format: one JSON object per line over a unix stream socket.

A client sends one request and reads events until ``end``::

    -> {"op": "complete", "client": "...", "pointers": [<pointer as in a manifest>, ...]}
    <- {"event": "done", "hash": h, "path": "<data file>", "origin_bytes": n}   per blob
    <- {"event": "failed", "hash": h, "error": "IntegrityError", "message": "..."}
    <- {"event": "end"}

Two short requests let a client use the owner's record of the outputs it placed (resolve's
"skip a destination that is the file an earlier resolve produced", by inode and mtime)::

    -> {"op": "outputs_match", "items": [{"path": p, "hash": h, "size": n}, ...]}
    <- {"event": "matches", "results": [true, false, ...]}
    -> {"op": "record_outputs", "items": [{"path": p, "hash": h}, ...]}
    <- {"event": "recorded"}

Pointers travel in manifest form and the owner parses them with the manifest validator, so a
client cannot make the owner fetch anything a manifest could not name. A client that closes the
socket early cancels nothing the owner shares with others; the owner simply stops reporting.
"""

from __future__ import annotations

import json
from typing import Any

import trio

MAX_LINE = 64 * 1024 * 1024  # a manifest of ~200k pointers


class ProtocolError(Exception):
    """The peer sent something that is not a line of JSON, or hung up mid-line."""


class LineStream:
    """JSON lines over a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        async with self._send_lock:
            await self.stream.send_all(data)

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None at a clean end of stream.

        Raises:
            ProtocolError: a line too long, not JSON, or cut off by the peer.
        """
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                try:
                    message = json.loads(line)
                except ValueError as e:
                    raise ProtocolError(f"not JSON: {e}") from e
                if not isinstance(message, dict):
                    raise ProtocolError("not a JSON object")
                return message
            if len(self._buf) > MAX_LINE:
                raise ProtocolError("line too long")
            chunk = await self.stream.receive_some(1 << 20)
            if not chunk:
                if self._buf:
                    raise ProtocolError("connection closed mid-message")
                return None
            self._buf += chunk
