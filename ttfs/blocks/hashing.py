"""Which content hash a manifest entry promises, and how to check a blob against it.

Manifests carry ``hashtype`` + ``hash`` written by different producers (spec §1.4):

* ``etag`` from Hugging Face: 64 hex = SHA-256 of an LFS file, 40 hex = git blob SHA-1 of a small
  file;
* ``md5`` from GCS: 32 hex MD5;
* ``etag`` from S3/Azure, normalised (quotes became ``_``): ``_<32 hex>_`` is the MD5 of a
  single-part upload; ``_<hex>-<n>_`` is a multipart etag that cannot be checked without the
  part size; Azure etags (``_0x8D..._``) are not content hashes at all;
* ``sha256``, ``blake3`` from hand-written or platform manifests.

:func:`checker_for` returns a :class:`Checker` naming the algorithm, or one with
``algorithm=None`` and a ``reason`` that ``status`` shows instead of pretending to verify.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

_HEX = re.compile(r"^[0-9a-fA-F]+$")
_QUOTED_MD5 = re.compile(r'^[_"]?([0-9a-fA-F]{32})[_"]?$')


class _Hasher(Protocol):
    def update(self, data: Any, /) -> None: ...
    def hexdigest(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Checker:
    """How to verify one blob: ``algorithm`` is None when it cannot be checked locally."""

    algorithm: str | None
    expected: str
    reason: str = ""

    def new(self, size: int) -> _Hasher:
        """A fresh hasher; git blob SHA-1 is seeded with its ``blob <size>\\0`` header."""
        assert self.algorithm is not None
        if self.algorithm == "git-sha1":
            h = hashlib.sha1(usedforsecurity=False)
            h.update(b"blob %d\0" % size)
            return h
        if self.algorithm == "blake3":
            return _blake3()()
        return hashlib.new(self.algorithm, usedforsecurity=False)

    @property
    def checkable(self) -> bool:
        return self.algorithm is not None


def _blake3() -> Callable[[], _Hasher]:
    import blake3  # optional dependency: `pip install ttfs[blake3]`

    factory: Callable[[], _Hasher] = blake3.blake3  # type: ignore[assignment]
    return factory


def _has_blake3() -> bool:
    try:
        _blake3()
    except ImportError:
        return False
    return True


def checker_for(hashtype: str, digest: str) -> Checker:
    """Decide how ``(hashtype, hash)`` of a manifest entry can be verified."""
    kind = hashtype.strip().lower()
    value = digest.strip().strip('"')
    if kind in {"sha256", "sha-256"} and _is_hex(value, 64):
        return Checker("sha256", value.lower())
    if kind in {"sha1", "git-sha1", "git_sha1"} and _is_hex(value, 40):
        return Checker("git-sha1" if kind != "sha1" else "sha1", value.lower())
    if kind == "md5":
        m = _QUOTED_MD5.match(value)
        if m:
            return Checker("md5", m.group(1).lower())
        return Checker(None, value, "md5 hash is not 32 hex digits (random fallback hash)")
    if kind == "blake3" and _is_hex(value, 64):
        if _has_blake3():
            return Checker("blake3", value.lower())
        return Checker(None, value, "blake3 module not installed (pip install ttfs[blake3])")
    if kind == "etag":
        if _is_hex(value, 64):
            return Checker("sha256", value.lower())
        if _is_hex(value, 40):
            return Checker("git-sha1", value.lower())
        m = _QUOTED_MD5.match(value)
        if m:
            return Checker("md5", m.group(1).lower())
        if re.match(r"^[_\"]?[0-9a-fA-F]{32}-\d+[_\"]?$", value):
            return Checker(None, value, "multipart S3 etag: depends on the unknown part size")
        return Checker(None, value, "etag is not a content hash")
    return Checker(None, value, f"hashtype {hashtype!r} is not checkable locally")


def _is_hex(value: str, length: int) -> bool:
    return len(value) == length and bool(_HEX.match(value))
