"""A throwaway certificate authority for HTTPS tests and benchmarks (``openssl`` CLI).

The test origin and the bench's nginx serve HTTPS with a certificate for ``127.0.0.1`` and
``localhost`` signed by a CA made here, per run; clients trust it through the usual variables
(``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``; aria2c ``--ca-certificate``),
never through a system store. :func:`trust_env` returns those variables.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LocalCA:
    ca: Path
    """The CA certificate (PEM) clients trust."""
    cert: Path
    """The server certificate chain (PEM) for 127.0.0.1 / localhost."""
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def trust_env(self) -> dict[str, str]:
        ca = str(self.ca)
        return {"SSL_CERT_FILE": ca, "REQUESTS_CA_BUNDLE": ca, "CURL_CA_BUNDLE": ca}


def make_test_ca(directory: Path) -> LocalCA:
    """Create a CA and a server certificate under ``directory`` (reused if already there).

    Raises:
        RuntimeError: ``openssl`` is missing or failed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    if ca.exists() and cert.exists() and key.exists():
        return LocalCA(ca, cert, key)
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is needed to make the test CA")
    ext = directory / "server.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )

    def run(*args: str) -> None:
        done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()}")

    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ca_key))
    run(
        "req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", "2",
        "-subj", "/CN=ttfs test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", str(ca),
    )  # fmt: skip
    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    run("req", "-new", "-key", str(key), "-subj", "/CN=127.0.0.1", "-out", str(csr))
    run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    return LocalCA(ca, cert, key)
