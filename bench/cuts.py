"""Proposed hot-path cuts, applied as monkeypatches so they can be measured without editing the
core: ``python -m bench.cuts NAME[+NAME...] <ttfs CLI args>`` applies the patches, then runs
the ttfs CLI. :mod:`bench.profile` ``--patch NAME`` compares them with the baseline.

Cuts (see bench/PROFILE.md for the measurements):

``read1m``
    httpcore reads the socket ``READ_NUM_BYTES`` at a time and every read pays a fixed price
    (h11 event, two context managers and a trio cancel scope in httpcore's trio backend).
    ttfs raises it from 64 KiB to 256 KiB in ``providers/_stream.py``; this raises it to 1 MiB.

``h11nocopy``
    h11's ``ReceiveBuffer.maybe_extract_at_most`` slices the buffer once to test for
    emptiness and throws the copy away, then ``_extract`` slices it again: with the append in
    ``__iadd__`` every body byte is copied three times in Python's allocator. When the whole
    buffer is body (the usual case for a large range), hand the buffer itself over instead:
    one copy per byte instead of three, same bytes, same types.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def read1m() -> None:
    from httpcore._async.http11 import AsyncHTTP11Connection

    AsyncHTTP11Connection.READ_NUM_BYTES = 1 << 20


def h11nocopy() -> None:
    from h11._receivebuffer import ReceiveBuffer

    extract = ReceiveBuffer._extract

    def maybe_extract_at_most(self: Any, count: int) -> bytearray | None:
        data: bytearray = self._data
        if not data:
            return None
        if len(data) <= count:
            self._data = bytearray()
            self._next_line_search = 0
            self._multiple_lines_search = 0
            return data
        return extract(self, count)

    ReceiveBuffer.maybe_extract_at_most = maybe_extract_at_most  # type: ignore[method-assign]


CUTS: dict[str, Callable[[], None]] = {"read1m": read1m, "h11nocopy": h11nocopy}


def main() -> None:
    names, *rest = sys.argv[1:]
    for name in names.split("+"):
        CUTS[name]()
    from ttfs.cli import main as ttfs_main

    sys.argv = ["ttfs", *rest]
    ttfs_main()


if __name__ == "__main__":
    main()
