"""The gate's pure parts: the kernel's event records and the response encoding.

The records are what ``read()`` of a fanotify group returns (``struct fanotify_event_metadata``
then info records); these tests build them byte by byte as the kernel lays them out, so that a
parser that skipped an info record, misread the range or looped on a zero length would fail
here without a mount.
"""

from __future__ import annotations

import errno
import struct

from ttfs.vfs.gate import WHOLE_FILE, Event, deny, parse

_META = struct.Struct("=IBBHQii")


def _event(fd: int, pid: int, rng: tuple[int, int] | None, extra: bytes = b"") -> bytes:
    info = b""
    if rng is not None:
        info += struct.pack("=BBHI", 6, 0, 24, 0) + struct.pack("=QQ", *rng)  # range record
    info += extra
    return _META.pack(_META.size + len(info), 3, 0, _META.size, 0x00100000, fd, pid) + info


def test_one_event_with_its_range() -> None:
    assert parse(_event(7, 1234, (1 << 30, 4096))) == [Event(7, 1 << 30, 4096, 1234)]


def test_several_events_and_unknown_info_records_skipped() -> None:
    """An event without a range record holds the whole file (never "nothing to fetch")."""
    unknown = struct.pack("=BBH", 99, 0, 8) + b"\0" * 4  # a record type this code does not know
    buf = _event(5, 1, (0, 10), extra=unknown) + _event(6, 2, None) + _event(8, 3, (64, 1))
    assert parse(buf) == [Event(5, 0, 10, 1), Event(6, 0, WHOLE_FILE, 2), Event(8, 64, 1, 3)]


def test_records_without_a_file_and_zero_lengths_do_not_loop() -> None:
    no_fd = _event(-1, 1, None)  # FAN_NOFD: a queue overflow, nothing to answer
    zero_info = _META.pack(_META.size + 4, 3, 0, _META.size, 0, 9, 4) + struct.pack("=BBH", 6, 0, 0)
    zero_event = _META.pack(0, 3, 0, _META.size, 0, 10, 5)
    assert parse(no_fd + zero_info) == [Event(9, 0, WHOLE_FILE, 4)]
    assert parse(zero_event) == [Event(10, 0, WHOLE_FILE, 5)]
    assert parse(b"\0" * 7) == []


def test_deny_carries_the_errno_in_the_top_byte() -> None:
    assert deny(errno.EIO) == 0x2 | (errno.EIO << 24)
    assert deny(errno.EIO) & 0xFF == 0x2
