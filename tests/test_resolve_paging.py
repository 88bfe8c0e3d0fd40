"""TRUSS_TRANSFER_PAGE_AFTER_DOWNLOAD: every finished file, skipped ones too, is read once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.fakes import FakeProvider, pointer_for, ramp
from ttfs.config import Settings
from ttfs.providers import ProviderSet
from ttfs.resolve import resolve


async def test_page_after_download_reads_every_file(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = {"a.bin": ramp(3 << 20, 1), "b/c.bin": ramp(1000, 2)}
    pointers = [pointer_for(n, d) for n, d in files.items()]
    out = tmp_path / "out"

    async def run(page_after: bool) -> None:
        providers = ProviderSet(settings)
        providers.add("http", FakeProvider(files))
        await resolve(
            pointers, str(out), settings, providers=providers, progress=False, page_after=page_after
        )

    caplog.set_level(logging.DEBUG, logger="ttfs.resolve")
    await run(False)
    assert "paged" not in caplog.text
    await run(True)  # everything is skipped now: skipped files are paged too
    paged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("paged")]
    assert sorted(paged) == sorted(
        f"paged {out / n} into the page cache ({len(d)} bytes)" for n, d in files.items()
    )
