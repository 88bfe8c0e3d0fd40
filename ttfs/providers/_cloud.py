"""What the S3, GCS and Azure providers share: signed targets, cached, over one data plane.

Each cloud provider only decides *how to authorise a GET* of an object (control plane, with the
vendor SDK): a presigned S3 URL, a GCS media URL plus a bearer token, an Azure SAS URL. This base
class caches that target per object until shortly before it expires, serialises the SDK work
(client creation, token refresh) behind one lock so a thousand blocks starting together sign
once, and sends every range through :func:`~ttfs.providers._stream.ranged_get` (data plane), so
retries, Content-Range checks and error mapping are the HTTP provider's.

Two checks upstream never made:

* ``If-Match``: when the manifest hash is a real etag of the object (S3 ``_<md5>_`` or
  multipart ``_<hex>-<n>_``, Azure ``0x...``), every range carries ``If-Match``; an object
  rewritten since the manifest was made answers 412, a :class:`~ttfs.errors.StaleManifest`,
  instead of mixing blocks of two versions (the only guard for hashes that cannot be verified
  by content: multipart S3 etags and Azure etags).
* A 401/403 on a cached target drops it (and the credentials behind it) and signs again, once:
  URLs and tokens expire, clocks drift.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import httpx
import trio

from ..config import Settings
from ..errors import AccessDenied, ProviderError
from ..manifest import Pointer
from ._stream import make_client, ranged_get
from .base import Sink, WireTarget

log = logging.getLogger(__name__)

REFRESH_MARGIN = 300.0
"""Seconds before expiry at which a cached URL or token is replaced (a range may take a while)."""


@dataclass(slots=True)
class Target:
    """An authorised GET of one object: the URL and headers (hidden from ``repr``)."""

    url: str = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    expires_at: float = float("inf")  # monotonic deadline


class CloudProvider:
    """Range reads of one cloud resolution type through signed targets."""

    name = "cloud"

    def __init__(
        self,
        settings: Settings,
        client: httpx.AsyncClient | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._settings = settings
        self._env: Mapping[str, str] = (
            env if env is not None else (settings.secrets_env or os.environ)
        )
        self._http = client or make_client(settings)
        self._targets: dict[Hashable, Target] = {}
        self._lock = trio.Lock()
        self._told: set[Hashable] = set()
        self.requests = 0

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- what subclasses provide -----------------------------------------------------------
    def _object_key(self, pointer: Pointer) -> Hashable:
        """Identity of the object (and of the credentials) a pointer reads."""
        raise NotImplementedError

    async def _sign(self, pointer: Pointer) -> Target:
        """A fresh authorised target for the pointer's object (called under the lock)."""
        raise NotImplementedError

    def _forget(self, pointer: Pointer) -> None:
        """Drop credentials cached for the pointer (after a 401/403)."""

    def if_match(self, pointer: Pointer) -> str | None:
        """The ``If-Match`` value the pointer's hash implies, or None."""
        return None

    def unverifiable(self, pointer: Pointer) -> str | None:
        """Why the pointer's content cannot be checked against its hash, or None if it can."""
        return None

    # -- reads ------------------------------------------------------------------------------
    async def _target(self, pointer: Pointer) -> Target:
        key = self._object_key(pointer)
        target = self._targets.get(key)
        if target is not None and time.monotonic() < target.expires_at:
            return target
        async with self._lock:
            target = self._targets.get(key)
            if target is None or time.monotonic() >= target.expires_at:
                target = await self._sign(pointer)
                self._targets[key] = target
            return target

    def _warn_once(self, pointer: Pointer, etag: str | None) -> None:
        key = self._object_key(pointer)
        if key not in self._told:
            self._told.add(key)
            reason = self.unverifiable(pointer)
            if reason is not None:
                log.warning(
                    "%s: content cannot be verified against hash %s (%s); %s",
                    pointer.file_name,
                    pointer.hash,
                    reason,
                    "If-Match pins the listed object version"
                    if etag is not None
                    else "only the size is checked",
                )

    async def wire_target(self, pointer: Pointer) -> WireTarget:
        """The signed target plus ``If-Match``, for a worker process."""
        etag = self.if_match(pointer)
        self._warn_once(pointer, etag)
        target = await self._target(pointer)
        headers = dict(target.headers)
        if etag is not None:
            headers["if-match"] = etag
        return WireTarget(target.url, headers)

    def forget_wire_target(self, pointer: Pointer) -> None:
        self._targets.pop(self._object_key(pointer), None)
        self._forget(pointer)

    async def read_range(self, pointer: Pointer, start: int, end: int, sink: Sink) -> None:
        if end <= start:
            return
        etag = self.if_match(pointer)
        key = self._object_key(pointer)
        self._warn_once(pointer, etag)
        for attempt in range(2):
            target = await self._target(pointer)
            headers = dict(target.headers)
            if etag is not None:
                headers["if-match"] = etag
            self.requests += 1
            try:
                await ranged_get(self._http, pointer, target.url, start, end, sink, headers)
                return
            except AccessDenied:
                if self._targets.get(key) is target:
                    del self._targets[key]
                self._forget(pointer)
                if attempt == 0:
                    log.info("%s: access refused; signing again", pointer.file_name)
                    continue
                raise
        raise ProviderError(f"{pointer.file_name}: unreachable")  # pragma: no cover


def deadline_in(seconds: float) -> float:
    """A monotonic deadline ``seconds`` from now, less the refresh margin."""
    return time.monotonic() + max(0.0, seconds - REFRESH_MARGIN)
