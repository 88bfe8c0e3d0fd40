"""Kernel tuning of a live FUSE mount through sysfs: readahead and background depth.

pyfuse3's ``init()`` hook gets no ``fuse_conn_info``, so a daemon cannot negotiate readahead or
``max_background`` the libfuse way (anchors §5.5). After the mount exists, root can still set:

* ``/sys/class/bdi/<major>:<minor>/read_ahead_kb``: the size of the kernel's readahead, hence
  of buffered FUSE read requests (128 KiB by default; FUSE caps one request at 1 MiB);
* ``/sys/fs/fuse/connections/<dev>/max_background`` and ``congestion_threshold``: how many
  asynchronous (readahead) requests may be outstanding (12 and 9 by default). FUSE skips async
  readahead while ``congestion_threshold`` requests are in flight, so both are raised together.

The figures and how they were chosen are in docs/mount.md. Everything here is best effort: a
non-root daemon, a missing fusectl or a read-only sysfs is logged and the mount works with the
kernel defaults. The mount's device number comes from ``/proc/self/mountinfo`` so nothing here
sends a request to the (possibly not yet serving) FUSE daemon.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

READ_AHEAD_KB = 1024
"""Chosen by measurement (docs/mount.md): 1 MiB makes every buffered request a full 1 MiB FUSE
request (5-10x fewer than the 128 KiB default, 2-3x the warm throughput); 4 and 16 MiB read no
faster on the development VM but make every mmap fault read 2-8 MiB around it, which a loader
reading one tensor pays for from the origin. ttfs's own readahead covers the network side."""
MAX_BACKGROUND = 64
"""Mountpoint-S3's and hf-mount's figure; enough for 4 MiB of readahead on 16 files at once."""

FUSECTL = Path("/sys/fs/fuse/connections")
BDI = Path("/sys/class/bdi")


@dataclass(frozen=True, slots=True)
class Tuning:
    """The effective values after :func:`tune` (None where they could not be read)."""

    device: str | None
    read_ahead_kb: int | None
    max_background: int | None
    congestion_threshold: int | None

    def describe(self) -> str:
        return (
            f"device {self.device}: read_ahead_kb={self.read_ahead_kb}, "
            f"max_background={self.max_background}, "
            f"congestion_threshold={self.congestion_threshold}"
        )


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out = []
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_device(mountpoint: str | os.PathLike[str], mountinfo: str | None = None) -> str | None:
    """``"major:minor"`` of the filesystem mounted at ``mountpoint`` (the last one stacked)."""
    target = os.path.abspath(mountpoint)
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    found = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and _unescape(fields[4]) == target:
            found = fields[2]
    return found


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """Whether something is mounted at ``mountpoint`` (works for a dead FUSE mount too)."""
    return mount_device(mountpoint) is not None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _write(path: Path, value: int) -> bool:
    try:
        path.write_text(f"{value}\n")
        return True
    except OSError as e:
        log.info("cannot set %s to %d: %s", path, value, e.strerror)
        return False


def _ensure_fusectl() -> bool:
    if FUSECTL.is_dir() and any(FUSECTL.iterdir()):
        return True
    if os.geteuid() != 0 or not FUSECTL.is_dir():
        return False
    try:
        subprocess.run(
            ["mount", "-t", "fusectl", "fusectl", str(FUSECTL)],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as e:
        log.info("cannot mount fusectl at %s: %s", FUSECTL, e)
        return False
    return True


def tune(
    mountpoint: str | os.PathLike[str],
    *,
    read_ahead_kb: int | None = READ_AHEAD_KB,
    max_background: int | None = MAX_BACKGROUND,
) -> Tuning:
    """Raise readahead and background depth of the FUSE mount at ``mountpoint``; never raises.

    ``None`` leaves a value as it is. Returns the effective values, which the caller logs.
    """
    device = mount_device(mountpoint)
    if device is None:
        return Tuning(None, None, None, None)
    major, _, minor = device.partition(":")
    bdi = BDI / device / "read_ahead_kb"
    if read_ahead_kb is not None:
        _write(bdi, read_ahead_kb)
    conn: Path | None = None
    if _ensure_fusectl():
        # fusectl names a connection by the kernel's dev_t: MKDEV(major, minor).
        conn = FUSECTL / str((int(major) << 20) | int(minor))
        if max_background is not None and conn.is_dir():
            _write(conn / "max_background", max_background)
            _write(conn / "congestion_threshold", max(1, max_background * 3 // 4))
    return Tuning(
        device,
        _read_int(bdi),
        _read_int(conn / "max_background") if conn else None,
        _read_int(conn / "congestion_threshold") if conn else None,
    )
