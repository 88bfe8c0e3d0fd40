"""Byte progress for resolve and materialize: one updating line on a TTY, plain lines otherwise.

Kept separate from the work it reports on: callers pass a ``done()`` callable and run
:meth:`Progress.run` in their nursery; nothing here knows about blocks or HTTP.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

import trio

from ..units import format_size


class Progress:
    """Reports ``done()`` against ``total`` bytes every ``interval`` seconds."""

    def __init__(
        self,
        total: int,
        *,
        label: str,
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval: float | None = None,
    ) -> None:
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval if interval is not None else (0.25 if self.tty else 5.0)
        self._start = time.monotonic()
        self._last = (self._start, 0)
        self._printed = False

    def line(self, done: int) -> str:
        now = time.monotonic()
        elapsed = max(now - self._start, 1e-9)
        last_t, last_done = self._last
        current = (done - last_done) / max(now - last_t, 1e-9)
        self._last = (now, done)
        pct = 100.0 * done / self.total if self.total else 100.0
        avg = done / elapsed
        eta = (self.total - done) / avg if avg > 0 and done < self.total else 0.0
        return (
            f"{self.label}: {format_size(done)} / {format_size(self.total)} ({pct:5.1f}%) "
            f"avg {avg / 1e6:.1f} MB/s, now {current / 1e6:.1f} MB/s, eta {eta:.0f}s"
        )

    def show(self, done: int) -> None:
        text = self.line(done)
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._printed = True

    def finish(self, done: int) -> None:
        self.show(done)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    async def run(self, done: Callable[[], int]) -> None:
        """Print until cancelled."""
        while True:
            await trio.sleep(self.interval)
            self.show(done())
