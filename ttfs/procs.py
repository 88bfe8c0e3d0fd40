"""Small process helpers shared by layers (the shared-cache lock and the mount daemon)."""

from __future__ import annotations

import os


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
