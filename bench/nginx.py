"""An nginx origin on 127.0.0.1 with two profiles, for benchmarks only.

* ``/raw/``: no limits (measures CPU cost per byte);
* ``/cdn/``: 25 MB/s per connection (``limit_rate``) and 20 ms added per request (lua sleep),
  like one CDN stream.

nginx serves with sendfile from the page cache, so the origin is never the bottleneck of a
Python client on this machine (curl reads ~1.5-2 GB/s from it on one connection).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import httpx

CONF = """
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp; fastcgi_temp_path {dir}/tmp;
  uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
  sendfile on; tcp_nopush on; keepalive_requests 100000; keepalive_timeout 120s;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    location /raw/ {{ alias {root}/; autoindex on; }}
    location /cdn/ {{ alias {root}/; autoindex on; limit_rate {rate};
                     access_by_lua_block {{ ngx.sleep({latency}) }} }}
  }}
}}
"""


class Nginx:
    def __init__(
        self,
        root: Path,
        workdir: Path,
        *,
        port: int = 18080,
        rate: str = "25m",
        latency: float = 0.02,
    ) -> None:
        self.root, self.dir, self.port = root.resolve(), workdir.resolve(), port
        self.rate, self.latency = rate, latency
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, profile: str, rel: str) -> str:
        return f"http://127.0.0.1:{self.port}/{profile}/{rel}"

    def __enter__(self) -> Nginx:
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(
            CONF.format(
                dir=self.dir, root=self.root, port=self.port, rate=self.rate, latency=self.latency
            )
        )
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(self.dir), "-c", str(conf), "-g", "daemon off;"]
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/raw/", timeout=1)
                return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not start; see {self.dir}/error.log")

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _ = os
