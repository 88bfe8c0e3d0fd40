"""The filesystem without a kernel: inode tree, reads through the fetcher, readahead, control.

Nothing here imports pyfuse3; ``ttfs/fuse/`` translates these calls for the kernel.
"""

from .core import Attr, FsOptions, FsStats, HandleId, ModelFs, errno_for, open_model_fs
from .readahead import ReadaheadConfig, StreamTable
from .tree import ROOT_INODE, Inode, Node, Tree, default_prefix, mount_paths

__all__ = [
    "ROOT_INODE",
    "Attr",
    "FsOptions",
    "FsStats",
    "HandleId",
    "Inode",
    "ModelFs",
    "Node",
    "ReadaheadConfig",
    "StreamTable",
    "Tree",
    "default_prefix",
    "errno_for",
    "mount_paths",
    "open_model_fs",
]
