"""The fast path: a complete, verified file is answered as a symlink into the blob store.

Why (docs/mount.md, "The fast path"): a read through the daemon costs a FUSE round trip and a
trip through Python per 1 MiB request, and the page is cached twice (the blob file's and the
FUSE inode's). A symbolic link to the blob file hands every read to the kernel: the loader reads
the cache's own file, at the speed of the local file system, with one copy in the page cache.
This module holds the pure checks behind that decision; :class:`~ttfs.vfs.core.ModelFs`
applies them.

A file is served by the kernel only while all of these hold:

* the blob is complete and verified against its manifest hash, and pinned: the mount holds it
  open and the store never evicts an open blob, so eviction never removes a file a link points to;
* the blob file at the link's target is the very file that was verified: same device and inode
  as the daemon's open descriptor, same size, mtime and ctime as when the link was granted
  (:class:`~ttfs.blocks.identity.BlobKey`). Checked on every ``lookup`` and ``readlink``; any
  write, truncate, chmod or replacement changes ctime or the inode, so a changed blob is never
  served as verified;
* every reader can follow the link. The kernel keeps one dentry for all readers, so this is
  decided per mount: root and the mounting user can always read the cache; when another user
  looks a file up (``allow_other``) and the blob file is not readable by every user (``o+r`` on
  it, ``o+x`` on every directory above), or a process does not see the blob file at the same
  path (:func:`visible_to`: a container without the cache), the fast path is turned off for
  the whole mount and every file goes back to the daemon.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..blocks.identity import BlobKey

INODE_SHIFT = 1 << 40
"""Link inode = file inode + this. A name that turns from file into link needs a new inode
number: the kernel rejects an existing inode whose type changes (it marks it bad)."""


def readable_by_others(path: Path) -> bool:
    """True when any user can open ``path``: ``o+r`` on it, ``o+x`` on every directory above."""
    try:
        if not os.stat(path).st_mode & stat.S_IROTH:
            return False
        for parent in Path(os.path.abspath(path)).parents:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
    except OSError:
        return False
    return True


def visible_to(pid: int, target: str, key: BlobKey) -> bool:
    """Whether process ``pid`` sees the blob file at ``target`` (an absolute path).

    Looks through ``/proc/<pid>/root``: a process in another mount namespace (a container) sees
    its own root there. When that cannot be looked at (the process is gone, or belongs to
    another user and the daemon is not root), the answer is True: the process then shares the
    daemon's view in every setup ttfs supports, and a wrong guess costs an ENOENT, not wrong
    bytes.
    """
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        st = os.stat(f"/proc/{pid}/root{target}")
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return (st.st_dev, st.st_ino) == (key.dev, key.ino)
