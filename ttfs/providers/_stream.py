"""The data plane every provider shares: one ranged GET, checked and streamed into a sink.

HTTP(S), Hugging Face, S3 (presigned URLs), GCS (media downloads) and Azure (SAS URLs) all end
in the same request: ``GET url`` with ``Range: bytes=a-b``. Doing it in one place means one
mapping of transport errors and statuses onto the error tree, one set of ``Content-Range`` and
size checks (a differing total is a :class:`~ttfs.errors.StaleManifest`, never silent
corruption), one treatment of servers that ignore ``Range``, and one tuned httpx client
configuration, whatever the origin.

Nothing here logs or raises a URL with its query string: signed URLs carry their credentials
there (S3 ``X-Amz-Signature``, Azure ``sig``), so every message goes through
:func:`~ttfs.providers.base.redact_url`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from email.utils import parsedate_to_datetime
from typing import NoReturn

import httpx

from ..config import Settings
from ..errors import StaleManifest, TransientError
from ..manifest import Pointer
from ..procs import own_process
from ..transfer.wire import CONTENT_RANGE
from ..transfer.wire import status_error as wire_status_error
from .base import Sink, redact_url

log = logging.getLogger(__name__)

# httpcore reads the socket 64 KiB at a time; every read costs a trip through h11, httpcore and
# trio. 256 KiB reads cut the client's CPU per byte by ~20% on the 2-core VM (measured: 128 MiB
# in 8 ranges, 0.51 s CPU at 64 KiB vs 0.41 s at 256 KiB).
SOCKET_READ = 256 * 1024


def tune_httpcore() -> None:
    """Raise httpcore's socket read size, process-wide: for processes ttfs owns.

    A class attribute of a private module, so it changes every httpx client in the process:
    the ``ttfs`` and ``truss-transfer-cli`` commands call it at start; ``import ttfs`` or
    ``import truss_transfer`` in someone else's process does not (their clients stay as
    they were; ours read 64 KiB at a time there). If a future httpcore drops the attribute,
    only the speed-up is lost.
    """
    with contextlib.suppress(ImportError, AttributeError):
        from httpcore._async.http11 import AsyncHTTP11Connection

        current = AsyncHTTP11Connection.READ_NUM_BYTES
        AsyncHTTP11Connection.READ_NUM_BYTES = max(current, SOCKET_READ)


def data_proxy(settings: Settings) -> str | None:
    """The proxy the data plane (every ranged GET, every origin) uses: ``TTFS_PROXY`` or none.

    ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` are ignored here, as upstream's range
    downloader ignores them: pods set them for other traffic, and tens of GB of weights must
    not detour through a proxy sized for API calls. Whoever needs one for the weights names it
    in ``TTFS_PROXY``. (The control plane, the SDKs that list buckets and repos, follows the
    environment as those SDKs always do; ttfs never edits the process environment.)
    """
    return settings.proxy


def make_client(settings: Settings) -> httpx.AsyncClient:
    """The httpx client of one provider: pooled keep-alive connections, stall timeouts.

    Redirects are not followed: a provider that expects them (Hugging Face) follows them itself
    so that it decides where a token may go. The transport is built here, so httpx does not
    mount the environment's proxies (:func:`data_proxy` decides); ``SSL_CERT_FILE`` and
    ``SSL_CERT_DIR`` are still honoured.
    """
    limits = httpx.Limits(
        max_connections=settings.max_connections + 8,
        max_keepalive_connections=settings.max_connections + 8,
        keepalive_expiry=30.0,
    )
    timeout = httpx.Timeout(
        connect=settings.connect_timeout,
        read=settings.stall_timeout,  # no byte for this long = a stalled range
        write=settings.stall_timeout,
        pool=None,  # the scheduler bounds concurrency; waiting for a slot is not a stall
    )
    if own_process():
        tune_httpcore()  # a ttfs command's own process (ttfs.procs.claim_process)
    transport = httpx.AsyncHTTPTransport(limits=limits, proxy=data_proxy(settings))
    return httpx.AsyncClient(
        transport=transport,
        timeout=timeout,
        follow_redirects=False,
        headers={"user-agent": "ttfs/0.1", "accept-encoding": "identity"},
    )


def retry_after(response: httpx.Response) -> float | None:
    """The server's ``Retry-After`` in seconds (delta or HTTP date), or None."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    return None


@contextlib.contextmanager
def mapped(url: str) -> Iterator[None]:
    """Translate httpx transport errors into our tree, once, for every request."""
    try:
        yield
    except httpx.TimeoutException as e:
        raise TransientError(f"timed out on {redact_url(url)} ({type(e).__name__})") from e
    except httpx.TransportError as e:
        raise TransientError(f"network error on {redact_url(url)}: {type(e).__name__}: {e}") from e


def status_error(response: httpx.Response, url: str, pointer: Pointer) -> NoReturn:
    """Raise the error a non-2xx status means for ``pointer``.

    The mapping is :func:`ttfs.transfer.wire.status_error`, shared with the workers' body path.
    """
    raise wire_status_error(
        response.status_code,
        retry_after(response),
        redact_url(url),
        pointer.file_name,
        pointer.size,
        pointer.hash,
    )


async def stream_body(
    pointer: Pointer, url: str, response: httpx.Response, start: int, end: int, sink: Sink
) -> None:
    """Check a 200/206 answer to ``Range: bytes=start-(end-1)`` and feed its bytes to ``sink``.

    Raises:
        StaleManifest: the object's total size differs from the manifest's.
        TransientError: a bad ``Content-Range``, the wrong range, or a short body.
    """
    skip = 0
    if response.status_code == 206:
        m = CONTENT_RANGE.match(response.headers.get("content-range", ""))
        if not m:
            raise TransientError(f"bad Content-Range from {redact_url(url)}")
        first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
        if total != "*" and int(total) != pointer.size:
            raise StaleManifest(
                f"{pointer.file_name}: origin object has {total} bytes but the manifest "
                f"says {pointer.size} (stale manifest?) at {redact_url(url)}"
            )
        if first != start or last < start:
            raise TransientError(f"origin answered range {first}-{last}, asked {start}-{end - 1}")
    else:
        # 200: the server ignored Range. Correct but wasteful: skip to our start.
        length = response.headers.get("content-length")
        if length is not None and int(length) != pointer.size:
            raise StaleManifest(
                f"{pointer.file_name}: origin object has {length} bytes but the manifest "
                f"says {pointer.size} (stale manifest?) at {redact_url(url)}"
            )
        skip = start
        log.warning("%s ignores Range requests; reading the whole body", redact_url(url))
    want = end - start
    got = 0
    with mapped(url):
        # No chunk_size: re-chunking copies every byte through a BytesIO.
        async for chunk in response.aiter_raw():
            view = memoryview(chunk)
            if skip:
                cut = min(skip, len(view))
                view = view[cut:]
                skip -= cut
                if not view:
                    continue
            if got + len(view) > want:
                view = view[: want - got]
            if view:
                sink(view)
                got += len(view)
            if got >= want and skip == 0 and response.status_code != 206:
                return  # a 200 body goes on past our range: drop the connection
            # A 206 body ends by itself: reading to its end returns the connection to the
            # pool (returning early would close it).
    if got < want:
        raise TransientError(
            f"short body from {redact_url(url)}: {got} of {want} bytes ({pointer.file_name})"
        )


async def ranged_get(
    client: httpx.AsyncClient,
    pointer: Pointer,
    url: str,
    start: int,
    end: int,
    sink: Sink,
    headers: Mapping[str, str] | None = None,
) -> None:
    """One ranged GET of ``[start, end)`` at ``url`` (no redirects), streamed into ``sink``.

    A redirect is an error here: signed cloud URLs never redirect, and following one would carry
    ``headers`` (possibly a bearer token) to a host nobody vetted.

    Raises:
        ProviderError: the subclass :func:`status_error` and :func:`stream_body` pick.
    """
    if end <= start:
        return
    request_headers = {"range": f"bytes={start}-{end - 1}"}
    if headers:
        request_headers.update(headers)
    request = client.build_request("GET", url, headers=request_headers)
    with mapped(url):
        response = await client.send(request, stream=True)
    try:
        if response.status_code not in (200, 206):
            status_error(response, url, pointer)
        await stream_body(pointer, url, response, start, end, sink)
    finally:
        await response.aclose()
