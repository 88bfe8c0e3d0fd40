"""Set a file's atime to now without touching its mtime: ``utimensat`` with ``UTIME_OMIT``.

``os.utime`` sets both times, so refreshing an atime that way means reading the mtime first
and writing it back: a write landing between the two gets its mtime set back, and a file
changed since looks unchanged to anyone comparing ``(inode, size, mtime)`` — exactly what the
b10fs trust rule compares. ``UTIME_OMIT`` leaves the mtime to the kernel.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path
from typing import Any

_AT_FDCWD = -100
_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


@cache
def _utimensat() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).utimensat
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def touch_atime(path: Path | str) -> None:
    """atime = now, mtime left as it is (the kernel's ``UTIME_OMIT``).

    Raises:
        OSError: the call failed (e.g. EPERM: neither the owner nor allowed to write), or the
            C library has no ``utimensat``.
    """
    fn = _utimensat()
    if fn is None:
        raise OSError("utimensat is not available")
    times = (_Timespec * 2)(_Timespec(0, _UTIME_NOW), _Timespec(0, _UTIME_OMIT))
    if fn(_AT_FDCWD, os.fsencode(path), times, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
