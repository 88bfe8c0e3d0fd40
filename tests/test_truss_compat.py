"""The ``truss_transfer`` drop-in, checked against truss's own LazyDataResolverV2 test (spec §7.3).

The manifest is a tmp ``static-bptr-manifest.json`` found through ``TTFS_MANIFEST_PATHS``; the
pointer is served by the real counting origin. Proves:

* no manifest: ``lazy_data_resolve`` returns the download dir and downloads nothing (spec §3.2
  note: truss's *wrapper* returns ``""`` because it never calls us in that case);
* ``{"invalid": true}`` raises;
* one untagged http pointer with a relative nested name and a blake3 hash lands with the right
  size and the call returns the dir, with blake3 not installed (size rule) and, where blake3 is
  installed, verified (a wrong blake3 hash then fails);
* ``BASETEN_FS_ENABLED=True`` alone changes nothing; two pointers both land;
* an expired timestamp logs upstream's ERROR line and does not raise;
* ``download_dir=None`` uses ``TRUSS_TRANSFER_DOWNLOAD_DIR``; ``models`` without ``model_path``
  raises upstream's text; ``PyModelRepo`` has upstream's signature and writable attributes;
  ``__version__`` is ``0.0.43``;
* ``python -m truss_transfer DIR`` and ``truss_transfer_cli DIR`` exit 0, or 1 with
  ``Error during execution:``; the stats file has every field of spec §3.14.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import truss_transfer
from demo.origin import Origin
from tests.origin_helpers import REPO_ROOT, cli_env, run_cli, write_manifest, write_random_files

SIZE = 1482
NAME = "nested/config.json"
EXPIRES = 4111111611
BLAKE3_OF_NOTHING_WE_SERVE = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"

STATS_FIELDS = {
    "total_manifest_size_bytes",
    "total_download_time_secs",
    "total_aggregated_mb_s",
    "file_downloads",
    "b10fs_read_speed_mbps",
    "b10fs_decision_to_use",
    "b10fs_enabled",
    "b10fs_hot_starts_files",
    "b10fs_hot_starts_bytes",
    "b10fs_cold_starts_files",
    "b10fs_cold_starts_bytes",
    "success",
    "timestamp",
}


def untagged(
    url: str,
    file_name: str = NAME,
    *,
    hash_: str = BLAKE3_OF_NOTHING_WE_SERVE,
    expires: int = EXPIRES,
) -> dict[str, Any]:
    """The upstream test's pointer: no ``resolution_type``, blake3, 1482 bytes, relative name."""
    return {
        "resolution": {"url": url, "expiration_timestamp": expires},
        "uid": "truss-test-uid",
        "file_name": file_name,
        "hashtype": "blake3",
        "hash": hash_,
        "size": SIZE,
    }


@pytest.fixture
def manifest_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the manifest goes (not written yet); the lookup and the cache point into tmp."""
    path = tmp_path / "static-bptr" / "static-bptr-manifest.json"
    monkeypatch.setenv("TTFS_MANIFEST_PATHS", str(path))
    monkeypatch.setenv("TTFS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TTFS_RETRY_ATTEMPTS", "2")
    return path


@pytest.fixture
def served(origin: Origin) -> Path:
    """The 1482-byte file the pointer names, served by the origin."""
    return write_random_files(origin.root, {"circleci/config.yml": SIZE}, seed=9)[
        "circleci/config.yml"
    ]


@pytest.fixture
def no_blake3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "blake3", None)  # import blake3 -> ImportError


def blake3_hex(data: bytes) -> str:
    """The real blake3 of ``data`` where the module is installed (a subprocess checks it)."""
    try:
        import blake3
    except ImportError:
        return BLAKE3_OF_NOTHING_WE_SERVE  # unchecked without the module: any 64 hex will do
    return str(blake3.blake3(data).hexdigest())


def stats_file() -> dict[str, Any]:
    return json.loads(Path(os.environ["TTFS_STATS_FILE"]).read_text())


# -- upstream's test_lazy_data_resolver_v2 ---------------------------------------------------------


def test_no_manifest_returns_the_dir_and_downloads_nothing(
    manifest_path: Path, origin: Origin, tmp_path: Path
) -> None:
    target = tmp_path / "data"
    assert truss_transfer.lazy_data_resolve(str(target)) == str(target)
    assert not target.exists()
    assert origin.stats.snapshot().requests == 0
    report = stats_file()
    assert report["success"] is True and report["file_downloads"] == []


def test_invalid_manifest_raises(manifest_path: Path, tmp_path: Path) -> None:
    write_manifest(manifest_path, {"invalid": True})
    with pytest.raises(Exception, match="Failed to parse JSON manifest") as info:
        truss_transfer.lazy_data_resolve(str(tmp_path / "data"))
    assert str(manifest_path) in str(info.value)
    assert stats_file()["success"] is False


def test_untagged_pointer_lands_without_blake3(
    manifest_path: Path, origin: Origin, served: Path, tmp_path: Path, no_blake3: None
) -> None:
    write_manifest(manifest_path, {"pointers": [untagged(origin.url("circleci/config.yml"))]})
    target = tmp_path / "data"
    assert truss_transfer.lazy_data_resolve(str(target)) == str(target)
    dest = target / NAME
    assert dest.stat().st_size == SIZE
    assert dest.read_bytes() == served.read_bytes()
    assert origin.stats.snapshot().data_requests == 1


def test_untagged_pointer_is_verified_with_blake3(
    manifest_path: Path, origin: Origin, served: Path, tmp_path: Path
) -> None:
    blake3 = pytest.importorskip("blake3")
    digest = blake3.blake3(served.read_bytes()).hexdigest()
    url = origin.url("circleci/config.yml")
    write_manifest(manifest_path, {"pointers": [untagged(url, hash_=digest)]})
    target = tmp_path / "data"
    assert truss_transfer.lazy_data_resolve(str(target)) == str(target)
    assert (target / NAME).read_bytes() == served.read_bytes()

    # A blake3 hash the content does not have is caught (fetched twice, then an error).
    write_manifest(manifest_path, {"pointers": [untagged(url, "other/config.json")]})
    with pytest.raises(Exception, match=r"other/config\.json"):
        truss_transfer.lazy_data_resolve(str(target))
    assert not (target / "other" / "config.json").exists()


def test_baseten_fs_enabled_alone_changes_nothing(
    manifest_path: Path,
    origin: Origin,
    served: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_blake3: None,
) -> None:
    monkeypatch.setenv("BASETEN_FS_ENABLED", "True")
    monkeypatch.setenv("TRUSS_TRANSFER_CACHE_DIR", str(tmp_path / "b10fs"))
    write_manifest(manifest_path, {"pointers": [untagged(origin.url("circleci/config.yml"))]})
    target = tmp_path / "data"
    assert truss_transfer.lazy_data_resolve(str(target)) == str(target)
    assert (target / NAME).stat().st_size == SIZE
    assert not (tmp_path / "b10fs").exists()  # b10fs needs USE_BASETEN_FS_TRUSS_TRANSFER too
    assert stats_file()["b10fs_enabled"] is False


def test_two_pointers_both_land(
    manifest_path: Path, origin: Origin, served: Path, tmp_path: Path, no_blake3: None
) -> None:
    url = origin.url("circleci/config.yml")
    write_manifest(
        manifest_path, {"pointers": [untagged(url), untagged(url, "1nested/config.json")]}
    )
    target = tmp_path / "data"
    assert truss_transfer.lazy_data_resolve(str(target)) == str(target)
    for name in (NAME, "1nested/config.json"):
        assert (target / name).read_bytes() == served.read_bytes()
    assert len(stats_file()["file_downloads"]) == 2


def test_expired_pointer_logs_an_error_and_does_not_raise(
    manifest_path: Path,
    origin: Origin,
    served: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    no_blake3: None,
) -> None:
    caplog.set_level(logging.INFO)
    write_manifest(
        manifest_path, {"pointers": [untagged(origin.url("circleci/config.yml"), expires=1)]}
    )
    target = tmp_path / "data"
    assert truss_transfer.lazy_data_resolve(str(target)) == str(target)
    assert (target / NAME).stat().st_size == SIZE
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        m.startswith(f"Pointer {NAME} has expired at 1. Current time is ")
        and m.endswith("This will lead to a download failure.")
        for m in errors
    ), errors


# -- the rest of the API surface -------------------------------------------------------------------


def test_download_dir_none_uses_the_env_var(
    manifest_path: Path,
    origin: Origin,
    served: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_blake3: None,
) -> None:
    target = tmp_path / "from-env"
    monkeypatch.setenv("TRUSS_TRANSFER_DOWNLOAD_DIR", str(target))
    write_manifest(manifest_path, {"pointers": [untagged(origin.url("circleci/config.yml"))]})
    assert truss_transfer.lazy_data_resolve() == str(target)
    assert truss_transfer.lazy_data_resolve(None) == str(target)
    assert (target / NAME).stat().st_size == SIZE


def test_models_without_model_path_raise_upstream_text(tmp_path: Path) -> None:
    repo = truss_transfer.PyModelRepo("julien-c/dummy-unknown", "main")
    with pytest.raises(Exception, match=r"^model_path must be provided when models are provided$"):
        truss_transfer.lazy_data_resolve(str(tmp_path), [repo])


def test_py_model_repo_signature_defaults_and_writes() -> None:
    params = list(inspect.signature(truss_transfer.PyModelRepo).parameters.values())
    assert [(p.name, p.default) for p in params] == [
        ("repo_id", inspect.Parameter.empty),
        ("revision", ""),
        ("volume_folder", ""),
        ("kind", "hf"),
        ("allow_patterns", None),
        ("ignore_patterns", None),
        ("runtime_secret_name", "hf_access_token"),
    ]
    repo = truss_transfer.PyModelRepo("org/m", "rev", "vol", "gcs", ["*.json"], ["*.md"], "sec")
    assert (repo.repo_id, repo.revision, repo.volume_folder, repo.kind) == (
        "org/m",
        "rev",
        "vol",
        "gcs",
    )
    assert (repo.allow_patterns, repo.ignore_patterns, repo.runtime_secret_name) == (
        ["*.json"],
        ["*.md"],
        "sec",
    )
    for attr, value in {
        "repo_id": "x/y",
        "revision": "main",
        "volume_folder": "v2",
        "kind": "s3",
        "allow_patterns": ["*"],
        "ignore_patterns": [],
        "runtime_secret_name": "other",
    }.items():
        setattr(repo, attr, value)
        assert getattr(repo, attr) == value
    repo.kind = "not-a-kind"  # validated only when used, as upstream
    sig = inspect.signature(truss_transfer.lazy_data_resolve)
    assert [(p.name, p.default) for p in sig.parameters.values()] == [
        ("download_dir", None),
        ("models", None),
        ("model_path", None),
    ]


def test_version() -> None:
    assert truss_transfer.__version__ == "0.0.43"


# -- the CLI entry points and the stats file -------------------------------------------------------


@pytest.mark.parametrize("runner", ["module", "console_script"])
def test_cli_exit_codes(
    runner: str, manifest_path: Path, origin: Origin, served: Path, tmp_path: Path
) -> None:
    if runner == "console_script":
        script = shutil.which("truss_transfer_cli", path=str(Path(sys.executable).parent))
        if script is None:  # `pip install -e .` puts it there
            pytest.skip("truss_transfer_cli is not installed in this environment")
        cmd = [script]
    else:
        cmd = [sys.executable, "-m", "truss_transfer"]
    env = cli_env(tmp_path / "cache", TTFS_MANIFEST_PATHS=str(manifest_path))
    target = tmp_path / "data"

    digest = blake3_hex(served.read_bytes())
    url = origin.url("circleci/config.yml")
    write_manifest(manifest_path, {"pointers": [untagged(url, hash_=digest)]})
    ok = subprocess.run(
        [*cmd, str(target), "ignored-extra-arg"],
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert (target / NAME).read_bytes() == served.read_bytes()
    report = json.loads(Path(env["TTFS_STATS_FILE"]).read_text())
    assert set(report) >= STATS_FIELDS, STATS_FIELDS - set(report)
    assert report["success"] is True
    assert report["total_manifest_size_bytes"] == SIZE
    (download,) = report["file_downloads"]
    assert download["file_name"] == NAME and download["file_size_bytes"] == SIZE
    assert set(download) == {
        "file_name",
        "file_size_bytes",
        "download_time_secs",
        "download_speed_mb_s",
    }
    assert report["b10fs_read_speed_mbps"] is None and report["b10fs_enabled"] is False
    assert isinstance(report["timestamp"], int) and isinstance(
        report["total_aggregated_mb_s"], float
    )

    write_manifest(manifest_path, {"invalid": True})
    bad = subprocess.run(
        [*cmd, str(tmp_path / "other")],
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 1
    assert "Error during execution:" in bad.stderr
    assert "Traceback" not in bad.stderr
    report = json.loads(Path(env["TTFS_STATS_FILE"]).read_text())
    assert set(report) >= STATS_FIELDS and report["success"] is False


def test_cli_failure_to_download_exits_1_naming_the_file(
    manifest_path: Path, origin: Origin, tmp_path: Path
) -> None:
    write_manifest(manifest_path, {"pointers": [untagged(origin.url("circleci/missing.yml"))]})
    env = cli_env(tmp_path / "cache", TTFS_MANIFEST_PATHS=str(manifest_path))
    result = run_cli([str(tmp_path / "data")], env, module="truss_transfer")
    assert result.returncode == 1
    assert "Error during execution:" in result.stderr and NAME in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / NAME).exists()
