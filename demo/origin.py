"""A local HTTP origin that behaves like the servers ttfs talks to, with fault injection.

ttfs must be tested against something that speaks real HTTP/1.1 over a real socket: keep-alive,
byte ranges, HuggingFace's 302-to-signed-CDN dance, and the ways origins fail (5xx, resets, short
bodies, stalls, stale sizes, expired URLs). Mocks at the client layer cannot exercise the
transport; nginx cannot be scripted from a test and is not always installed. This module is the
one origin used by the test suite ("the counting origin"), by ``make run`` as the demo origin and
by benchmarks. It is stdlib-only so that it runs anywhere the package runs.

Two listeners share one :class:`Origin`:

* the **hub** (``base_url``) serves ``/files/<path>`` (plain Range-capable files), the HF-style
  ``/{org}/{repo}/resolve/{revision}/{path}`` (302 to the CDN for big "LFS" files, 200 for small
  git files) and a minimal read-only ``/api/models/...``;
* the **CDN** (``cdn_url``) serves ``/cdn/{org}/{repo}/{path}?expires=..&sig=..`` with an HMAC
  signature and an expiry, like a presigned CloudFront/S3 URL.

Both listeners run the same handler, so every route answers on either port; only the URLs that
:class:`Origin` hands out keep the roles apart. Every request is counted in :class:`OriginStats`
so tests can assert on what actually went over the wire (bytes, ranges, headers per port).

Unthrottled, un-faulted bodies go out with ``os.sendfile`` (the Python client, not this server,
is then the bottleneck); throttled bodies go through a paced ``os.pread`` + ``sendall`` loop.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import random
import re
import secrets
import signal
import socket
import socketserver
import ssl
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from ttfs.units import KiB, MiB, parse_size

logger = logging.getLogger(__name__)

LFS_THRESHOLD = 10 * MiB
"""Files at least this big are "LFS" files on the hub: resolve answers 302 to the CDN."""

_SENDFILE_MAX = 1 << 30
_INLINE_MAX = 64 * KiB
_PACED_CHUNK_MAX = 256 * KiB
_PACED_CHUNK_MIN = 4 * KiB
_POLL_INTERVAL = 0.05
_HASH_CHUNK = 1 * MiB
_FAULT_KINDS = ("error", "reset", "truncate", "stall")
_RANGE_RE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class Faults:
    """What goes wrong, and how often, on body-carrying GETs.

    Probabilities are in ``[0, 1]`` and are decided per data request with a ``random.Random``
    seeded from :attr:`seed`, so a failing test replays the same sequence. At most one of
    error/reset/truncate/stall hits a request (checked in that order). Redirects, HEADs and
    error replies are never faulted. Replace or mutate the object at run time; a new object or
    a new seed restarts the random sequence.
    """

    error_rate: float = 0.0
    """Reply :attr:`error_status` before sending anything."""
    error_status: int = 503
    retry_after: float | None = None
    """If set, injected errors carry ``Retry-After`` (seconds)."""
    reset_rate: float = 0.0
    """Send headers and part of the body, then reset the connection (RST)."""
    truncate_rate: float = 0.0
    """Send headers with the full Content-Length, part of the body, then close cleanly (FIN)."""
    stall_rate: float = 0.0
    """Send headers and part of the body, then go silent for :attr:`stall_seconds`."""
    stall_seconds: float = 30.0
    wrong_total: int | None = None
    """If set, every ``Content-Range`` reports this total instead of the real size."""
    seed: int = 0


@dataclass
class PathStats:
    """Per-URL-path counters; ``ranges`` are inclusive ``(start, end)`` as announced."""

    requests: int = 0
    bytes: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it. ``status`` 0 means it was dropped without a reply."""

    method: str
    port: int
    path: str
    headers: dict[str, str]
    status: int
    time: float


class OriginStats:
    """Thread-safe counters of what the origin did; read a consistent copy with :meth:`snapshot`.

    Body bytes are counted *before* they are written and corrected down if the write fails, so a
    client that has received a body always sees it counted already.
    """

    def __init__(self, *, keep_log: bool = True) -> None:
        self._lock = threading.Lock()
        self.keep_log = keep_log
        """False skips ``request_log`` and ``ranges`` (unbounded lists) for long benchmarks."""
        self.requests = 0
        """Every request, including dropped ones and errors."""
        self.data_requests = 0
        """GETs that started sending file content (200/206), faulted ones included."""
        self.bytes_sent = 0
        """File body bytes written to sockets."""
        self.connections = 0
        """Accepted TCP connections: keep-alive reuse keeps this low."""
        self.by_path: dict[str, PathStats] = {}
        """Keyed by the unquoted URL path without query, e.g. ``/files/a/b.bin``."""
        self.request_log: list[RequestRecord] = []
        self.faults_injected: dict[str, int] = {}

    def snapshot(self) -> OriginStats:
        """A deep copy taken under the lock, safe to inspect while the server keeps running."""
        copy = OriginStats(keep_log=self.keep_log)
        with self._lock:
            copy.requests = self.requests
            copy.data_requests = self.data_requests
            copy.bytes_sent = self.bytes_sent
            copy.connections = self.connections
            copy.by_path = {
                k: PathStats(v.requests, v.bytes, list(v.ranges)) for k, v in self.by_path.items()
            }
            copy.request_log = [
                RequestRecord(r.method, r.port, r.path, dict(r.headers), r.status, r.time)
                for r in self.request_log
            ]
            copy.faults_injected = dict(self.faults_injected)
        return copy

    def reset(self) -> None:
        """Zero everything in place, so references held by tests stay valid."""
        with self._lock:
            self.requests = self.data_requests = self.bytes_sent = self.connections = 0
            self.by_path.clear()
            self.request_log.clear()
            self.faults_injected.clear()

    # -- recording (called by the handler) ---------------------------------------------------

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests += 1
            self.by_path.setdefault(record.path, PathStats()).requests += 1
            if self.keep_log:
                self.request_log.append(record)

    def _start_body(self, path: str, start: int, end: int, planned: int) -> None:
        with self._lock:
            self.data_requests += 1
            self.bytes_sent += planned
            ps = self.by_path.setdefault(path, PathStats())
            ps.bytes += planned
            if end >= start and self.keep_log:
                ps.ranges.append((start, end))

    def _unsent(self, path: str, n: int) -> None:
        with self._lock:
            self.bytes_sent -= n
            self.by_path.setdefault(path, PathStats()).bytes -= n

    def _fault(self, kind: str) -> None:
        with self._lock:
            self.faults_injected[kind] = self.faults_injected.get(kind, 0) + 1

    def _connection(self) -> None:
        with self._lock:
            self.connections += 1


class _ShortFile(OSError):
    """The file shrank while it was being served; the only honest reply is to drop the link."""


class _Pacer:
    """Token bucket for one response: keeps the average rate at or below ``rate`` bytes/s."""

    def __init__(self, rate: float, stopping: threading.Event) -> None:
        self.rate = rate
        self.stopping = stopping
        self.chunk = int(min(max(rate / 50, _PACED_CHUNK_MIN), _PACED_CHUNK_MAX))
        self.restart()

    def restart(self) -> None:
        """Forget history, e.g. after a stall, so the lost time is not made up in a burst."""
        self.t0 = time.monotonic()
        self.sent = 0

    def wait(self) -> bool:
        """Sleep until the bytes sent so far are paid for; False when the server is stopping."""
        delay = self.t0 + self.sent / self.rate - time.monotonic()
        return delay <= 0 or not self.stopping.wait(delay)


class _Listener(ThreadingHTTPServer):
    """One listening socket (hub or CDN) whose connections are tracked for a fast stop."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], origin: Origin, role: str) -> None:
        self.origin = origin
        self.role = role
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can hang
        # for seconds on an offline machine; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        tls = self.origin.tls
        if tls is not None:
            # The handshake runs in the handler's thread, at its first read, not here.
            sock = tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def process_request(self, request: Any, client_address: Any) -> None:
        self.origin._track(request)
        self.origin.stats._connection()
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.origin._untrack(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hang up mid-body all the time (that is what the fault tests do on purpose);
        # the stdlib would print a traceback to stderr for each one.
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            logger.debug("connection from %s ended: %r", client_address, exc)
        else:
            logger.exception("origin handler failed for %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    """Routes one connection's requests; see the module docstring for the URL space."""

    protocol_version = "HTTP/1.1"
    server_version = "ttfs-origin/1"
    disable_nagle_algorithm = True
    server: _Listener

    _t0: float = 0.0
    _path_key: str = ""
    _body_sent: int = 0

    # -- plumbing ------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s:%d %s", self.server.role, self.server.server_port, format % args)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        self._t0 = time.time()
        self._path_key = unquote(urlsplit(self.path).path)
        if self.server.origin._down:
            # "Origin down": drop the connection without a reply, like a crashed backend
            # behind a load balancer.
            self._record(0)
            self.close_connection = True
            return False
        return True

    def _record(self, status: int) -> None:
        self.server.origin.stats._record(
            RequestRecord(
                method=self.command,
                port=self.server.server_port,
                path=self._path_key,
                headers={k.lower(): v for k, v in self.headers.items()},
                status=status,
                time=self._t0,
            )
        )

    def _start_response(
        self, status: int, headers: list[tuple[str, str]], body: bytes = b""
    ) -> None:
        """Send status, headers and an optional small body in one write.

        One write (rather than the stdlib's header flush plus a body write) saves a packet and
        a syscall per request, which is most of the cost of a 4 KiB range round trip. The
        request is counted first, so a client can never see a reply before the stats do.
        """
        self.log_request(status)
        phrase = self.responses.get(status, ("",))[0]
        lines = [
            f"{self.protocol_version} {status} {phrase}",
            f"Server: {self.version_string()}",
            f"Date: {self.date_time_string()}",
            *(f"{name}: {value}" for name, value in headers),
        ]
        if self.close_connection:
            lines.append("Connection: close")
        self._record(status)
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _reply(
        self,
        status: int,
        body: bytes,
        *,
        head: bool,
        content_type: str = "text/plain; charset=utf-8",
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        """A small complete reply (errors, redirects, JSON) that keeps the connection usable."""
        all_headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        self._start_response(status, all_headers + (headers or []), b"" if head else body)

    def _error(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        head: bool,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        headers = list(extra or [])
        if code is not None:
            headers += [("X-Error-Code", code), ("X-Error-Message", message)]
        self._reply(status, f"{message}\n".encode(), head=head, headers=headers)

    def _abort(self) -> None:
        """Reset the connection: SO_LINGER 0 makes close() send RST instead of FIN."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        # rfile holds a reference on the socket; both must go for the fd to really close.
        self.rfile.close()
        self.connection.close()

    # -- dispatch ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, *, head: bool) -> None:
        origin = self.server.origin
        try:
            latency = origin.latency
            if latency > 0 and origin._stopping.wait(latency):
                self.close_connection = True
                return
            split = urlsplit(self.path)
            raw = split.path
            if raw.startswith("/files/"):
                self._serve_local(unquote(raw[len("/files/") :]), head=head)
            elif raw.startswith("/cdn/"):
                self._serve_cdn(unquote(raw[len("/cdn/") :]), split.query, head=head)
            elif raw.startswith("/api/"):
                self._serve_api(raw, split.query, head=head)
            else:
                parts = raw.lstrip("/").split("/")
                if len(parts) >= 5 and parts[2] == "resolve" and all(parts[:4]):
                    org, repo, _, revision = (unquote(p) for p in parts[:4])
                    rel = unquote("/".join(parts[4:]))
                    self._serve_resolve(org, repo, revision, rel, head=head)
                else:
                    self._error(404, None, "Not Found", head=head)
        except OSError as exc:
            # The client went away (or stop() shut the socket); nothing left to say to it.
            logger.debug("request %s %s ended early: %r", self.command, self._path_key, exc)
            self.close_connection = True

    # -- routes --------------------------------------------------------------------------------

    def _serve_local(self, rel: str, *, head: bool) -> None:
        path = self.server.origin._local_path(rel)
        if path is None:
            self._error(400, None, "Bad path", head=head)
            return
        self._serve_file(path, head=head)

    def _serve_cdn(self, rel: str, query: str, *, head: bool) -> None:
        origin = self.server.origin
        params = parse_qs(query)
        try:
            expires = int(params["expires"][0])
            sig = params["sig"][0]
        except (KeyError, ValueError, IndexError):
            self._error(403, "AccessDenied", "Missing or malformed signature", head=head)
            return
        if not hmac.compare_digest(sig, origin._sign(rel, expires)):
            self._error(403, "AccessDenied", "Signature does not match", head=head)
            return
        if origin._is_expired(expires):
            self._error(403, "AccessDenied", "Request has expired", head=head)
            return
        path = origin._local_path(rel)
        if path is None:
            self._error(400, None, "Bad path", head=head)
            return
        self._serve_file(path, head=head)

    def _authorized(self) -> bool:
        token = self.server.origin.hub_token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def _serve_resolve(self, org: str, repo: str, revision: str, rel: str, *, head: bool) -> None:
        origin = self.server.origin
        if not self._authorized():
            self._error(
                401, "RepoNotFound", "Invalid credentials in Authorization header", head=head
            )
            return
        repo_dir = origin._local_path(f"{org}/{repo}")
        if repo_dir is None or not repo_dir.is_dir():
            self._error(404, "RepoNotFound", "Repository not found", head=head)
            return
        path = origin._local_path(f"{org}/{repo}/{rel}")
        if path is None or not path.is_file():
            self._error(404, "EntryNotFound", "Entry not found", head=head)
            return
        commit = [("X-Repo-Commit", revision)]
        size = path.stat().st_size
        if size < origin.lfs_threshold:
            etag = f'"{origin._git_sha1(path)}"'
            self._serve_file(path, head=head, etag=etag, extra=commit)
            return
        sha256 = origin._sha256(path)
        headers = [
            *commit,
            ("Location", origin.signed_url(f"{org}/{repo}/{rel}")),
            ("X-Linked-Size", str(size)),
            ("X-Linked-Etag", f'"{sha256}"'),
            ("ETag", f'"{origin._lfs_pointer_oid(path)}"'),
        ]
        self._reply(302, b"", head=head, headers=headers)

    def _serve_api(self, raw: str, query: str, *, head: bool) -> None:
        origin = self.server.origin
        if not self._authorized():
            self._error(
                401, "RepoNotFound", "Invalid credentials in Authorization header", head=head
            )
            return
        parts = [unquote(p) for p in raw.split("/")[3:]]  # after /api/models/
        if not raw.startswith("/api/models/") or len(parts) < 2:
            self._error(404, None, "Not Found", head=head)
            return
        org, repo, rest = parts[0], parts[1], parts[2:]
        repo_dir = origin._local_path(f"{org}/{repo}")
        if repo_dir is None or not repo_dir.is_dir():
            self._error(404, "RepoNotFound", "Repository not found", head=head)
            return
        params = parse_qs(query)
        payload: object
        if not rest or (len(rest) == 2 and rest[0] == "revision"):
            revision = rest[1] if rest else "main"
            blobs = params.get("blobs", ["false"])[0].lower() == "true"
            payload = origin._model_info(repo_dir, f"{org}/{repo}", revision, blobs=blobs)
        elif len(rest) >= 2 and rest[0] == "tree":
            recursive = params.get("recursive", ["false"])[0].lower() == "true"
            sub = "/".join(p for p in rest[2:] if p)
            base = origin._local_path(f"{org}/{repo}/{sub}") if sub else repo_dir
            if base is None or not base.is_dir():
                self._error(404, "EntryNotFound", "Entry not found", head=head)
                return
            payload = origin._tree(repo_dir, base, recursive=recursive)
        else:
            self._error(404, None, "Not Found", head=head)
            return
        body = json.dumps(payload).encode()
        self._reply(200, body, head=head, content_type="application/json")

    # -- file bodies ---------------------------------------------------------------------------

    def _serve_file(
        self,
        path: Path,
        *,
        head: bool,
        etag: str | None = None,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        """Serve ``path`` with single-range support, faults and pacing."""
        origin = self.server.origin
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
            self._error(404, "EntryNotFound", "Not Found", head=head, extra=extra)
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._error(404, "EntryNotFound", "Not Found", head=head, extra=extra)
                return
            size = st.st_size
            etag = etag or f'"{size}-{st.st_mtime_ns}"'
            faults = origin.faults
            total = str(faults.wrong_total) if faults.wrong_total is not None else str(size)
            rng = _parse_range(self.headers.get("Range"), size)
            if_range = self.headers.get("If-Range")
            if rng is not None and if_range is not None and if_range.strip() != etag:
                rng = None  # the client's copy is stale: send the whole new file
            base = [
                *(extra or []),
                ("Accept-Ranges", "bytes"),
                ("ETag", etag),
                ("Last-Modified", formatdate(st.st_mtime, usegmt=True)),
            ]
            if rng == "unsatisfiable":
                if faults.wrong_total is not None:
                    origin.stats._fault("wrong_total")
                self._reply(
                    416, b"", head=head, headers=[*base, ("Content-Range", f"bytes */{total}")]
                )
                return
            if isinstance(rng, tuple):
                status, (start, end) = 206, rng
                base.append(("Content-Range", f"bytes {start}-{end}/{total}"))
                if faults.wrong_total is not None:
                    origin.stats._fault("wrong_total")
            else:
                status, start, end = 200, 0, size - 1
            length = end - start + 1
            headers = [
                ("Content-Type", "application/octet-stream"),
                ("Content-Length", str(length)),
                *base,
            ]
            if head:
                self._start_response(status, headers)
                return
            kind, fraction = origin._draw_fault()
            if kind == "error":
                self._inject_error(faults)
                return
            cut = int(length * fraction)
            if kind in ("reset", "truncate"):
                cut = max(0, min(cut, length - 1))
                planned = cut
            else:
                planned = length
            # Count before the first byte leaves, so a client can never finish before stats do.
            origin.stats._start_body(self._path_key, start, end, planned)
            self._send_body(
                fd,
                start,
                length,
                status=status,
                headers=headers,
                kind=kind,
                cut=cut,
                planned=planned,
            )
        finally:
            os.close(fd)

    def _inject_error(self, faults: Faults) -> None:
        self.server.origin.stats._fault("error")
        extra = []
        if faults.retry_after is not None:
            ra = faults.retry_after
            extra.append(("Retry-After", str(int(ra)) if ra == int(ra) else str(ra)))
        self._error(faults.error_status, None, "Injected fault", head=False, extra=extra)

    def _send_body(
        self,
        fd: int,
        start: int,
        length: int,
        *,
        status: int,
        headers: list[tuple[str, str]],
        kind: str | None,
        cut: int,
        planned: int,
    ) -> None:
        """Send headers and body, acting out the fault ``kind`` after ``cut`` body bytes."""
        origin = self.server.origin
        rate = origin.rate_limit
        pacer = _Pacer(rate, origin._stopping) if rate else None
        self._body_sent = 0
        try:
            if kind is None and pacer is None and length <= _INLINE_MAX:
                data = os.pread(fd, length, start)
                if len(data) < length:
                    raise _ShortFile(f"{self._path_key} shrank while being served")
                self._start_response(status, headers, data)
                self._body_sent = length
                return
            self._start_response(status, headers)
            if kind is not None:
                origin.stats._fault(kind)
                self._write(fd, start, cut, pacer)
                if kind == "reset":
                    self._abort()
                    return
                if kind == "truncate":
                    self.close_connection = True
                    return
                # stall: go silent, then carry on as if nothing happened.
                if origin._stopping.wait(origin.faults.stall_seconds):
                    self._abort()
                    return
                if pacer is not None:
                    pacer.restart()
            self._write(fd, start + self._body_sent, length - self._body_sent, pacer)
        except OSError:
            self.close_connection = True
            raise
        finally:
            if self._body_sent < planned:
                origin.stats._unsent(self._path_key, planned - self._body_sent)

    def _write(self, fd: int, offset: int, n: int, pacer: _Pacer | None) -> None:
        """Write ``n`` file bytes from ``offset``; ``_body_sent`` tracks what really went out."""
        end = offset + n
        if pacer is None and self.server.origin.tls is None:
            out = self.connection.fileno()
            while offset < end:
                k = os.sendfile(out, fd, offset, min(end - offset, _SENDFILE_MAX))
                if k == 0:
                    raise _ShortFile(f"{self._path_key} shrank while being served")
                offset += k
                self._body_sent += k
            return
        while offset < end:
            if pacer is not None and not pacer.wait():
                raise ConnectionAbortedError("origin stopping")
            chunk = pacer.chunk if pacer is not None else _PACED_CHUNK_MAX
            data = os.pread(fd, min(chunk, end - offset), offset)
            if not data:
                raise _ShortFile(f"{self._path_key} shrank while being served")
            self.connection.sendall(data)
            offset += len(data)
            self._body_sent += len(data)
            if pacer is not None:
                pacer.sent += len(data)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """Parse a Range header the way nginx/S3 do for a single range.

    Returns ``(start, end)`` inclusive, ``"unsatisfiable"`` (416), or None to send the whole
    file: no header, a syntactically invalid one (RFC 9110 says ignore it), or several ranges
    (S3 answers those with the full object rather than multipart/byteranges).
    """
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    m = _RANGE_RE.match(spec)
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    end = min(int(last), size - 1) if last else size - 1
    return start, end


class Origin:
    """Serves files from ``root`` over HTTP/1.1 with keep-alive on two local listeners.

    ``faults``, ``rate_limit``, ``latency`` and ``hub_token`` may be changed while running;
    each request reads them when it starts. Use as a context manager or call
    :meth:`start` / :meth:`stop`.

    ``lfs_threshold`` is the size from which hub files count as LFS (302 to the CDN) rather
    than small git files (200 inline); tests lower it to exercise redirects with tiny files.
    ``keep_log=False`` stops the unbounded per-request log and range lists, for benchmarks.
    """

    def __init__(
        self,
        root: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        cdn_port: int = 0,
        rate_limit: float | None = None,
        latency: float = 0.0,
        faults: Faults | None = None,
        hub_token: str | None = None,
        url_ttl: float = 3600.0,
        lfs_threshold: int = LFS_THRESHOLD,
        keep_log: bool = True,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.tls = tls
        """Server TLS context: both listeners speak HTTPS (``demo.tls`` makes one)."""
        self.host = host
        self.port = port
        self.cdn_port = cdn_port
        self.rate_limit = rate_limit
        """Bytes/s per response body (a token bucket per response); None = unlimited."""
        self.latency = latency
        """Seconds slept before handling every request."""
        self.faults = faults if faults is not None else Faults()
        self.hub_token = hub_token
        self.url_ttl = url_ttl
        self.lfs_threshold = lfs_threshold
        self.stats = OriginStats(keep_log=keep_log)
        self._down = False
        self._stopping = threading.Event()
        self._servers: list[_Listener] = []
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._key = secrets.token_bytes(32)
        self._url_lock = threading.Lock()
        self._expired_through = 0
        self._max_issued = 0
        self._fault_lock = threading.Lock()
        self._rng = random.Random(self.faults.seed)
        self._rng_source: tuple[Faults, int] = (self.faults, self.faults.seed)
        self._hash_lock = threading.Lock()
        self._hashes: dict[tuple[str, str, int, int], str] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Origin:
        """Bind both listeners and serve them from daemon threads; returns self."""
        if self._servers:
            return self
        self._stopping.clear()
        hub = _Listener((self.host, self.port), self, "hub")
        try:
            cdn = _Listener((self.host, self.cdn_port), self, "cdn")
        except OSError:
            hub.server_close()
            raise
        self._servers = [hub, cdn]
        for srv in self._servers:
            t = threading.Thread(
                target=srv.serve_forever,
                kwargs={"poll_interval": _POLL_INTERVAL},
                name=f"ttfs-origin-{srv.role}",
                daemon=True,
            )
            t.start()
            self._threads.append(t)
        logger.info("origin serving %s at %s (cdn %s)", self.root, self.base_url, self.cdn_url)
        return self

    def stop(self) -> None:
        """Stop both listeners and cut open connections; returns in well under a second."""
        self._stopping.set()
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=1.0)
        self._servers = []
        self._threads = []

    def __enter__(self) -> Origin:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _track(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)

    def _untrack(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.discard(conn)

    # -- URLs ----------------------------------------------------------------------------------

    def _listener(self, index: int) -> _Listener:
        if not self._servers:
            raise RuntimeError("Origin is not started")
        return self._servers[index]

    @property
    def base_url(self) -> str:
        """``http(s)://host:port`` of the hub / plain-file listener."""
        return f"{self.scheme}://{self.host}:{self._listener(0).server_port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def cdn_url(self) -> str:
        """``http(s)://host:port`` of the CDN listener."""
        return f"{self.scheme}://{self.host}:{self._listener(1).server_port}"

    def url(self, rel_path: str) -> str:
        """Plain Range-capable URL of ``root/rel_path``."""
        return f"{self.base_url}/files/{quote(rel_path)}"

    def hf_url(self, repo_id: str, revision: str, rel_path: str) -> str:
        """HF ``resolve`` URL, spelled exactly as ``huggingface_hub.hf_hub_url`` spells it."""
        return f"{self.base_url}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(rel_path)}"

    def signed_url(self, rel_path: str) -> str:
        """A fresh presigned CDN URL for ``root/rel_path`` valid for ``url_ttl`` seconds."""
        with self._url_lock:
            expires = max(int(time.time() + self.url_ttl), self._expired_through + 1)
            self._max_issued = max(self._max_issued, expires)
        sig = self._sign(rel_path, expires)
        return f"{self.cdn_url}/cdn/{quote(rel_path)}?expires={expires}&sig={sig}"

    def expire_all_urls(self) -> None:
        """Make every CDN URL issued so far count as expired (a presigned URL timing out)."""
        with self._url_lock:
            self._expired_through = max(self._max_issued, int(time.time()))

    def _sign(self, rel_path: str, expires: int) -> str:
        msg = f"{rel_path}\n{expires}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def _is_expired(self, expires: int) -> bool:
        with self._url_lock:
            return expires <= self._expired_through or expires < time.time()

    # -- control -------------------------------------------------------------------------------

    def set_down(self, down: bool) -> None:
        """While down, every request's connection is closed without any response."""
        self._down = down

    def reset_stats(self) -> None:
        """Zero :attr:`stats` in place."""
        self.stats.reset()

    def _draw_fault(self) -> tuple[str | None, float]:
        """Pick at most one fault for a data request, and where in the body it strikes."""
        with self._fault_lock:
            f = self.faults
            if f is not self._rng_source[0] or f.seed != self._rng_source[1]:
                self._rng = random.Random(f.seed)
                self._rng_source = (f, f.seed)
            rates = (f.error_rate, f.reset_rate, f.truncate_rate, f.stall_rate)
            for kind, rate in zip(_FAULT_KINDS, rates, strict=True):
                if rate > 0 and self._rng.random() < rate:
                    return kind, self._rng.uniform(0.2, 0.8)
            return None, 0.0

    # -- files and hashes ----------------------------------------------------------------------

    def _local_path(self, rel: str) -> Path | None:
        """Map a URL path to a file under root; None for traversal attempts."""
        parts = rel.split("/")
        if any(p in (".", "..") for p in parts) or "\\" in rel or "\0" in rel:
            return None
        parts = [p for p in parts if p]
        if not parts:
            return None
        return self.root.joinpath(*parts)

    def _digest(self, kind: str, path: Path) -> str:
        """Hash a file once per (size, mtime); the hub needs sha256 and git blob ids."""
        st = path.stat()
        key = (kind, str(path), st.st_size, st.st_mtime_ns)
        with self._hash_lock:
            cached = self._hashes.get(key)
        if cached is not None:
            return cached
        h = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % st.st_size)
        with path.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
        value = h.hexdigest()
        with self._hash_lock:
            self._hashes[key] = value
        return value

    def _sha256(self, path: Path) -> str:
        return self._digest("sha256", path)

    def _git_sha1(self, path: Path) -> str:
        return self._digest("git", path)

    def _lfs_pointer(self, path: Path) -> bytes:
        size = path.stat().st_size
        sha = self._sha256(path)
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()
        )

    def _lfs_pointer_oid(self, path: Path) -> str:
        pointer = self._lfs_pointer(path)
        return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()

    def _tree_entry(self, repo_dir: Path, path: Path) -> dict[str, object]:
        """One file as ``/api/models/{repo}/tree/...`` lists it."""
        size = path.stat().st_size
        entry: dict[str, object] = {
            "type": "file",
            "path": path.relative_to(repo_dir).as_posix(),
            "size": size,
        }
        if size < self.lfs_threshold:
            entry["oid"] = self._git_sha1(path)
        else:
            entry["oid"] = self._lfs_pointer_oid(path)
            entry["lfs"] = {
                "oid": self._sha256(path),
                "size": size,
                "pointerSize": len(self._lfs_pointer(path)),
            }
        return entry

    def _sibling(self, repo_dir: Path, path: Path, *, blobs: bool) -> dict[str, object]:
        """One file as ``model_info`` lists it (sizes and hashes only with ``?blobs=true``)."""
        rel = path.relative_to(repo_dir).as_posix()
        if not blobs:
            return {"rfilename": rel}
        t = self._tree_entry(repo_dir, path)
        sibling: dict[str, object] = {"rfilename": rel, "size": t["size"], "blobId": t["oid"]}
        lfs = t.get("lfs")
        if isinstance(lfs, dict):
            sibling["lfs"] = {
                "sha256": lfs["oid"],
                "size": lfs["size"],
                "pointerSize": lfs["pointerSize"],
            }
        return sibling

    def _model_info(
        self, repo_dir: Path, repo_id: str, revision: str, *, blobs: bool
    ) -> dict[str, object]:
        files = sorted(p for p in repo_dir.rglob("*") if p.is_file())
        return {
            "id": repo_id,
            "modelId": repo_id,
            "sha": _commit_for(repo_id, revision),
            "private": False,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": [self._sibling(repo_dir, p, blobs=blobs) for p in files],
        }

    def _tree(self, repo_dir: Path, base: Path, *, recursive: bool) -> list[dict[str, object]]:
        found = base.rglob("*") if recursive else base.iterdir()
        out: list[dict[str, object]] = []
        for p in sorted(found):
            if p.is_dir():
                rel = p.relative_to(repo_dir).as_posix()
                oid = hashlib.sha1(rel.encode()).hexdigest()
                out.append({"type": "directory", "oid": oid, "size": 0, "path": rel})
            elif p.is_file():
                out.append(self._tree_entry(repo_dir, p))
        return out


def _commit_for(repo_id: str, revision: str) -> str:
    """A stable fake 40-hex commit for a branch name; a commit id passes through unchanged."""
    if _HEX40.match(revision):
        return revision
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Run the origin until SIGTERM/SIGINT; print its URLs as one JSON line for the parent."""
    parser = argparse.ArgumentParser(
        prog="python -m demo.origin", description="Serve ROOT as a local test/demo origin."
    )
    parser.add_argument("root", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cdn-port", type=int, default=0)
    parser.add_argument("--rate-limit", type=parse_size, default=None, help="bytes/s, e.g. 20M")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--hub-token", default=None)
    parser.add_argument("--url-ttl", type=float, default=3600.0)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)

    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    origin = Origin(
        args.root,
        host=args.host,
        port=args.port,
        cdn_port=args.cdn_port,
        rate_limit=args.rate_limit,
        latency=args.latency,
        hub_token=args.hub_token,
        url_ttl=args.url_ttl,
    ).start()
    try:
        print(json.dumps({"base_url": origin.base_url, "cdn_url": origin.cdn_url}), flush=True)
        while not done.wait(0.5):
            pass
    finally:
        origin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
