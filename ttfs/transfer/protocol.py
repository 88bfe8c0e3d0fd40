"""Messages between the coordinator and a worker: length-prefixed JSON frames on a socketpair.

Coordinator -> worker: ``{"op": "get", ...}`` (a :class:`Job`), ``{"op": "cancel", "id": n}``.
Worker -> coordinator, per job: ``{"id", "b": block, "s": xxh3, "n": new bytes}`` for each landed
block, then one ``{"id", "end": ...}``: ``"ok"`` or the error class name from
:mod:`ttfs.errors` with its message, ``Retry-After`` and the partial block it left (block,
bytes valid, xxh3 of them) so a resume stays mid-block.

Frames are small (a block report is ~40 bytes per 2 MiB); JSON keeps them readable in a trace.
Secrets (URLs with signatures, ``Authorization``) travel in ``get`` frames over the private
socketpair only and are never logged on either side.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

_LEN = struct.Struct("<I")
MAX_FRAME = 16 * 1024 * 1024


@dataclass(slots=True)
class Job:
    """One range for a worker: GET ``[start, end)`` of ``url`` into the data file at ``path``.

    ``start`` lies in block ``block``; ``prefix`` bytes of that block are already on disk (the
    worker re-reads them to seed the block's xxh3, so the block checksum covers all of it).
    ``ino`` is the data file's inode: a file replaced since (evicted, re-created) is refused.
    """

    id: int
    path: str
    ino: int
    url: str = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    start: int
    end: int
    block: int
    prefix: int
    block_size: int
    size: int
    name: str

    def frame(self) -> bytes:
        return encode({"op": "get", **asdict(self)})

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> Job:
        fields = {k: v for k, v in msg.items() if k != "op"}
        return cls(**fields)


def encode(msg: dict[str, Any]) -> bytes:
    data = json.dumps(msg, separators=(",", ":")).encode()
    return _LEN.pack(len(data)) + data


class Decoder:
    """Splits a byte stream into messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf)
            if n > MAX_FRAME:
                raise ValueError(f"frame of {n} bytes")
            if len(self._buf) < _LEN.size + n:
                break
            out.append(json.loads(self._buf[_LEN.size : _LEN.size + n]))
            del self._buf[: _LEN.size + n]
        return out
