"""Small process helpers shared by layers (the shared-cache lock and the mount daemon)."""

from __future__ import annotations

import os

_OWN_PROCESS = False


def claim_process() -> None:
    """Mark this process as a ttfs command's own (``ttfs``, ``truss-transfer-cli``): process-wide
    tuning (httpcore's read size) is then applied when the first HTTP client is made, instead
    of importing httpx at start (a mount must not import it before it is ready)."""
    global _OWN_PROCESS
    _OWN_PROCESS = True


def own_process() -> bool:
    return _OWN_PROCESS


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this machine; a zombie counts as dead (it holds nothing any more).

    Used to break a dead replica's lock at once and to wait for a daemon to exit.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; returns (before, after).

    The soft limit is often 1,024 (systemd's default for services) while the hard one is far
    higher; a mount daemon's sockets, index connections and descriptor cache then have room.
    The block store bounds its own descriptors anyway (ttfs/blocks/descriptors.py), so this is
    headroom, not a requirement.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or (hard != resource.RLIM_INFINITY and soft > hard):
        return soft, soft
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = 1 << 20  # the kernel's usual nr_open; "unlimited" is refused for NOFILE
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def nofile_share(cap: int) -> int:
    """A quarter of the soft ``RLIMIT_NOFILE``, at least 8 and at most ``cap``: what one kind of
    descriptor may take (the blob store's idle descriptors, the held reads of lazy links), so
    that together with sockets, the index and the FUSE device they stay under the limit."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return cap
    return max(8, min(cap, soft // 4))


_PR_SET_PDEATHSIG = 1


def die_with_parent(ppid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``).

    For helper processes that must never outlive the process that started them (the truss
    drop-in's resolve child): however the parent ends (Ctrl-C, SIGTERM, SIGKILL), nothing is left
    behind holding locks or writing files. ``ppid`` is the parent's pid as the parent saw it: if
    it already differs, the parent died before the request took effect and this process exits.
    Linux only; elsewhere a no-op (the caller still notices EOF on its pipes).
    """
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != ppid:
        os._exit(0)
