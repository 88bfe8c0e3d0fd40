"""Shared fixtures: a clean environment, settings with a private cache, the counting origin."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from ttfs.config import Settings

_STRIP_PREFIXES = (
    "TTFS_",
    "TRUSS_TRANSFER_",
    "TRUSS_SECRET_",
    "HF_",
    "HUGGING_FACE_",
    "BASETEN_FS",
    "USE_BASETEN_FS",
    "RUST_LOG",
)
_STRIP_EXACT = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def pytest_configure(config: pytest.Config) -> None:
    """Let Ctrl-C reach the processes the tests start, whoever started the suite.

    A non-interactive shell starts a background job (``make test &``, a CI runner's script)
    with SIGINT ignored, and an ignored signal stays ignored across exec: every ttfs process a
    test starts would then ignore the Ctrl-C the signal tests send, and run to completion.
    A handler (unlike SIG_IGN) is reset to the default on exec.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Every test starts without our variables; manifests and secrets never come from /."""
    for name in list(os.environ):
        if name.startswith(_STRIP_PREFIXES) or name in _STRIP_EXACT:
            monkeypatch.delenv(name, raising=False)
    secrets = tmp_path / "ttfs-secrets"
    secrets.mkdir()
    monkeypatch.setenv("TTFS_MANIFEST_PATHS", "")
    monkeypatch.setenv("TTFS_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("TTFS_STATS_FILE", str(tmp_path / "stats.json"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def settings(cache_dir: Path) -> Settings:
    """Fast-failing settings for tests: short retries and stall timeout."""
    from ttfs.config import RetryPolicy

    return Settings.from_env(
        cache_dir=cache_dir,
        retry=RetryPolicy(attempts=6, base_delay=0.02, max_delay=0.2, deadline=30.0),
        stall_timeout=5.0,
        flush_interval=0.1,
    )


# The counting origin as fixtures (tests/origin_helpers.py): `origin_root`, `origin`, `test_ca`.
from tests.origin_helpers import origin, origin_root, test_ca  # noqa: E402, F401
