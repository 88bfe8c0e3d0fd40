"""The workers' body path (ttfs.transfer.wire) against the real origin, HTTP and HTTPS.

Proves: a range lands byte-exact through a reused buffer, reads stay inside the limit the
caller sets (one block at a time), keep-alive connections are reused, statuses map onto the
error tree like the httpx path (404, 403, 503 with Retry-After, 416), a wrong Content-Range
total is a StaleManifest, a truncated body is a TransientError, and an untrusted certificate
fails at once (ProviderError, not a retry budget) with a line that says what to set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from demo.origin import Faults, Origin
from demo.tls import LocalCA
from tests.origin_helpers import tls_origin_kwargs, write_random_files
from ttfs.errors import (
    AccessDenied,
    ObjectNotFound,
    ProviderError,
    StaleManifest,
    TransientError,
)
from ttfs.transfer.wire import Connections, ranged_get
from ttfs.units import MiB

SIZE = 5 * MiB + 3


@pytest.fixture(params=["http", "https"])
def served(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    test_ca: LocalCA,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Origin, bytes]:
    scheme = str(request.param)
    if scheme == "https":
        monkeypatch.setenv("SSL_CERT_FILE", str(test_ca.ca))
    files = write_random_files(tmp_path / "o", {"f.bin": SIZE}, seed=8)
    origin = Origin(tmp_path / "o", **tls_origin_kwargs(scheme, test_ca)).start()
    request.addfinalizer(origin.stop)
    return origin, files["f.bin"].read_bytes()


def get(origin: Origin, start: int, end: int, **kw: object) -> tuple[bytes, list[int]]:
    out = bytearray()
    sizes: list[int] = []

    def on_chunk(view: memoryview) -> None:
        sizes.append(len(view))
        out.extend(view)

    conns = kw.pop("conns", None) or Connections(5.0, 5.0)
    assert isinstance(conns, Connections)
    ranged_get(
        conns,
        str(kw.pop("url", origin.url("f.bin"))),
        {},
        start,
        end,
        name="f.bin",
        size=int(kw.pop("size", SIZE)),  # type: ignore[call-overload]
        buf=memoryview(bytearray(1 << 20)),
        on_chunk=on_chunk,
        limit=kw.pop("limit", None),  # type: ignore[arg-type]
    )
    return bytes(out), sizes


def test_a_range_lands_exactly_with_bounded_reads_and_reused_connections(
    served: tuple[Origin, bytes],
) -> None:
    origin, data = served
    conns = Connections(5.0, 5.0)
    got, sizes = get(origin, 1000, 3 * MiB + 17, conns=conns, limit=lambda n: min(n, 300_000))
    assert got == data[1000 : 3 * MiB + 17]
    assert max(sizes) <= 300_000
    got, _ = get(origin, 4 * MiB, SIZE, conns=conns)
    assert got == data[4 * MiB :]
    assert origin.stats.snapshot().connections == 1  # kept alive between the two ranges


def test_statuses_and_checks_map_onto_the_error_tree(served: tuple[Origin, bytes]) -> None:
    origin, _ = served
    with pytest.raises(ObjectNotFound):
        get(origin, 0, 10, url=origin.url("missing.bin"))
    with pytest.raises(StaleManifest, match="smaller than the manifest"):
        get(origin, SIZE + 10, SIZE + 20, size=SIZE + 100)
    with pytest.raises(StaleManifest, match="stale manifest"):
        get(origin, 0, 10, size=SIZE + 1)
    origin.faults = Faults(error_rate=1.0, error_status=503, retry_after=2)
    with pytest.raises(TransientError) as e:
        get(origin, 0, 10)
    assert e.value.retry_after == 2
    origin.faults = Faults(error_rate=1.0, error_status=403)
    with pytest.raises(AccessDenied):
        get(origin, 0, 10)
    origin.faults = Faults(truncate_rate=1.0)
    with pytest.raises(TransientError, match=r"short body|network error"):
        get(origin, 0, 4 * MiB)


def test_an_untrusted_certificate_fails_at_once_and_says_what_to_set(
    tmp_path: Path, test_ca: LocalCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(empty))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    files = write_random_files(tmp_path / "o", {"f.bin": 1000}, seed=1)
    assert files
    with (
        Origin(tmp_path / "o", tls=test_ca.server_context()) as origin,
        pytest.raises(ProviderError) as e,
    ):
        get(origin, 0, 10, size=1000)
    assert not isinstance(e.value, TransientError)
    assert "not trusted" in str(e.value) and "SSL_CERT_FILE" in str(e.value)


class _FileTarget:
    """A SpliceTarget: spliced bytes land in a file at the body's next offset."""

    def __init__(self, path: Path, first: int) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.pos = first
        self.spliced: list[int] = []

    def from_pipe(self, pipe: int, n: int) -> None:
        moved = 0
        while moved < n:
            moved += os.splice(pipe, self.fd, n - moved, offset_dst=self.pos + moved)
        self.spliced.append(n)
        self.pos += n


def test_plain_bodies_splice_into_the_file_and_tls_bodies_take_the_buffer(
    served: tuple[Origin, bytes], tmp_path: Path
) -> None:
    """On HTTP only what http.client buffered with the headers passes through ``on_chunk``;
    the rest moves socket -> pipe -> file inside the limits, and the connection stays reusable.
    Over TLS everything takes ``on_chunk`` (bytes must be decrypted in user space)."""
    origin, data = served
    start, end = 1000, 3 * MiB + 17
    target = _FileTarget(tmp_path / "landed", start)
    chunks: list[tuple[int, bytes]] = []
    conns = Connections(5.0, 5.0)

    def on_chunk(view: memoryview) -> None:
        chunks.append((target.pos, bytes(view)))
        target.pos += len(view)

    try:
        for _ in range(2):  # twice: the spliced response leaves the connection reusable
            target.pos, target.spliced[:], chunks[:] = start, [], []
            ranged_get(
                conns,
                origin.url("f.bin"),
                {},
                start,
                end,
                name="f.bin",
                size=SIZE,
                buf=memoryview(bytearray(1 << 20)),
                on_chunk=on_chunk,
                limit=lambda n: min(n, 300_000),
                splice_to=target,
            )
            assert target.pos == end
            landed = bytearray(end)
            disk = os.pread(target.fd, end, 0)
            landed[: len(disk)] = disk
            for pos, chunk in chunks:
                landed[pos : pos + len(chunk)] = chunk
            assert bytes(landed[start:end]) == data[start:end]
            assert max(target.spliced, default=0) <= 300_000
            if origin.url("f.bin").startswith("https"):
                assert not target.spliced
            else:
                assert sum(target.spliced) > end - start - 64 * 1024
        assert origin.stats.snapshot().connections == 1
    finally:
        os.close(target.fd)


@pytest.mark.parametrize(
    ("value", "splice"),
    [(None, True), ("", True), ("1", True), ("on", True), ("0", False), (" Off ", False),
     ("false", False), ("no", False)],
)  # fmt: skip
def test_the_splice_switch_is_a_setting_the_workers_get_from_the_coordinator(
    value: str | None, splice: bool, tmp_path: Path
) -> None:
    """Read once at the edge (the worker pool passes it on the workers' command line, which
    every worker test exercises), with the same off-words as TTFS_SHARED_TRUST."""
    from ttfs.config import Settings

    env = {"TTFS_CACHE_DIR": str(tmp_path)} | ({} if value is None else {"TTFS_SPLICE": value})
    assert Settings.from_env(env).splice is splice
