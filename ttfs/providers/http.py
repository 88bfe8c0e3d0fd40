"""HTTP(S) and Hugging Face origins: range GETs over one shared httpx client.

Why the redirect handling is ours and not httpx's:

* A Hugging Face ``resolve`` URL answers 302 to a signed CDN URL. We follow it once, cache the
  CDN URL until it expires, and send every later range straight to the CDN (one round trip
  instead of two).
* The token is sent only to a hub origin (``huggingface.co``, ``hf.co``, their subdomains, or the
  exact origin of ``HF_ENDPOINT``) and never across a redirect to another origin: origin means
  scheme + host + port, so a CDN on another port of the same host gets no token either.
* A 401/403/410 from a cached CDN URL means it expired: we forget it and resolve again, once.
* Resolving costs a request in process (httpx: ~5 ms of CPU each), which for a manifest of
  many small files (one range each) is most of the work. So once an origin answered a URL
  without a redirect, its other URLs are guessed to be their own targets and go straight to a
  worker; a redirect there (:class:`~ttfs.errors.Redirected`) drops the guess for that origin
  and the URL is resolved here. Hub URLs and signed URLs are never guessed.

Every response is checked: a ``Content-Range`` total that differs from the manifest size is a
:class:`~ttfs.errors.StaleManifest` (never silent corruption); a body shorter than promised is a
:class:`~ttfs.errors.TransientError` that the scheduler retries from the first missing block.
Errors are mapped from httpx in one place (:mod:`._stream`). URLs are logged without query
strings.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import trio

from ..config import Settings
from ..errors import AccessDenied, ObjectNotFound, ProviderError, StaleManifest
from ..manifest import HttpResolution, Pointer
from ..secrets import get_hf_token
from ._stream import make_client, mapped, status_error, stream_body
from .base import Sink, WireTarget, redact_url

log = logging.getLogger(__name__)

MAX_REDIRECTS = 8
_HUB_SUFFIXES = ("huggingface.co", "hf.co")


@dataclass(slots=True)
class _Target:
    """Where the bytes of one manifest URL really come from."""

    url: str
    auth: bool
    expires_at: float  # monotonic deadline; inf when the URL carries no expiry


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


def _signed_url_ttl(url: str) -> float:
    """Seconds a signed URL stays valid, from its query (CloudFront ``Expires``, S3 SigV4)."""
    query = {k.lower(): v for k, v in parse_qs(urlsplit(url).query).items()}
    now = time.time()
    if "expires" in query:
        with contextlib.suppress(ValueError):
            return float(query["expires"][0]) - now
    if "x-amz-expires" in query and "x-amz-date" in query:
        with contextlib.suppress(ValueError):
            issued = time.mktime(time.strptime(query["x-amz-date"][0], "%Y%m%dT%H%M%SZ"))
            return issued - time.timezone + float(query["x-amz-expires"][0]) - now
    return float("inf")


class HttpProvider:
    """Range reads of ``http`` pointers (plain URLs and Hugging Face resolve URLs)."""

    name = "http"

    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        self._settings = settings
        self._client = client or make_client(settings)
        self._targets: dict[str, _Target] = {}
        self._resolving: dict[str, trio.Event] = {}
        # Final errors of resolutions, by their event (kept small: see _resolved).
        self._final_errors: dict[trio.Event, ProviderError] = {}
        self._tokens: dict[str, str | None] = {}
        self._hub = _origin(settings.hf_endpoint) if settings.hf_endpoint else None
        # Origins whose URLs were their own targets (no redirect): see the module doc.
        self._direct: set[tuple[str, str, int]] = set()
        self.requests = 0

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- auth -----------------------------------------------------------------------------
    def is_hub(self, url: str) -> bool:
        origin = _origin(url)
        if self._hub is not None and origin == self._hub:
            return True
        host = origin[1]
        return any(host == s or host.endswith("." + s) for s in _HUB_SUFFIXES)

    def _token(self, pointer: Pointer) -> str | None:
        name = pointer.runtime_secret_name
        if name not in self._tokens:
            self._tokens[name] = get_hf_token(name, self._settings.secrets_env or None)
        return self._tokens[name]

    def _headers(self, pointer: Pointer, auth: bool, start: int, end: int) -> dict[str, str]:
        headers = {"range": f"bytes={start}-{end - 1}"}
        if auth:
            token = self._token(pointer)
            if token:
                headers["authorization"] = f"Bearer {token}"
        return headers

    # -- targets for worker processes ---------------------------------------------------------
    async def wire_target(self, pointer: Pointer) -> WireTarget | None:
        """The resolved URL (and token, for a hub origin) of ``pointer``, once known.

        None while nobody resolved the manifest URL yet: the caller's range then goes in
        process and resolves it (one range per URL). A range asked while another resolves
        waits for it.
        """
        resolution = pointer.resolution
        if not isinstance(resolution, HttpResolution):
            raise ProviderError(f"{pointer.file_name}: not an http pointer")
        url = resolution.url
        pending = self._resolving.get(url)
        if pending is not None:
            await pending.wait()
            final = self._final_errors.get(pending)
            if final is not None:
                raise final  # 404, 403, stale size: shared with every waiter, no new request
        target = self._targets.get(url)
        if target is None or time.monotonic() >= target.expires_at:
            if not self._guess_direct(url):
                return None
            target = _Target(url, False, float("inf"))
        headers = self._headers(pointer, target.auth, 0, 1)
        del headers["range"]
        return WireTarget(target.url, headers)

    def _guess_direct(self, url: str) -> bool:
        """Whether ``url`` may go to a worker unresolved: its origin served URLs directly,
        and it is neither a hub URL (a token, and LFS redirects) nor signed (an expiry)."""
        return (
            _origin(url) in self._direct
            and not self.is_hub(url)
            and _signed_url_ttl(url) == float("inf")
        )

    def forget_wire_target(self, pointer: Pointer) -> None:
        resolution = pointer.resolution
        # No target kept: a guess (the origin's URLs are their own targets) was wrong.
        if (
            isinstance(resolution, HttpResolution)
            and self._targets.pop(resolution.url, None) is None
        ):
            self._direct.discard(_origin(resolution.url))

    # -- reads ------------------------------------------------------------------------------
    async def read_range(self, pointer: Pointer, start: int, end: int, sink: Sink) -> None:
        resolution = pointer.resolution
        if not isinstance(resolution, HttpResolution):
            raise ProviderError(f"{pointer.file_name}: not an http pointer")
        if end <= start:
            return
        url = resolution.url
        for attempt in range(2):
            try:
                await self._read(pointer, url, start, end, sink)
                return
            except AccessDenied:
                # A cached (signed) URL may have expired: resolve again, once.
                if attempt == 0 and url in self._targets and self._targets[url].url != url:
                    log.info("signed URL for %s refused; resolving again", pointer.file_name)
                    self._targets.pop(url, None)
                    continue
                raise

    async def _read(self, pointer: Pointer, url: str, start: int, end: int, sink: Sink) -> None:
        while True:
            target = self._targets.get(url)
            if target is not None and time.monotonic() >= target.expires_at:
                self._targets.pop(url, None)
                target = None
            if target is not None:
                await self._get(pointer, target.url, target.auth, start, end, sink)
                return
            pending = self._resolving.get(url)
            if pending is None:
                break
            # Single-flight the resolution: wait for whoever is following the redirect, then
            # look again (it may have failed, and another waiter may have taken over). A final
            # answer (404, 403, stale size) is shared: the waiters fail with it, no new request.
            await pending.wait()
            final = self._final_errors.get(pending)
            if final is not None:
                raise final
        done = self._resolving[url] = trio.Event()
        try:
            await self._get(pointer, url, self.is_hub(url), start, end, sink, resolve_for=url)
        except (ObjectNotFound, AccessDenied, StaleManifest) as e:
            self._final_errors[done] = e
            raise
        finally:
            self._resolved(url, done)

    def _resolved(self, url: str, event: trio.Event) -> None:
        """End a resolution: forget it (if still ours) and wake its waiters."""
        if self._resolving.get(url) is event:
            del self._resolving[url]
        event.set()
        if len(self._final_errors) > 1024:  # waiters read theirs right after waking
            self._final_errors.clear()

    async def _get(
        self,
        pointer: Pointer,
        url: str,
        auth: bool,
        start: int,
        end: int,
        sink: Sink,
        *,
        resolve_for: str | None = None,
    ) -> None:
        """One ranged GET, following redirects by hand when resolving a manifest URL."""
        for _hop in range(MAX_REDIRECTS + 1):
            headers = self._headers(pointer, auth, start, end)
            request = self._client.build_request("GET", url, headers=headers)
            self.requests += 1
            with mapped(url):
                response = await self._client.send(request, stream=True)
            try:
                if response.is_redirect and "location" in response.headers:
                    if resolve_for is not None:
                        self._direct.discard(_origin(resolve_for))
                    next_url = urljoin(url, response.headers["location"])
                    if _origin(next_url) != _origin(url):
                        auth = False  # never carry the token to another origin
                    log.debug("redirect %s -> %s", redact_url(url), redact_url(next_url))
                    url = next_url
                    continue
                if response.status_code not in (200, 206):
                    status_error(response, url, pointer)
                if resolve_for is not None:
                    if url == resolve_for:
                        self._direct.add(_origin(url))
                    ttl = _signed_url_ttl(url)
                    # Keep a 30 s margin so a range is not started on a URL about to expire.
                    self._targets[resolve_for] = _Target(url, auth, time.monotonic() + ttl - 30)
                    # Waiters can go straight to the target now, not after this whole body.
                    pending = self._resolving.get(resolve_for)
                    if pending is not None:
                        self._resolved(resolve_for, pending)
                    resolve_for = None
                await stream_body(pointer, url, response, start, end, sink)
                return
            finally:
                await response.aclose()
        raise ProviderError(f"too many redirects for {redact_url(url)} ({pointer.file_name})")
