"""Hostile and broken manifests through the real CLI (``python -m ttfs resolve M DIR``).

Proves that each bad input (path traversal, a hash with ``/``, a negative size, a document
without pointers, a non-JSON file, a missing file) exits non-zero with exactly one line on
stderr and no traceback, writes nothing anywhere (the parent directories of the target are
compared before and after), and leaves no partial file; and that a pointer claiming 1 TiB that
the origin does not have fails clearly without allocating anything like 1 TiB.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from demo.origin import Origin
from tests.origin_helpers import (
    allocated_bytes,
    cli_env,
    leftovers,
    run_cli,
    stderr_lines,
    tree,
    write_manifest,
)
from ttfs.units import MiB


def pointer(url: str, file_name: str, *, size: int = 5, hash_: str = "ab" * 32) -> dict[str, Any]:
    return {
        "resolution": {"url": url, "expiration_timestamp": 4044816725},
        "uid": f"u:{file_name}",
        "file_name": file_name,
        "hashtype": "sha256",
        "hash": hash_,
        "size": size,
    }


URL = "http://127.0.0.1:9/never-fetched"

HOSTILE: dict[str, object] = {
    "traversal": {"pointers": [pointer(URL, "../../escape")]},
    "traversal_nested": {"pointers": [pointer(URL, "ok.bin"), pointer(URL, "a/../../../escape")]},
    "hash_with_slash": {"pointers": [pointer(URL, "x.bin", hash_="a/b")]},
    "negative_size": {"pointers": [pointer(URL, "x.bin", size=-1)]},
    "no_pointers": {"invalid": True},
    "not_json": "this is { not json",
    "missing_file": None,
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_manifest_fails_with_one_line_and_writes_nothing(case: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    target = work / "deep" / "er" / "out"
    target.parent.mkdir(parents=True)
    manifest = tmp_path / "m.json"
    content = HOSTILE[case]
    if isinstance(content, str):
        manifest.write_text(content)
    elif content is not None:
        write_manifest(manifest, content)  # type: ignore[arg-type]
    cache = tmp_path / "cache"
    stats = tmp_path / "stats.json"
    before = tree(tmp_path, exclude=(cache, stats))

    result = run_cli(["resolve", str(manifest), str(target)], cli_env(cache))

    assert result.returncode != 0
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ttfs: error:"), lines
    assert "Traceback" not in result.stderr and result.stdout == ""
    if case == "missing_file":
        assert str(manifest) in lines[0]
    assert tree(tmp_path, exclude=(cache, stats)) == before
    assert not target.exists()
    assert not leftovers(tmp_path)
    assert not (tmp_path / "escape").exists() and not (work / "escape").exists()


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("traversal", ".."),
        ("hash_with_slash", "a/b"),
        ("negative_size", "-1"),
        ("no_pointers", "pointers"),
        ("not_json", "JSON"),
    ],
)
def test_hostile_manifest_error_names_the_problem(case: str, needle: str, tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    content = HOSTILE[case]
    if isinstance(content, str):
        manifest.write_text(content)
    else:
        write_manifest(manifest, content)  # type: ignore[arg-type]
    result = run_cli(["resolve", str(manifest), str(tmp_path / "out")], cli_env(tmp_path / "c"))
    assert result.returncode == 2  # a user error
    assert needle in result.stderr, result.stderr


def test_huge_pointer_the_origin_lacks_fails_without_allocating(
    origin: Origin, tmp_path: Path
) -> None:
    size = 2**40
    manifest = write_manifest(
        tmp_path / "m.json",
        {"pointers": [pointer(origin.url("no/such.bin"), "w/huge.bin", size=size)]},
    )
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    result = run_cli(["resolve", str(manifest), str(out)], cli_env(cache))
    assert result.returncode != 0
    errors = [line for line in stderr_lines(result) if line.startswith("ttfs: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "w/huge.bin" in errors[0] and "404" in errors[0], errors
    assert not (out / "w" / "huge.bin").exists() and not leftovers(tmp_path)
    assert allocated_bytes(tmp_path) < 64 * MiB  # nothing like 1 TiB was written anywhere
    assert origin.stats.snapshot().requests == 1  # 404 is final: no retries


def test_stats_file_records_a_manifest_failure(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.json", {"invalid": True})
    stats = tmp_path / "stats.json"
    result = run_cli(["resolve", str(manifest), str(tmp_path / "out")], cli_env(tmp_path / "c"))
    assert result.returncode == 2
    assert json.loads(stats.read_text())["success"] is False
