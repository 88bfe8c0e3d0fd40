"""Control of a live mount through the mount itself: the protocol and its client side.

``ttfs status``, ``ttfs materialize`` and ``ttfs umount`` talk to the daemon serving a
mountpoint with nothing but the mountpoint: they read and write extended attributes, which the
kernel forwards to the daemon, and read one hidden file. That works from any process, container
or user that can see the mount (a unix socket would need a path shared out of band and breaks
across mount namespaces), needs no extra file descriptors or ports, and fails cleanly
(``ENODATA``/``ENOTSUP``/``ENOENT``) on a path that is not a ttfs mount. Decision and value
shapes: docs/semantics.md, "Control protocol".

=====================================  ====================  ======================================
attribute                              where                 value
=====================================  ====================  ======================================
``user.ttfs.status`` (get)             mount root            JSON summary of the whole mount
``user.ttfs.status`` (get)             each file             JSON status of that file
``user.ttfs.status.<name>`` (get)      each directory        JSON status of its file ``name``
``user.ttfs.materialize`` (set ``1``)  mount root            pin every blob, fetch and verify all
``user.ttfs.materialize`` (get)        mount root            JSON state of the last materialize
``.ttfs-status`` (open, read)          mount root            JSON: the root document and every
                                                             file's, made at open (any size)
=====================================  ====================  ======================================

Attribute values stay below :data:`XATTR_MAX` (the kernel's 64 KiB limit), which is why the
whole mount's per-file status is a file: :data:`CONTROL_FILE` is not listed by ``readdir`` but
can be opened and read like any file, one request for the whole mount however many files it
has (the per-file attribute walk took 27 s on 100,000 files). This module is the client; the
server side is :class:`ttfs.vfs.core.ModelFs`. It never imports pyfuse3.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MountError

STATUS_XATTR = "user.ttfs.status"
MATERIALIZE_XATTR = "user.ttfs.materialize"
CHILD_STATUS_PREFIX = "user.ttfs.status."
"""``user.ttfs.status.<name>`` on a directory: the status of its file ``name``. The kernel
refuses ``user.*`` attributes on symlinks, so a file served as a link (the fast path) answers
through its parent; names longer than 238 bytes then exceed the 255-byte attribute name."""
XATTR_MAX = 65536 - 1024
"""Largest value the daemon sends (the kernel's XATTR_SIZE_MAX is 64 KiB)."""
CONTROL_FILE = ".ttfs-status"
"""The status file at the mount root: not listed, read-only, content made at each open."""


@dataclass(frozen=True, slots=True)
class MaterializeResult:
    ok: bool
    status: dict[str, Any]
    failures: list[dict[str, str]]
    seconds: float


def _get(path: Path, name: str) -> dict[str, Any]:
    try:
        raw = os.getxattr(path, name)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise MountError(f"{path} is not served by ttfs (no {name} attribute)") from e
        if e.errno == errno.ENOTCONN:
            raise MountError(
                f"{path}: the ttfs daemon is gone (transport endpoint is not connected); "
                f"run `ttfs umount {path}`"
            ) from e
        raise MountError(f"cannot read {name} of {path}: {e.strerror}") from e
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise MountError(f"{path}: {name} is not JSON") from e
    if not isinstance(doc, dict):
        raise MountError(f"{path}: {name} is not a JSON object")
    return doc


def mount_status(mountpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The root status document of the ttfs mount at ``mountpoint``.

    Raises:
        MountError: not a ttfs mount, or its daemon is gone.
    """
    return _get(Path(mountpoint), STATUS_XATTR)


def file_status(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The status document of one file of a ttfs mount (a regular file or a fast-path link).

    Raises:
        MountError: the path is not a file of a ttfs mount.
    """
    p = Path(path)
    if p.is_symlink():
        return _get(p.parent, CHILD_STATUS_PREFIX + p.name)
    return _get(p, STATUS_XATTR)


def full_status(mountpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"mount": root document, "files": [file documents in manifest order]}`` in one
    request: the daemon makes the status file's content when it is opened.

    Raises:
        MountError: not a ttfs mount, or its daemon is gone.
    """
    raw = read_status_file(mountpoint)
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise MountError(f"{mountpoint}/{CONTROL_FILE} is not JSON") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        raise MountError(f"{mountpoint}/{CONTROL_FILE} is not a ttfs status document")
    return doc


def read_status_file(mountpoint: str | os.PathLike[str]) -> bytes:
    """The raw bytes of the mount's status file (JSON; see :func:`full_status`).

    Raises:
        MountError: not a ttfs mount, or its daemon is gone.
    """
    path = Path(mountpoint) / CONTROL_FILE
    chunks: list[bytes] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise MountError(f"{mountpoint} is not served by ttfs (no {CONTROL_FILE})") from e
        if e.errno == errno.ENOTCONN:
            raise MountError(
                f"{mountpoint}: the ttfs daemon is gone (transport endpoint is not connected); "
                f"run `ttfs umount {mountpoint}`"
            ) from e
        raise MountError(f"cannot read {path}: {e.strerror}") from e
    return b"".join(chunks)


def walk_status(mountpoint: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every file's status document (from one read of the status file)."""
    yield from full_status(mountpoint)["files"]


def request_materialize(mountpoint: str | os.PathLike[str]) -> int:
    """Ask the daemon to materialize; returns the generation of the pass to wait for.

    Raises:
        MountError: not a ttfs mount, or the request was refused.
    """
    path = Path(mountpoint)
    mount_status(path)  # a clear error for a non-ttfs path before trying to write
    try:
        os.setxattr(path, MATERIALIZE_XATTR, b"1")
    except OSError as e:
        raise MountError(f"cannot start materialize on {path}: {e.strerror}") from e
    return int(_get(path, MATERIALIZE_XATTR).get("generation", 0))


def wait_materialized(
    mountpoint: str | os.PathLike[str],
    generation: int,
    *,
    poll: float = 0.2,
    timeout: float | None = None,
    on_status: Callable[[dict[str, Any]], None] | None = None,
) -> MaterializeResult:
    """Poll the root status until materialize pass ``generation`` has finished.

    Raises:
        MountError: the mount went away, or ``timeout`` passed first.
    """
    started = time.monotonic()
    while True:
        asked = time.monotonic()
        status = mount_status(mountpoint)
        # The root document is built from every file of the mount: on a mount of 10^4-10^5
        # files one answer costs the daemon 0.05-0.3 s of CPU, so a fixed 0.2 s poll would keep
        # the daemon busy answering instead of fetching (a 20,000-file materialize spent most
        # of its CPU here). Waiting ten times as long as the answer took bounds that to ~10%.
        wait = max(poll, 10 * (time.monotonic() - asked))
        if on_status is not None:
            on_status(status)
        mat = status.get("materialize") or {}
        if mat.get("generation") != generation:
            raise MountError(f"{mountpoint}: another materialize pass started; run it again")
        if mat.get("state") in ("done", "failed"):
            failures = list(mat.get("failures") or [])
            ok = mat.get("state") == "done" and status.get("done") == status.get("files")
            return MaterializeResult(ok, status, failures, time.monotonic() - started)
        if timeout is not None and time.monotonic() - started > timeout:
            raise MountError(f"{mountpoint}: materialize did not finish within {timeout:.0f}s")
        time.sleep(wait)
