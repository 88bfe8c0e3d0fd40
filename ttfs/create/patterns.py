"""The allow/ignore glob dialect of manifest creation (spec §2.3), exactly as upstream.

Why not :mod:`fnmatch`: truss-transfer uses its own matcher and manifests built by the platform
depend on its semantics. Only ``*`` is special and it matches any run of characters *including*
``/`` (so ``*.json`` keeps ``a/b/config.json``); ``?``, ``[...]`` are literal and ``**`` is just
two stars. A pattern without ``*`` must equal the whole path. Matching is case-sensitive.

Filtering: an ignore match drops a path (ignore beats allow); otherwise an allow list keeps only
paths that match one of its patterns, and an *empty* allow list keeps nothing; ``None`` for both
keeps everything.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def glob_match(pattern: str, path: str) -> bool:
    """True when ``path`` matches ``pattern`` in the upstream dialect.

    The pattern is split on ``*``: the first piece must be a prefix, the last a suffix of what
    remains, and the middle pieces must occur in order, each found leftmost-first.
    """
    if "*" not in pattern:
        return pattern == path
    pieces = pattern.split("*")
    first, last, middle = pieces[0], pieces[-1], pieces[1:-1]
    if not path.startswith(first):
        return False
    rest = path[len(first) :]
    if len(rest) < len(last) or not rest.endswith(last):
        return False
    rest = rest[: len(rest) - len(last)]
    for piece in middle:
        at = rest.find(piece)
        if at < 0:
            return False
        rest = rest[at + len(piece) :]
    return True


def keep(
    path: str,
    allow_patterns: Sequence[str] | None,
    ignore_patterns: Sequence[str] | None,
) -> bool:
    """Whether ``path`` survives the filters (ignore wins; an empty allow list keeps nothing)."""
    if ignore_patterns is not None and any(glob_match(p, path) for p in ignore_patterns):
        return False
    if allow_patterns is not None:
        return any(glob_match(p, path) for p in allow_patterns)
    return True


def filter_paths(
    paths: Iterable[str],
    allow_patterns: Sequence[str] | None,
    ignore_patterns: Sequence[str] | None,
) -> list[str]:
    """The paths that survive the filters, in input order."""
    return [p for p in paths if keep(p, allow_patterns, ignore_patterns)]


def show_patterns(patterns: Sequence[str] | None) -> str:
    """Patterns as error messages show them: a Python list literal or ``None``."""
    return "None" if patterns is None else repr(list(patterns))
