"""HttpProvider against the real counting origin: what actually goes over the wire.

Proves, by the origin's own counters and request log:

* plain ranged GETs return exactly the asked bytes, one request per range;
* a Hugging Face ``resolve`` URL is followed to the CDN once and the signed URL is cached
  (N ranges = 1 hub request + N CDN requests, also when the N ranges start concurrently);
* the token goes to the hub origin only (a secret file or ``HF_TOKEN``; a 127.0.0.1 hub is a hub
  only when ``HF_ENDPOINT`` names it), never to the CDN port, never into a log record or an
  exception message;
* an expired signed URL mid-download is re-resolved transparently (one extra hub request);
* 5xx with ``Retry-After`` is retried after the server's delay; 404 is ObjectNotFound naming the
  file; a ``Content-Range`` total that differs from the manifest is StaleManifest naming the file
  and both sizes, and nothing is written;
* a server that ignores ``Range`` still yields the right bytes;
* truncated, reset and stalled bodies are retried and the result is byte-identical.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from demo.origin import Faults, Origin
from tests.origin_helpers import (
    HF_REPO,
    NoRangeServer,
    assert_same_files,
    leftovers,
    manifest_for,
    pointers_of,
    records,
    wait_until,
    write_random_files,
)
from ttfs.config import RetryPolicy, Settings
from ttfs.errors import (
    AccessDenied,
    DownloadError,
    ObjectNotFound,
    StaleManifest,
    TransientError,
)
from ttfs.manifest import HttpResolution, Pointer
from ttfs.providers import HttpProvider
from ttfs.resolve import resolve
from ttfs.units import MiB

TOKEN = "hf_sEcReT0123456789tokenvalue"
BIG = 12 * MiB + 12345  # over the origin's 10 MiB LFS threshold: 302 to the CDN


async def read(provider: HttpProvider, pointer: Pointer, start: int, end: int) -> bytes:
    out = bytearray()
    await provider.read_range(pointer, start, end, out.extend)
    return bytes(out)


def one_pointer(origin: Origin, files: dict[str, Path], **kw: object) -> Pointer:
    (pointer,) = pointers_of(manifest_for(origin, files, **kw))  # type: ignore[arg-type]
    return pointer


def with_size(pointer: Pointer, size: int) -> Pointer:
    return Pointer(
        resolution=pointer.resolution,
        uid=pointer.uid,
        file_name=pointer.file_name,
        hashtype=pointer.hashtype,
        hash=pointer.hash,
        size=size,
        runtime_secret_name=pointer.runtime_secret_name,
    )


def hf_files(origin: Origin, sizes: dict[str, int]) -> dict[str, Path]:
    written = write_random_files(origin.root / HF_REPO, sizes, seed=7)
    return written


# -- plain ranges ----------------------------------------------------------------------------------


async def test_plain_ranges_are_exact(origin: Origin, settings: Settings) -> None:
    files = write_random_files(origin.root, {"dir/w.bin": 5 * MiB + 3})
    data = files["dir/w.bin"].read_bytes()
    pointer = one_pointer(origin, files)
    provider = HttpProvider(settings)
    n = len(data)
    ranges = [(0, 1), (1, 2 * MiB), (4 * MiB, n), (n - 1, n), (0, n)]
    try:
        for start, end in ranges:
            assert await read(provider, pointer, start, end) == data[start:end]
    finally:
        await provider.aclose()
    stats = origin.stats.snapshot()
    assert stats.data_requests == len(ranges)
    assert stats.by_path["/files/dir/w.bin"].ranges == [(s, e - 1) for s, e in ranges]
    assert stats.bytes_sent == sum(e - s for s, e in ranges)
    # keep-alive: sequential ranges reuse one connection
    assert stats.connections == 1


# -- Hugging Face: redirect once, cache the CDN URL ------------------------------------------------


async def test_hf_redirect_is_followed_once_and_cdn_url_cached(
    origin: Origin, settings: Settings
) -> None:
    files = hf_files(origin, {"model.safetensors": BIG})
    data = files["model.safetensors"].read_bytes()
    pointer = one_pointer(origin, files, hf_repo=HF_REPO)
    provider = HttpProvider(settings)
    n = 6
    step = BIG // n
    try:
        for k in range(n):
            start, end = k * step, BIG if k == n - 1 else (k + 1) * step
            assert await read(provider, pointer, start, end) == data[start:end]
    finally:
        await provider.aclose()
    hub, cdn = records(origin, port="hub"), records(origin, port="cdn")
    assert [r.status for r in hub] == [302]
    assert len(cdn) == n and all(r.status == 206 for r in cdn)
    assert all(r.path.startswith("/cdn/") for r in cdn)


async def test_concurrent_ranges_resolve_the_redirect_once(
    origin: Origin, settings: Settings
) -> None:
    files = hf_files(origin, {"model.safetensors": BIG})
    data = files["model.safetensors"].read_bytes()
    pointer = one_pointer(origin, files, hf_repo=HF_REPO)
    provider = HttpProvider(settings)
    n = 8
    step = BIG // n
    got: dict[int, bytes] = {}

    async def one(k: int) -> None:
        got[k] = await read(provider, pointer, k * step, (k + 1) * step)

    try:
        async with trio.open_nursery() as nursery:
            for k in range(n):
                nursery.start_soon(one, k)
    finally:
        await provider.aclose()
    assert all(got[k] == data[k * step : (k + 1) * step] for k in range(n))
    assert len(records(origin, port="hub")) == 1
    assert len(records(origin, port="cdn")) == n


async def test_waiters_use_the_cdn_url_before_the_first_body_ends(
    origin: Origin, settings: Settings
) -> None:
    files = hf_files(origin, {"model.safetensors": BIG})
    pointer = one_pointer(origin, files, hf_repo=HF_REPO)
    origin.rate_limit = 4e6  # each 2 MiB range takes ~0.5 s
    provider = HttpProvider(settings)
    try:
        async with trio.open_nursery() as nursery:
            for k in range(4):
                nursery.start_soon(read, provider, pointer, k * 2 * MiB, (k + 1) * 2 * MiB)
    finally:
        await provider.aclose()
    times = [r.time for r in records(origin, port="cdn")]
    assert len(times) == 4 and len(records(origin, port="hub")) == 1
    assert max(times) - min(times) < 0.3, "ranges waited for the first body to finish"


async def test_failed_resolution_is_handed_to_one_waiter_at_a_time(
    origin: Origin, settings: Settings
) -> None:
    files = hf_files(origin, {"model.safetensors": BIG})
    pointer = one_pointer(origin, files, hf_repo=HF_REPO)
    origin.faults = Faults(error_rate=1.0)  # every CDN GET answers 503
    provider = HttpProvider(settings)
    errors: list[BaseException] = []

    async def one(k: int) -> None:
        try:
            await read(provider, pointer, k * MiB, (k + 1) * MiB)
        except Exception as e:
            errors.append(e)

    try:
        async with trio.open_nursery() as nursery:
            for k in range(6):
                nursery.start_soon(one, k)
    finally:
        await provider.aclose()
    assert len(errors) == 6
    assert all(isinstance(e, TransientError) for e in errors), errors


# -- the token -------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["secret_file", "hf_token_env"])
async def test_token_goes_to_the_hf_endpoint_hub_only(
    origin: Origin,
    settings: Settings,
    tmp_path: Path,
    source: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    origin.hub_token = TOKEN  # the hub refuses resolve requests without exactly this token
    env = dict(settings.secrets_env)
    if source == "secret_file":
        (Path(env["TTFS_SECRETS_DIR"]) / "hf_access_token").write_text(f"  {TOKEN}\n")
    else:
        env["HF_TOKEN"] = TOKEN
    settings = settings.replace(hf_endpoint=origin.base_url, secrets_env=env)
    files = hf_files(origin, {"model.safetensors": BIG, "config.json": 1482})
    manifest = manifest_for(origin, files, hf_repo=HF_REPO)
    out = tmp_path / "out"
    report = await resolve(pointers_of(manifest), str(out), settings, progress=False)
    assert report.success
    assert_same_files(out, files)

    hub, cdn = records(origin, port="hub"), records(origin, port="cdn")
    assert hub and cdn
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub)
    assert all("authorization" not in r.headers for r in cdn)
    assert all(TOKEN not in value for r in cdn for value in r.headers.values())
    assert TOKEN not in caplog.text
    for rec in caplog.records:
        assert TOKEN not in rec.getMessage()
        assert TOKEN not in repr(rec.args)


async def test_no_token_to_a_local_hub_without_hf_endpoint(
    origin: Origin, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    (Path(settings.secrets_env["TTFS_SECRETS_DIR"]) / "hf_access_token").write_text(TOKEN)
    assert settings.hf_endpoint is None
    files = hf_files(origin, {"config.json": 1482})
    pointer = one_pointer(origin, files, hf_repo=HF_REPO)
    provider = HttpProvider(settings)
    try:
        assert not provider.is_hub(origin.base_url)
        # Without auth required, the file is served anonymously ...
        assert await read(provider, pointer, 0, 1482) == files["config.json"].read_bytes()
        # ... and when the hub requires the token, 127.0.0.1 still does not get it.
        origin.hub_token = TOKEN
        with pytest.raises(AccessDenied) as info:
            await read(provider, pointer, 0, 1482)
    finally:
        await provider.aclose()
    assert "config.json" in str(info.value) and "401" in str(info.value)
    assert TOKEN not in str(info.value) and TOKEN not in repr(info.value)
    log = origin.stats.snapshot().request_log
    assert len(log) == 2
    assert all("authorization" not in r.headers for r in log)
    assert TOKEN not in caplog.text


async def test_wrong_token_error_does_not_leak_the_token(
    origin: Origin, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    origin.hub_token = "the-right-one"
    env = {**settings.secrets_env, "HF_TOKEN": TOKEN}
    settings = settings.replace(hf_endpoint=origin.base_url, secrets_env=env)
    files = hf_files(origin, {"model.safetensors": BIG})
    pointer = one_pointer(origin, files, hf_repo=HF_REPO)
    provider = HttpProvider(settings)
    try:
        with pytest.raises(AccessDenied) as info:
            await read(provider, pointer, 0, 100)
    finally:
        await provider.aclose()
    assert records(origin, port="hub")[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in str(info.value) and TOKEN not in repr(info.value)
    assert TOKEN not in caplog.text


# -- expiry, errors, stale sizes -------------------------------------------------------------------


async def test_expired_signed_url_is_re_resolved(origin: Origin, settings: Settings) -> None:
    files = hf_files(origin, {"model.safetensors": BIG})
    data = files["model.safetensors"].read_bytes()
    pointer = one_pointer(origin, files, hf_repo=HF_REPO)
    provider = HttpProvider(settings)
    try:
        assert await read(provider, pointer, 0, MiB) == data[:MiB]
        origin.expire_all_urls()  # the cached signed URL now answers 403
        assert await read(provider, pointer, MiB, 2 * MiB) == data[MiB : 2 * MiB]
        assert await read(provider, pointer, 2 * MiB, 3 * MiB) == data[2 * MiB : 3 * MiB]
    finally:
        await provider.aclose()
    hub, cdn = records(origin, port="hub"), records(origin, port="cdn")
    assert [r.status for r in hub] == [302, 302]  # exactly one extra resolve
    assert [r.status for r in cdn] == [206, 403, 206, 206]


async def test_5xx_with_retry_after_is_retried_after_the_delay(
    origin: Origin, settings: Settings, tmp_path: Path
) -> None:
    files = write_random_files(origin.root, {"w.bin": 3 * MiB})
    pointer = one_pointer(origin, files)

    # The provider reports the status and the server's delay ...
    origin.faults = Faults(error_rate=1.0, error_status=503, retry_after=1)
    provider = HttpProvider(settings)
    try:
        with pytest.raises(TransientError) as info:
            await read(provider, pointer, 0, 10)
    finally:
        await provider.aclose()
    assert info.value.retry_after == 1.0
    assert "503" in str(info.value) and "w.bin" in str(info.value)

    # ... and the scheduler waits at least that long (its own backoff would be ~0.02 s).
    origin.reset_stats()
    settings = settings.replace(
        retry=RetryPolicy(attempts=4, base_delay=0.02, max_delay=0.5, deadline=30)
    )

    async def heal() -> None:
        await wait_until(lambda: origin.stats.snapshot().faults_injected.get("error"))
        origin.faults = Faults()

    out = tmp_path / "out"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(heal)
        await resolve([pointer], str(out), settings, progress=False)
    assert_same_files(out, files)
    log = [r for r in origin.stats.snapshot().request_log if r.path == "/files/w.bin"]
    first_error = next(r for r in log if r.status == 503)
    first_ok = next(r for r in log if r.status in (200, 206))
    assert first_ok.time - first_error.time >= 0.9


async def test_404_is_object_not_found_naming_the_file(
    origin: Origin, settings: Settings, tmp_path: Path
) -> None:
    files = write_random_files(origin.root, {"gone/model.bin": 1000})
    pointer = one_pointer(origin, files)
    files["gone/model.bin"].unlink()
    provider = HttpProvider(settings)
    try:
        with pytest.raises(ObjectNotFound) as info:
            await read(provider, pointer, 0, 1000)
    finally:
        await provider.aclose()
    assert "gone/model.bin" in str(info.value) and "404" in str(info.value)

    out = tmp_path / "out"
    origin.reset_stats()
    with pytest.raises(DownloadError) as failure:
        await resolve([pointer], str(out), settings, progress=False)
    assert isinstance(failure.value.cause, ObjectNotFound)
    assert "gone/model.bin" in str(failure.value)
    assert origin.stats.snapshot().requests == 1  # a 404 is not retried
    assert not (out / "gone" / "model.bin").exists() and not leftovers(out)


async def test_wrong_total_is_stale_manifest_and_nothing_is_written(
    origin: Origin, settings: Settings, tmp_path: Path
) -> None:
    files = write_random_files(origin.root, {"m/shard.bin": 4 * MiB + 1})
    pointer = one_pointer(origin, files)
    origin.faults = Faults(wrong_total=4 * MiB + 999)
    provider = HttpProvider(settings)
    try:
        with pytest.raises(StaleManifest) as info:
            await read(provider, pointer, 0, MiB)
    finally:
        await provider.aclose()
    message = str(info.value)
    assert "m/shard.bin" in message
    assert str(4 * MiB + 999) in message and str(4 * MiB + 1) in message

    out = tmp_path / "out"
    with pytest.raises(DownloadError) as failure:
        await resolve([pointer], str(out), settings, progress=False)
    assert isinstance(failure.value.cause, StaleManifest)
    assert "m/shard.bin" in str(failure.value)
    assert not (out / "m" / "shard.bin").exists() and not leftovers(out)


async def test_server_that_ignores_range(settings: Settings, tmp_path: Path) -> None:
    data = write_random_files(tmp_path / "src", {"f": 3 * MiB + 5})["f"].read_bytes()
    with NoRangeServer(data) as server:
        pointer = Pointer(
            resolution=HttpResolution(url=server.url, expiration_timestamp=4044816725),
            uid="norange",
            file_name="norange/file.bin",
            hashtype="sha256",
            hash=__import__("hashlib").sha256(data).hexdigest(),
            size=len(data),
        )
        provider = HttpProvider(settings)
        try:
            assert await read(provider, pointer, MiB + 7, 2 * MiB) == data[MiB + 7 : 2 * MiB]
            assert await read(provider, pointer, 0, len(data)) == data
        finally:
            await provider.aclose()
        assert server.range_headers[0] == f"bytes={MiB + 7}-{2 * MiB - 1}"

        out = tmp_path / "out"
        await resolve([pointer], str(out), settings, progress=False)
        assert (out / "norange" / "file.bin").read_bytes() == data

    # The whole-body length is checked against the manifest too.
    with NoRangeServer(data) as server:
        stale = Pointer(
            resolution=HttpResolution(url=server.url, expiration_timestamp=4044816725),
            uid="norange",
            file_name="norange/stale.bin",
            hashtype="sha256",
            hash="0" * 64,
            size=len(data) + 1,
        )
        provider = HttpProvider(settings)
        try:
            with pytest.raises(StaleManifest, match=r"norange/stale\.bin"):
                await read(provider, stale, 0, 10)
        finally:
            await provider.aclose()


# -- broken bodies ---------------------------------------------------------------------------------


async def test_truncated_and_reset_bodies_are_retried_byte_identical(
    origin: Origin, settings: Settings, tmp_path: Path
) -> None:
    # One file, one 16 MiB run: the fault draws happen in request order, deterministically.
    files = write_random_files(origin.root, {"a/one.bin": 15 * MiB + 1})
    origin.faults = Faults(truncate_rate=0.3, reset_rate=0.3, seed=4)  # reset, truncate, ...
    settings = settings.replace(
        retry=RetryPolicy(attempts=20, base_delay=0.01, max_delay=0.05, deadline=60)
    )
    out = tmp_path / "out"
    report = await resolve(
        pointers_of(manifest_for(origin, files)), str(out), settings, progress=False
    )
    assert report.success
    assert_same_files(out, files)
    injected = origin.stats.snapshot().faults_injected
    assert injected.get("truncate", 0) >= 1 and injected.get("reset", 0) >= 1, injected
    # Every retry resumed at the first byte that had not landed, after where the broken request
    # started (mid-block: the journal keeps partial blocks; bytes cut off by a reset are dropped
    # by the kernel, so sent bytes are not the measure).
    for path, st in origin.stats.snapshot().by_path.items():
        starts = [start for start, _ in st.ranges]
        assert starts == sorted(starts) and len(set(starts)) == len(starts), (path, starts)
    # The truncated body delivered >= 20% of the range before its FIN: its blocks were kept.
    starts = [start for start, _ in origin.stats.snapshot().by_path["/files/a/one.bin"].ranges]
    assert len(starts) >= 3 and starts[-1] > 0, starts


async def test_stalled_body_is_abandoned_and_reissued(
    origin: Origin, settings: Settings, tmp_path: Path
) -> None:
    files = write_random_files(origin.root, {"s.bin": 3 * MiB})
    origin.faults = Faults(stall_rate=1.0, stall_seconds=20)
    settings = settings.replace(stall_timeout=1.0)

    async def heal() -> None:
        await wait_until(lambda: origin.stats.snapshot().faults_injected.get("stall"))
        origin.faults.stall_rate = 0.0

    out = tmp_path / "out"
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(heal)
        await resolve(pointers_of(manifest_for(origin, files)), str(out), settings, progress=False)
    elapsed = trio.current_time() - t0
    assert_same_files(out, files)
    assert origin.stats.snapshot().faults_injected["stall"] >= 1
    assert 0.9 <= elapsed < 10  # gave up after ~1 s of silence, not the 20 s stall
