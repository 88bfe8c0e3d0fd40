"""The CDN of the benchmarks: nginx on 127.0.0.1 with two profiles, and what it served.

* ``/raw/``: no limits. Measures the CPU cost per byte of each client: nginx sends from the
  page cache with sendfile (curl reads ~1.5-2 GB/s from it on one connection on the 2-core VM),
  so the origin is never the bottleneck of a Python client.
* ``/cdn/``: 25 MB/s per connection (``limit_rate``) and 20 ms added to every request
  (``access_by_lua_block { ngx.sleep(0.02) }``), like one stream from a real CDN. Throughput
  then comes from requests in flight: the origin's capacity is ``connections x 25 MB/s``.

Both serve the same directory with ``autoindex on`` (rclone's http remote lists directories from
the HTML index). Every request is logged with its end time, duration, status and body bytes, so
the benchmark reports requests and bytes per GB delivered, and how many requests were in flight
(:meth:`Nginx.usage`), from the server's side, for every contender alike.

The port is picked free at start and the master is checked to be ours and alive: a stale nginx
left on a fixed port by someone else must never answer for this one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import httpx

from demo.tls import make_test_ca

from .procs import CHILDREN, BenchError, free_port, stop_pid

RATE = 25_000_000
"""Bytes/s per connection in the cdn profile (``limit_rate 25m`` is 25 x 2^20; see CONF)."""
LATENCY = 0.02
PROFILES = ("cdn", "raw", "https-cdn", "https-raw")
"""``https-*``: the same locations on a second, TLS listener (a CA made per run, see
:mod:`demo.tls`; clients trust it through ``SSL_CERT_FILE`` & co., aria2c through
``--ca-certificate``)."""

CONF = """
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
{user}
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  log_format bench '$msec $request_time $status $body_bytes_sent $connection $request_method';
  access_log {dir}/access.log bench;
  client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp; fastcgi_temp_path {dir}/tmp;
  uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
  sendfile on; tcp_nopush on; keepalive_requests 100000; keepalive_timeout 120s;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location /raw/ {{ alias {root}/; autoindex on; }}
    location /cdn/ {{ alias {root}/; autoindex on; limit_rate {rate};
                     access_by_lua_block {{ ngx.sleep({latency}) }} }}
  }}
  server {{
    listen 127.0.0.1:{tls_port} ssl backlog=4096;
    ssl_certificate {cert}; ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:bench:10m;
    location /raw/ {{ alias {root}/; autoindex on; }}
    location /cdn/ {{ alias {root}/; autoindex on; limit_rate {rate};
                     access_by_lua_block {{ ngx.sleep({latency}) }} }}
  }}
}}
"""


@dataclass(frozen=True, slots=True)
class OriginUse:
    """What the origin did between two marks of its access log."""

    requests: int
    """Every request (listings, HEADs, errors included)."""
    bytes: int
    """Body bytes sent."""
    connections: int
    """Distinct TCP connections used."""
    busy_seconds: float
    """Sum of request durations: divided by wall time, the mean number of requests in flight."""
    peak_inflight: int
    """Most requests in flight at once."""
    errors: int
    """Requests answered >= 400."""


class Nginx:
    """``with Nginx(root, workdir) as n:`` serves ``root`` at ``n.url(profile, rel)``."""

    def __init__(
        self,
        root: Path,
        workdir: Path,
        *,
        port: int = 0,
        rate: int = RATE,
        latency: float = LATENCY,
    ) -> None:
        self.root, self.dir = root.resolve(), workdir.resolve()
        self.port = port or free_port()
        self.tls_port = free_port()
        self.ca = make_test_ca(self.dir / "tls")
        self.rate, self.latency = rate, latency
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "access.log"

    def base(self, profile: str) -> str:
        if profile.startswith("https-"):
            return f"https://127.0.0.1:{self.tls_port}/{profile.removeprefix('https-')}"
        return f"http://127.0.0.1:{self.port}/{profile}"

    def url(self, profile: str, rel: str) -> str:
        return f"{self.base(profile)}/{quote(rel)}"

    def __enter__(self) -> Nginx:
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.log.unlink(missing_ok=True)
        conf = self.dir / "nginx.conf"
        # nginx as root drops its workers to "nobody", who may not read a work dir under /root.
        user = "user root root;" if os.geteuid() == 0 else ""
        conf.write_text(
            CONF.format(
                user=user,
                dir=self.dir,
                root=self.root,
                port=self.port,
                tls_port=self.tls_port,
                cert=self.ca.cert,
                key=self.ca.key,
                rate=self.rate,
                latency=self.latency,
            )
        )
        stderr = open(self.dir / "stderr.log", "wb")
        try:
            self.proc = subprocess.Popen(
                ["nginx", "-p", str(self.dir), "-c", str(conf), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        finally:
            stderr.close()
        CHILDREN.add(self.proc.pid)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                r = httpx.get(f"{self.base('raw')}/", timeout=1)
                if r.status_code == 200 and self._ours():
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.__exit__(None, None, None)
        log = (self.dir / "stderr.log").read_text(errors="replace")[-1000:]
        raise BenchError(f"nginx did not start on port {self.port}: {log}")

    def _ours(self) -> bool:
        try:
            return int((self.dir / "nginx.pid").read_text().strip()) == self.proc.pid  # type: ignore[union-attr]
        except (OSError, ValueError):
            return False

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is None:
            return
        # SIGQUIT: graceful stop of the master and its workers.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                stop_pid(self.proc.pid)
        self.proc.wait()
        CHILDREN.discard(self.proc.pid)
        self.proc = None

    # -- what was served ---------------------------------------------------------------------
    def mark(self) -> int:
        """A position in the access log; :meth:`usage` counts what came after it."""
        try:
            return self.log.stat().st_size
        except FileNotFoundError:
            return 0

    def usage(self, since: int) -> OriginUse:
        """Requests, bytes, connections and concurrency logged after ``since``."""
        # nginx writes a line when a request ends: give the last ones a moment to land.
        time.sleep(0.05)
        with open(self.log, "rb") as f:
            f.seek(since)
            lines = f.read().decode(errors="replace").splitlines()
        requests = body = errors = 0
        busy = 0.0
        conns: set[str] = set()
        events: list[tuple[float, int]] = []
        for line in lines:
            parts = line.split()
            if len(parts) < 6:
                continue
            end, duration = float(parts[0]), float(parts[1])
            requests += 1
            body += int(parts[3])
            errors += int(parts[2]) >= 400
            conns.add(parts[4])
            busy += duration
            events += [(end - duration, 1), (end, -1)]
        peak = level = 0
        for _, step in sorted(events):
            level += step
            peak = max(peak, level)
        return OriginUse(requests, body, len(conns), busy, peak, errors)
