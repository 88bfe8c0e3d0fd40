"""In-process fakes for unit tests of the core (never used where a real server is asked for)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import trio
import trio.lowlevel

from ttfs.errors import ObjectNotFound, TransientError
from ttfs.manifest import HttpResolution, Pointer
from ttfs.providers.base import Sink


def ramp(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes (fast: random.randbytes)."""
    return random.Random(seed).randbytes(size)


def pointer_for(
    name: str, data: bytes, *, hashtype: str = "sha256", digest: str | None = None
) -> Pointer:
    return Pointer(
        resolution=HttpResolution(
            url=f"http://fake.invalid/{name}", expiration_timestamp=4044816725
        ),
        uid=name,
        file_name=name,
        hashtype=hashtype,
        hash=digest or hashlib.sha256(data).hexdigest(),
        size=len(data),
    )


@dataclass
class FakeProvider:
    """Serves bytes from memory with counters, latency and injectable faults.

    ``fail_next`` transient failures are raised after ``fail_after`` bytes of the body
    (a mid-body reset); ``missing`` names files that 404; ``corrupt`` flips a byte on the way.
    """

    files: dict[str, bytes]
    latency: float = 0.0
    chunk: int = 64 * 1024
    fail_next: int = 0
    fail_after: int = 0
    missing: set[str] = field(default_factory=set)
    corrupt_times: int = 0
    gate: trio.Event | None = None
    gates: dict[str, trio.Event] = field(default_factory=dict)  # per file name
    name: str = "fake"
    calls: list[tuple[str, int, int]] = field(default_factory=list)
    bytes_served: int = 0

    async def read_range(self, pointer: Pointer, start: int, end: int, sink: Sink) -> None:
        self.calls.append((pointer.file_name, start, end))
        if self.gate is not None:
            await self.gate.wait()
        if pointer.file_name in self.gates:
            await self.gates[pointer.file_name].wait()
        if self.latency:
            await trio.sleep(self.latency)
        if pointer.file_name in self.missing:
            raise ObjectNotFound(f"404 {pointer.file_name}")
        data = self.files[pointer.file_name]
        failing = self.fail_next > 0
        if failing:
            self.fail_next -= 1
        sent = 0
        for off in range(start, end, self.chunk):
            piece = bytearray(data[off : min(end, off + self.chunk)])
            if failing and sent >= self.fail_after:
                raise TransientError("injected reset")
            if self.corrupt_times and off == start:
                self.corrupt_times -= 1
                piece[0] ^= 0xFF
            sink(memoryview(bytes(piece)))
            sent += len(piece)
            self.bytes_served += len(piece)
            await trio.lowlevel.checkpoint()
        if failing:
            raise TransientError("injected truncation")

    async def aclose(self) -> None:
        pass
