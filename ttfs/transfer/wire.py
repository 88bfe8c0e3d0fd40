"""One ranged GET over ``http.client``, into a reused buffer or spliced (the range-body path).

Why not httpx here: on the 2-core VM, httpx + h11 over trio cost 3.9-4.5 CPU-s per GB on plain
HTTP and several times more over HTTPS, where trio's SSL stream decrypts in Python-driven 16 KiB
records. ``HTTPResponse.readinto`` of a 1 MiB ``memoryview`` runs the whole socket (or TLS)
read loop in C (``BufferedReader.readinto`` fills the buffer), so a MiB costs a handful of
Python calls; the bytes are then ``pwrite``n and hashed from that same buffer, never copied
(docs/performance.md has the figures). A plain-HTTP 206 body given a :class:`SpliceTarget`
skips user space altogether: ``splice`` socket -> pipe -> file (:func:`_splice_body`), one
kernel copy per byte instead of two. httpx stays for everything else (redirect resolution,
signing, the in-process path with ``--workers 0``).

Checks are the same as the httpx path's (:mod:`ttfs.providers._stream`): status mapping onto the
error tree, ``Content-Range`` start and total (a differing total is
:class:`~ttfs.errors.StaleManifest`), short bodies, servers that ignore ``Range``. Nothing here
logs or raises a URL with its query string (signed URLs carry credentials there).

Proxies: this path connects directly and ignores ``HTTP(S)_PROXY``, as upstream truss-transfer
does for range downloads. That choice lives here and only here.

TLS trust: :func:`ssl.create_default_context`, i.e. the system store, or ``SSL_CERT_FILE`` /
``SSL_CERT_DIR`` when set (OpenSSL reads them), the same variables httpx honours.
"""

from __future__ import annotations

import errno
import fcntl
import http.client
import os
import re
import select
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Protocol
from urllib.parse import urlsplit

from ..errors import (
    AccessDenied,
    ObjectNotFound,
    ProviderError,
    Redirected,
    StaleManifest,
    TransientError,
)

CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
USER_AGENT = "ttfs/0.1"

# Body bytes read per readinto/pwrite: one MiB keeps the per-MiB Python work to a few calls.
BUFFER = 1024 * 1024

Chunk = Callable[[memoryview], None]

# Bytes per splice on the plain-HTTP path: the pipe is grown to one MiB (the default 64 KiB
# would cost 16 splice pairs per MiB); /proc/sys/fs/pipe-max-size is 1 MiB by default, and a
# refusal just leaves the default size.
PIPE = 1024 * 1024
# splice() refusals that mean "not for this pair of files" (no data moved): read instead.
NO_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class SpliceTarget(Protocol):
    """A body's destination file, for the plain-HTTP path that never copies into user space.

    ``from_pipe(pipe, n)`` moves the ``n`` bytes waiting in ``pipe`` into the file at the next
    body offset (``splice``), accounts them like a written chunk and raises the same errors
    (:class:`~ttfs.errors.CacheFull` & co.).
    """

    def from_pipe(self, pipe: int, n: int) -> None: ...


def redact_url(url: str) -> str:
    """A URL safe to log: no query string (signatures, tokens) and no userinfo."""
    base = url.split("?", 1)[0].split("#", 1)[0]
    scheme, sep, rest = base.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def status_error(
    status: int,
    retry_after: float | None,
    safe_url: str,
    name: str,
    size: int,
    etag: str | None = None,
) -> ProviderError:
    """The error a non-2xx status means; the one mapping both body paths use.

    408/425/429/5xx are transient; 404 is :class:`ObjectNotFound`; 401/403/410
    :class:`AccessDenied`; 412 (an ``If-Match`` etag that no longer matches) and 416 (a range
    beyond the object's end) mean the object is not the one the manifest describes; a 3xx
    (only a worker sees one: the in-process path follows redirects) is :class:`Redirected`.
    """
    where = f"HTTP {status} from {safe_url} for {name}"
    if status in TRANSIENT_STATUS or 500 <= status < 600:
        return TransientError(where, retry_after=retry_after, kind=f"http_{status}")
    if 300 <= status < 400:
        return Redirected(where)
    if status == 404:
        return ObjectNotFound(where)
    if status in (401, 403, 410):
        return AccessDenied(where)
    if status == 412:
        was = f" (its etag is no longer {etag!r})" if etag else ""
        return StaleManifest(
            f"{name}: the object changed since the manifest was made{was}; re-create the "
            f"manifest ({safe_url})"
        )
    if status == 416:
        return StaleManifest(
            f"{name}: range not satisfiable at {safe_url}: the object is smaller than the "
            f"manifest's {size} bytes (stale manifest?)"
        )
    return ProviderError(where)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta form; an HTTP date is left to the backoff)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class Connections:
    """Keep-alive connections of one thread, per (scheme, host, port)."""

    def __init__(self, connect_timeout: float, stall_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self._conns: dict[tuple[str, str, int], http.client.HTTPConnection] = {}
        self._tls: ssl.SSLContext | None = None

    def get(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        key = (scheme, host, port)
        conn = self._conns.get(key)
        if conn is None:
            if scheme == "https":
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                conn = http.client.HTTPSConnection(
                    host, port, timeout=self.connect_timeout, context=self._tls
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
            self._conns[key] = conn
        return conn

    def drop(self, scheme: str, host: str, port: int) -> None:
        conn = self._conns.pop((scheme, host, port), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


def ranged_get(
    conns: Connections,
    url: str,
    headers: Mapping[str, str],
    start: int,
    end: int,
    *,
    name: str,
    size: int,
    buf: memoryview,
    on_chunk: Chunk,
    limit: Callable[[int], int] | None = None,
    cancelled: Callable[[], bool] | None = None,
    splice_to: SpliceTarget | None = None,
) -> None:
    """GET ``[start, end)`` of ``url`` and feed the body to ``on_chunk`` in order.

    ``limit(n)`` may shrink each read (the worker keeps reads inside one block); ``cancelled``
    is polled between reads. ``buf`` is reused: ``on_chunk`` must be done with a view before
    returning. With ``splice_to``, a plain-HTTP 206 body goes socket -> pipe -> file in the
    kernel instead (:func:`_splice_body`); the bytes http.client already buffered still go
    through ``on_chunk`` first. TLS bodies always take ``on_chunk``.

    Raises:
        TransientError: timeouts, resets, short bodies, bad ``Content-Range``, 408/429/5xx.
        ObjectNotFound, AccessDenied, StaleManifest, ProviderError: see :func:`status_error`.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    host = parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    safe = redact_url(url)
    request_headers = {
        "Host": parts.netloc.rsplit("@", 1)[-1],
        "User-Agent": USER_AGENT,
        "Accept-Encoding": "identity",
        "Range": f"bytes={start}-{end - 1}",
    }
    request_headers.update(headers)
    reuse = False
    try:
        for fresh in (False, True):
            conn = conns.get(scheme, host, port)
            try:
                conn.request("GET", target, headers=request_headers)
                response = conn.getresponse()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A kept-alive connection the server closed while idle: once more, afresh.
                conns.drop(scheme, host, port)
                if fresh:
                    raise
        if conn.sock is not None:
            conn.sock.settimeout(conns.stall_timeout)
        splice = None
        sock = conn.sock
        # TLS bytes must be decrypted in user space: only a plain socket can splice.
        if splice_to is not None and sock is not None and not isinstance(sock, ssl.SSLSocket):
            splice = (sock, splice_to, conns.stall_timeout)
        reuse = _stream(
            response, safe, start, end, name, size, buf, on_chunk, limit, cancelled, splice
        )
    except ssl.SSLCertVerificationError as e:
        # Not worth a retry budget: the CA will not become trusted by waiting.
        raise ProviderError(
            f"TLS certificate of {safe} is not trusted ({e.verify_message}); "
            "set SSL_CERT_FILE to a CA bundle that holds its issuer"
        ) from None
    except TimeoutError as e:
        raise TransientError(f"timed out on {safe} ({type(e).__name__})", kind="timeout") from None
    except (OSError, http.client.HTTPException) as e:
        raise TransientError(
            f"network error on {safe}: {type(e).__name__}: {e}", kind="network"
        ) from None
    finally:
        if not reuse:
            conns.drop(scheme, host, port)


def _stream(
    response: http.client.HTTPResponse,
    safe: str,
    start: int,
    end: int,
    name: str,
    size: int,
    buf: memoryview,
    on_chunk: Chunk,
    limit: Callable[[int], int] | None,
    cancelled: Callable[[], bool] | None,
    splice: tuple[socket.socket, SpliceTarget, float] | None = None,
) -> bool:
    """Check the answer and stream its body; True when the connection can be reused."""
    status = response.status
    if status not in (200, 206):
        retry_after = parse_retry_after(response.getheader("retry-after"))
        raise status_error(status, retry_after, safe, name, size)
    skip = 0
    if status == 206:
        m = CONTENT_RANGE.match(response.getheader("content-range", ""))
        if not m:
            raise TransientError(f"bad Content-Range from {safe}", kind="bad_range")
        first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
        if total != "*" and int(total) != size:
            raise StaleManifest(
                f"{name}: origin object has {total} bytes but the manifest says {size} "
                f"(stale manifest?) at {safe}"
            )
        if first != start or last < start:
            raise TransientError(
                f"origin answered range {first}-{last}, asked {start}-{end - 1}", kind="bad_range"
            )
    else:
        length = response.getheader("content-length")
        if length is not None and int(length) != size:
            raise StaleManifest(
                f"{name}: origin object has {length} bytes but the manifest says {size} "
                f"(stale manifest?) at {safe}"
            )
        skip = start  # the server ignored Range: read up to our start and drop it
    want = end - start
    got = 0
    if splice is not None and status == 206 and not response.chunked and response.length:
        # Whatever http.client read past the headers sits in its buffer: take that through
        # on_chunk (peek never reads the socket while the buffer holds bytes), then splice.
        buffered = len(response.fp.peek(0)) if response.fp is not None else 0
        buffered = min(buffered, want)
        while got < buffered:
            n = buffered - got if limit is None else limit(buffered - got)
            k = response.readinto(buf[:n])
            if not k:
                break
            on_chunk(buf[:k])
            got += k
        if got == buffered and got < want:
            sock, target, stall = splice
            spliced = _splice_body(sock, target, want - got, stall, limit, cancelled)
            if spliced is None:
                return False  # cancelled
            got += spliced
            if response.length is not None:
                response.length -= spliced
    while got < want:
        if cancelled is not None and cancelled():
            return False
        n = min(len(buf), want - got) if not skip else min(len(buf), skip)
        if limit is not None and not skip:
            n = limit(n)
        view = buf[:n]
        k = response.readinto(view)
        if not k:
            break
        if skip:
            skip -= k
            continue
        on_chunk(view[:k])
        got += k
    if got < want:
        raise TransientError(
            f"short body from {safe}: {got} of {want} bytes ({name})", kind="short_body"
        )
    if status != 206:
        return False  # a 200 body goes on past our range: drop the connection
    # Drain what is left of a 206 body (nothing, normally) so the connection is reusable.
    if response.length:
        return False
    response.read()
    return not response.will_close


def _splice_body(
    sock: socket.socket,
    target: SpliceTarget,
    want: int,
    stall: float,
    limit: Callable[[int], int] | None,
    cancelled: Callable[[], bool] | None,
) -> int | None:
    """Move up to ``want`` body bytes socket -> pipe -> file; the count moved (None: cancelled).

    Why: ``recv`` into a buffer and ``pwrite`` from it copy every byte twice; ``splice`` from a
    TCP socket into a pipe only takes references to the received pages, so the one copy left
    is the page-cache write (docs/performance.md: ~0.3-0.5 CPU-s per GB less on plain HTTP).
    The target reads each piece back from the page cache (still hot) for its block checksum.

    The socket is non-blocking (http.client's timeout): an empty socket is ``poll``ed for the
    stall timeout, then :class:`TimeoutError`. Fewer than ``want`` bytes: the body ended early
    (the caller's short-body check). A refusal of splice for this socket (an exotic socket
    type) returns what was moved; the caller reads the rest the usual way.
    """
    got = 0
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            cap = fcntl.fcntl(w, _SETPIPE_SZ, PIPE)
        except OSError:
            cap = 64 * 1024
        fd = sock.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        wait_ms = max(1, int(stall * 1000))
        while got < want:
            if cancelled is not None and cancelled():
                return None
            n = min(cap, want - got)
            if limit is not None:
                n = limit(n)
            try:
                k = os.splice(fd, w, n, flags=os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE)
            except BlockingIOError:
                if not poller.poll(wait_ms):
                    raise TimeoutError("no body bytes within the stall timeout") from None
                continue
            except OSError as e:
                if e.errno in NO_SPLICE:
                    return got
                raise
            if not k:
                return got  # EOF
            target.from_pipe(r, k)
            got += k
        return got
    finally:
        os.close(r)
        os.close(w)
