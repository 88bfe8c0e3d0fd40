"""The immutable inode tree of a mount, built once from the manifest's pointers.

Every file of a mount is a manifest pointer; directories are implied by the paths. Nothing
here changes after :meth:`Tree.build`, so lookups, ``stat`` and ``readdir`` are answered from
memory with no origin request, and the kernel may cache entries and attributes for as long as
the mount lives (docs/semantics.md).

**Path mapping** (docs/semantics.md, "Where manifest files appear"): a relative ``file_name``
sits under the mount root as written. An absolute one (upstream writes
``/app/model_cache/<volume_folder>/...``) sits under the mount root with a *prefix* removed:

* ``prefix`` given (``ttfs mount --root PREFIX``): that prefix; ``--root /`` keeps the full path;
* else, when every absolute name lies under the mountpoint itself, the mountpoint, so
  ``ttfs mount m.json /app/model_cache`` serves exactly the paths the manifest names;
* else the longest common directory of the absolute names.

An absolute name outside the prefix, or two names mapping to one path, is a
:class:`~ttfs.errors.ManifestError`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NewType

from ..errors import ManifestError
from ..manifest import Pointer, is_plain_relative

Inode = NewType("Inode", int)
_NO_ENTRIES: list[str] = []  # shared by every file node (never appended to): one list per file
# would cost ~50 bytes and a constructor call each at 100k files
ROOT_INODE = Inode(1)
"""The kernel's fixed inode number of a FUSE mount's root (``FUSE_ROOT_ID``)."""


@dataclass(slots=True)
class Node:
    """A file (``pointer`` set) or a directory (``children`` set) of the mount."""

    ino: Inode
    name: str
    parent: Inode
    path: str  # relative to the mount root, "" for the root itself
    pointer: Pointer | None = None
    children: dict[str, Inode] | None = None
    entries: list[str] = field(default_factory=list)  # children names in readdir order
    subdirs: int = 0

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    @property
    def size(self) -> int:
        return self.pointer.size if self.pointer is not None else 0


def _parts(name: str) -> list[str]:
    return [p for p in name.split("/") if p not in ("", ".")]


def _clean_abs(path: str) -> str:
    return "/" + "/".join(_parts(path))


def _under(path: str, prefix: str) -> bool:
    return prefix in ("/", path) or path.startswith(prefix + "/")


def default_prefix(pointers: Sequence[Pointer], mountpoint: str | None = None) -> str | None:
    """The prefix removed from absolute names when ``--root`` is not given (module docstring)."""
    absolute = [_clean_abs(p.file_name) for p in pointers if p.file_name.startswith("/")]
    if not absolute:
        return None
    if mountpoint is not None:
        mnt = _clean_abs(posixpath.abspath(mountpoint))
        if all(_under(a, mnt) and a != mnt for a in absolute):
            return mnt
    common = posixpath.commonpath([posixpath.dirname(a) for a in absolute])
    return _clean_abs(common)


def mount_paths(
    pointers: Sequence[Pointer], *, prefix: str | None = None, mountpoint: str | None = None
) -> list[tuple[str, Pointer]]:
    """``(path relative to the mount root, pointer)`` for every pointer, in manifest order.

    Raises:
        ManifestError: an absolute name lies outside the prefix, names the prefix itself, or
            two pointers map to the same path.
    """
    strip = _clean_abs(prefix) if prefix is not None else default_prefix(pointers, mountpoint)
    return [(_mount_path(p.file_name, strip), p) for p in pointers]


def _mount_path(file_name: str, strip: str | None) -> str:
    """One name's path relative to the mount root, ``strip`` removed from an absolute one.

    Raises:
        ManifestError: as :func:`mount_paths`.
    """
    if file_name.startswith("/"):
        assert strip is not None
        full = _clean_abs(file_name)
        if not _under(full, strip) or full == strip:
            raise ManifestError(
                f"file_name {file_name!r} is not under the mount root prefix {strip!r} "
                "(choose another one with --root)"
            )
        rel = full[len(strip) :].lstrip("/") if strip != "/" else full.lstrip("/")
    elif is_plain_relative(file_name):
        rel = file_name
    else:
        rel = "/".join(_parts(file_name))
    if not rel:
        raise ManifestError(f"file_name {file_name!r} names the mount root itself")
    return rel


class Tree:
    """Inodes of one mount: ``nodes[ino - 1]`` is inode ``ino``; the root is inode 1."""

    def __init__(self, nodes: list[Node], prefix: str | None, file_count: int) -> None:
        self._nodes = nodes
        self.prefix = prefix
        self.file_count = file_count

    @classmethod
    def build(
        cls,
        pointers: Sequence[Pointer],
        *,
        prefix: str | None = None,
        mountpoint: str | None = None,
    ) -> Tree:
        """Build the tree (see :func:`mount_paths` for the mapping).

        Raises:
            ManifestError: the mapping fails, or a path is both a file and a directory.
        """
        root = Node(ROOT_INODE, "", ROOT_INODE, "", children={})
        nodes = [root]
        strip = _clean_abs(prefix) if prefix is not None else default_prefix(pointers, mountpoint)
        # Directory path -> node: siblings share their parent's lookup, so building costs one
        # dict hit per file instead of one per path component (100k files: ~3x faster).
        dirs: dict[str, Node] = {"": root}

        def directory(path: str, file_name: str) -> Node:
            head, _, name = path.rpartition("/")
            parent = dirs.get(head) or directory(head, file_name)
            assert parent.children is not None
            ino = parent.children.get(name)
            if ino is not None:  # a file of that name came first
                raise ManifestError(
                    f"{file_name!r}: {nodes[ino - 1].path!r} is a file in the mount, "
                    "not a directory"
                )
            child = Node(Inode(len(nodes) + 1), name, parent.ino, path, children={})
            nodes.append(child)
            parent.children[name] = child.ino
            parent.entries.append(name)
            parent.subdirs += 1
            dirs[path] = child
            return child

        # The loop of a 10^5-file start: the common name (relative, already normal) is its own
        # mount path, the parent directory is one dict hit, and the node is built positionally.
        plain = is_plain_relative
        for pointer in pointers:
            name_ = pointer.file_name
            rel = name_ if plain(name_) else _mount_path(name_, strip)  # plain: not absolute
            head, _, name = rel.rpartition("/")
            parent = dirs.get(head) or directory(head, name_)
            children = parent.children
            assert children is not None
            if name in children:
                other = nodes[children[name] - 1]
                what = (
                    "a directory" if other.is_dir else f"also {other.pointer.file_name!r}"  # type: ignore[union-attr]
                )
                raise ManifestError(f"{name_!r} maps to mount path {rel!r}, which is {what}")
            ino = Inode(len(nodes) + 1)
            nodes.append(Node(ino, name, parent.ino, rel, pointer, None, _NO_ENTRIES))
            children[name] = ino
            parent.entries.append(name)
        return cls(nodes, strip, len(pointers))

    # -- queries (all in memory, never block) --------------------------------------------
    def node(self, ino: int) -> Node | None:
        if 1 <= ino <= len(self._nodes):
            return self._nodes[ino - 1]
        return None

    @property
    def root(self) -> Node:
        return self._nodes[0]

    def child(self, parent: Node, name: str) -> Node | None:
        if parent.children is None:
            return None
        if name == ".":
            return parent
        if name == "..":
            return self._nodes[parent.parent - 1]
        ino = parent.children.get(name)
        return None if ino is None else self._nodes[ino - 1]

    def by_path(self, path: str) -> Node | None:
        """The node at ``path`` relative to the mount root (``""`` is the root)."""
        node: Node | None = self.root
        for part in _parts(path):
            if node is None:
                return None
            node = self.child(node, part)
        return node

    def files(self) -> Iterator[Node]:
        """File nodes in manifest order."""
        return (n for n in self._nodes if n.pointer is not None)

    def __len__(self) -> int:
        return len(self._nodes)
