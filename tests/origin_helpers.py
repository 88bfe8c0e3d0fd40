"""Helpers for the tests that talk to the real counting origin over real sockets.

* fixtures ``origin_root`` (an empty tmp dir) and ``origin`` (a started
  :class:`~demo.origin.Origin` serving it), registered in ``tests/conftest.py``;
* :func:`write_random_files` writes files of given sizes under a root (``random.randbytes``:
  hundreds of MB per second);
* :func:`manifest_for` builds a bptr manifest for files the origin serves, either through plain
  ``/files/`` URLs or through Hugging Face ``resolve`` URLs (302 to the CDN port for big files);
* :func:`run_cli` runs ``python -m ttfs`` / ``python -m truss_transfer`` as a real subprocess;
* :func:`tree` and :func:`leftovers` snapshot directories for "nothing else was written" checks;
* :class:`NoRangeServer`, a minimal HTTP server that ignores ``Range`` (the origin never does).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio

from demo.model import build_manifest, sha256_file
from demo.origin import Origin, RequestRecord
from demo.tls import LocalCA, make_test_ca
from ttfs.manifest import Pointer, parse_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
HF_REPO = "test-org/test-model"
HF_REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    """A CA and a 127.0.0.1 certificate made for this test session (``openssl``)."""
    return make_test_ca(tmp_path_factory.mktemp("tls"))


def tls_origin_kwargs(scheme: str, ca: LocalCA) -> dict[str, Any]:
    """``Origin(...)`` keyword arguments for ``scheme`` ("http" or "https")."""
    return {"tls": ca.server_context()} if scheme == "https" else {}


def tls_env(scheme: str, ca: LocalCA) -> dict[str, str]:
    """Variables a client needs to trust the origin of ``scheme``."""
    return ca.trust_env() if scheme == "https" else {}


@pytest.fixture
def origin_root(tmp_path: Path) -> Path:
    root = tmp_path / "origin"
    root.mkdir()
    return root


@pytest.fixture
def origin(origin_root: Path) -> Iterator[Origin]:
    """A started origin serving ``origin_root``; stopped after the test."""
    with Origin(origin_root) as o:
        yield o


async def wait_until(condition: Callable[[], object], *, poll: float = 0.01) -> None:
    """Poll ``condition`` (e.g. origin counters, updated by server threads) until truthy."""
    while not condition():  # noqa: ASYNC110 - no event to wait on: the origin runs in threads
        await trio.sleep(poll)


def write_random_files(root: Path, sizes: Mapping[str, int], *, seed: int = 0) -> dict[str, Path]:
    """Write ``rel -> size`` random files under ``root``; returns ``rel -> path``."""
    rng = random.Random(seed)
    out: dict[str, Path] = {}
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            left = size
            while left:
                n = min(left, 64 << 20)
                f.write(rng.randbytes(n))
                left -= n
        out[rel] = path
    return out


def manifest_for(
    origin: Origin,
    files: Mapping[str, Path],
    *,
    hf_repo: str | None = None,
    revision: str = HF_REVISION,
    volume_folder: str = "",
) -> dict[str, Any]:
    """A manifest whose pointers name ``files`` (``rel -> path under the origin root``).

    Without ``hf_repo`` each URL is the plain ``origin.url(path relative to the root)``; with it
    the files must lie under ``root/hf_repo`` and the URLs are hub ``resolve`` URLs.
    """
    urls: dict[str, str] = {}
    for rel, path in files.items():
        if hf_repo is None:
            urls[rel] = origin.url(path.relative_to(origin.root).as_posix())
        else:
            repo_dir = origin.root / hf_repo
            urls[rel] = origin.hf_url(hf_repo, revision, path.relative_to(repo_dir).as_posix())
    return build_manifest(dict(files), urls, volume_folder=volume_folder)


def write_manifest(path: Path, manifest: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2))
    return path


def pointers_of(manifest: Mapping[str, Any]) -> list[Pointer]:
    return list(parse_manifest(json.dumps(manifest), fmt="json").pointers)


def sha256_of(path: Path) -> str:
    return sha256_file(path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_same_files(out: Path, files: Mapping[str, Path]) -> None:
    """Every ``rel`` exists under ``out`` with the source's exact bytes (sha256)."""
    for rel, src in files.items():
        dest = out / rel
        assert dest.is_file(), f"{dest} missing"
        assert dest.stat().st_size == src.stat().st_size, f"{dest} has the wrong size"
        assert sha256_of(dest) == sha256_of(src), f"{dest} differs from {src}"


def cli_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    """The test's (already cleaned) environment plus a private cache, for subprocesses."""
    env = dict(os.environ)
    env["TTFS_CACHE_DIR"] = str(cache_dir)
    env.setdefault("TTFS_RETRY_ATTEMPTS", "4")
    env.update(extra)
    return env


def run_cli(
    args: list[str], env: Mapping[str, str], *, module: str = "ttfs", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <module> ARGS`` to completion, capturing text output."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=dict(env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def tree(root: Path, *, exclude: tuple[Path, ...] = ()) -> dict[str, int]:
    """``relative path -> size`` (dirs as -1) of everything under ``root`` except ``exclude``."""
    out: dict[str, int] = {}
    skip = [e.resolve() for e in exclude]
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if (here / d).resolve() not in skip]
        for d in dirnames:
            out[(here / d).relative_to(root).as_posix()] = -1
        for f in filenames:
            p = here / f
            if p.resolve() in skip:
                continue
            out[p.relative_to(root).as_posix()] = p.lstat().st_size
    return out


def leftovers(root: Path) -> list[Path]:
    """Temporary files a resolve may leave next to a destination (``.name.ttfs-PID.tmp``)."""
    if not root.exists():
        return []
    return [p for p in root.rglob("*") if ".ttfs-" in p.name or p.name.endswith(".tmp")]


def allocated_bytes(root: Path) -> int:
    """Bytes really allocated on disk under ``root`` (sparse files count what was written)."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def records(origin: Origin, *, port: str) -> list[RequestRecord]:
    """The request log of one listener: ``port`` is ``"hub"`` or ``"cdn"``."""
    url = origin.base_url if port == "hub" else origin.cdn_url
    number = int(url.rsplit(":", 1)[1])
    return [r for r in origin.stats.snapshot().request_log if r.port == number]


class NoRangeServer:
    """A real HTTP/1.1 server that ignores ``Range`` and always answers 200 with the whole file.

    ``content_length`` overrides the announced length (to fake a stale object); requests are
    counted in ``requests``.
    """

    def __init__(self, data: bytes, *, content_length: int | None = None) -> None:
        self.data = data
        self.content_length = content_length
        self.requests = 0
        self.range_headers: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests += 1
                server.range_headers.append(self.headers.get("Range"))
                body = server.data
                length = server.content_length
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass
                if length is not None and length != len(body):
                    self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/file.bin"

    def __enter__(self) -> NoRangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found
