"""Who may read the cache: the one place that decides file and directory modes.

The cache holds the weights of private and gated models, so by default only its owner can reach
it: directories 0700, files 0600, whatever the umask (modes are passed to ``open``/``mkdir``
and directories are ``chmod``ed after creation, so a permissive umask cannot widen them). The
directory mode is the gate; the file modes are the second lock.

The rule for everything that serves bytes to other users: *readers the mount serves must be
able to open what they are served, and nobody else*. A FUSE mount serves through the daemon,
which runs as the cache's owner, so the cache can stay private while ``--allow-other`` readers
read the mount. Anything that hands out a path into the cache instead (a resolve output that is
a hard link of a blob; a kernel-served verified file) must widen exactly that file, through
:func:`served_file`, and never the directories above it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> None:
    """Make ``path`` (created by the caller) 0700 if we own it; another owner's directory (an
    administrator's shared location) is left as it is."""
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if st.st_uid == os.geteuid() and st.st_mode & 0o777 != DIR_MODE:
            os.chmod(path, DIR_MODE)


def mkdir_private(path: Path) -> None:
    """``mkdir path`` (one level, the parent exists) as 0700; an existing one is left alone.

    Raises:
        OSError: the directory cannot be created.
    """
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)  # umask-proof: a umask of 0o077 or 0o777 changes nothing


def make_private_dir(path: Path) -> None:
    """``mkdir -p path``, every directory it creates private; an existing one is left as it is
    (a directory the user chose may be shared on purpose; what ttfs puts in it is private).

    Raises:
        OSError: the directory cannot be created.
    """
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    for created in missing:
        private_dir(created)


def open_private(path: Path | str, flags: int) -> int:
    """``os.open`` creating the file 0600 (umask can only narrow it)."""
    return os.open(path, flags | os.O_CLOEXEC, FILE_MODE)


def umask() -> int:
    """This process's umask, read without changing it (``os.umask`` is process-wide and would
    race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def output_mode() -> int:
    """The mode of a file the user asked for (a resolve output): what ``open`` would give."""
    return 0o666 & ~umask()


def served_file(path: Path | str) -> None:
    """Give a file that is handed out by path (a hard-linked resolve output) the mode of a file
    the user created. It shares its inode with the blob; the cache directories above the blob
    stay 0700, so only the output's own path exposes it.

    Raises:
        OSError: the mode cannot be changed.
    """
    mode = output_mode()
    if os.stat(path).st_mode & 0o777 != mode:  # a chmod changes ctime: only when needed
        os.chmod(path, mode)
