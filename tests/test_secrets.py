"""Tests for ttfs.secrets: upstream oracles (spec §7.1 secrets.rs) and the file-read guard."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ttfs import secrets
from ttfs.secrets import (
    ALLOWED_PREFIXES,
    SECRETS_DIR_ENV,
    get_hf_token,
    get_secret,
    secrets_dir,
)

VALUE = "s3cr3t-VALUE-do-not-log"


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Iterator[None]:
    secrets._reset_warnings()
    yield
    secrets._reset_warnings()


@pytest.fixture
def sdir(tmp_path: Path) -> Path:
    d = tmp_path / "secrets"
    d.mkdir()
    return d


def _env(sdir: Path, **extra: str) -> dict[str, str]:
    return {SECRETS_DIR_ENV: str(sdir), **extra}


def test_secrets_dir_default_and_override(tmp_path: Path) -> None:
    assert secrets_dir({}) == Path("/secrets")
    assert secrets_dir({SECRETS_DIR_ENV: ""}) == Path("/secrets")
    assert secrets_dir({SECRETS_DIR_ENV: str(tmp_path)}) == tmp_path
    assert ALLOWED_PREFIXES == ("/secrets", "/aws-secrets", "/app", "/tmp")


# ------------------------------------------------------------------ secrets.rs oracles


def test_env_value_returned(sdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = _env(sdir, TRUSS_SECRET_my_cred="my-secret-value")
    with caplog.at_level(logging.INFO, logger="ttfs.secrets"):
        assert get_secret("my_cred", env) == "my-secret-value"
    assert (
        "Secret 'my_cred' resolved from environment variable 'TRUSS_SECRET_my_cred'"
        in caplog.messages
    )
    assert "my-secret-value" not in caplog.text


def test_env_value_trimmed(sdir: Path) -> None:
    assert get_secret("x", _env(sdir, TRUSS_SECRET_x="  my-secret  \n")) == "my-secret"


def test_empty_env_falls_through_to_file(sdir: Path) -> None:
    env = _env(sdir, TRUSS_SECRET_x="   ")
    assert get_secret("x", env) is None
    (sdir / "x").write_text("from-file\n")
    assert get_secret("x", env) == "from-file"


def test_neither_env_nor_file(sdir: Path) -> None:
    assert get_secret("absent", _env(sdir)) is None


def test_unprefixed_env_not_used(sdir: Path) -> None:
    assert get_secret("my_cred", _env(sdir, my_cred="bare")) is None
    env = _env(sdir, my_cred="bare", TRUSS_SECRET_my_cred="prefixed")
    assert get_secret("my_cred", env) == "prefixed"


def test_env_is_case_sensitive(sdir: Path) -> None:
    assert get_secret("Cred", _env(sdir, TRUSS_SECRET_cred="v")) is None


def test_generic_env_precedes_file(sdir: Path) -> None:
    (sdir / "gcs-account").write_text('{"type": "service_account"}')
    env = _env(sdir, **{"TRUSS_SECRET_gcs-account": "from-env"})
    assert get_secret("gcs-account", env) == "from-env"
    assert get_secret("gcs-account", _env(sdir)) == '{"type": "service_account"}'


def test_uses_os_environ_by_default(sdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRETS_DIR_ENV, str(sdir))
    monkeypatch.setenv("TRUSS_SECRET_envdefault", "v1")
    assert get_secret("envdefault") == "v1"
    (sdir / "hfdefault").write_text("tok")
    assert get_hf_token("hfdefault") == "tok"


# ------------------------------------------------------------------ HF rules


def test_hf_file_precedes_env(sdir: Path) -> None:
    (sdir / "hf_access_token").write_text("  file-token \n")
    env = _env(sdir, HF_TOKEN="env-token", HUGGING_FACE_HUB_TOKEN="hub-token")
    assert get_hf_token("hf_access_token", env) == "file-token"


def test_hf_env_fallbacks_for_any_name(sdir: Path) -> None:
    both = _env(sdir, HF_TOKEN="env-token", HUGGING_FACE_HUB_TOKEN="hub-token")
    assert get_hf_token("hf_access_token", both) == "env-token"
    assert get_hf_token("some-other-name", both) == "env-token"
    hub_only = _env(sdir, HUGGING_FACE_HUB_TOKEN="hub-token")
    assert get_hf_token("anything", hub_only) == "hub-token"
    empty_first = _env(sdir, HF_TOKEN="  ", HUGGING_FACE_HUB_TOKEN="hub-token")
    assert get_hf_token("anything", empty_first) == "hub-token"
    assert get_hf_token("anything", _env(sdir)) is None


def test_hf_ignores_truss_secret_env(sdir: Path) -> None:
    assert get_hf_token("tok", _env(sdir, TRUSS_SECRET_tok="x")) is None


def test_empty_file_is_missing(sdir: Path) -> None:
    (sdir / "tok").write_text(" \n\t")
    assert get_hf_token("tok", _env(sdir)) is None
    assert get_hf_token("tok", _env(sdir, HF_TOKEN="fallback")) == "fallback"


# ------------------------------------------------------------------ warnings


def test_missing_file_warns_once_per_name(sdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = _env(sdir)
    with caplog.at_level(logging.WARNING, logger="ttfs.secrets"):
        assert get_hf_token("hf_access_token", env) is None
        assert get_hf_token("hf_access_token", env) is None
        assert get_secret("other", env) is None
    expected = (
        f"No secret found in {sdir / 'hf_access_token'}. Using unauthenticated access. "
        "Make sure to set `hf_access_token` in your Baseten.co secrets and add "
        "`secrets:- hf_access_token: null` to your config.yaml."
    )
    assert caplog.messages.count(expected) == 1
    assert sum("No secret found in" in m for m in caplog.messages) == 2  # + "other"

    caplog.clear()
    secrets._reset_warnings()
    with caplog.at_level(logging.WARNING, logger="ttfs.secrets"):
        get_hf_token("hf_access_token", env)
    assert caplog.messages == [expected]


def test_env_hit_does_not_warn(sdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ttfs.secrets"):
        assert get_secret("x", _env(sdir, TRUSS_SECRET_x="v")) == "v"
    assert not caplog.records


# ------------------------------------------------------------------ file-read guard


def _outside_file() -> Path:
    """A readable regular file outside every allowed prefix (and outside tmp)."""
    candidates = [Path("/etc/passwd"), Path("/etc/hostname"), Path(__file__).resolve()]
    for c in candidates:
        if c.is_file() and not any(
            c.resolve().is_relative_to(Path(p).resolve()) for p in ALLOWED_PREFIXES
        ):
            return c.resolve()
    pytest.skip("no readable file outside the allowed prefixes")


def test_symlink_outside_whitelist_rejected(sdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = _outside_file()
    (sdir / "evil").symlink_to(target)
    with caplog.at_level(logging.WARNING, logger="ttfs.secrets"):
        assert get_secret("evil", _env(sdir)) is None
        assert get_hf_token("evil", _env(sdir, HF_TOKEN="fallback")) == "fallback"
    assert f"Secret path '{target}' does not match any allowed prefix in whitelist" in (
        caplog.messages
    )


def test_dotdot_name_and_slashes_rejected(sdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (sdir / "inner").mkdir()
    (sdir / "inner" / "tok").write_text("nested")
    (sdir.parent / "outside").write_text("outside")
    env = _env(sdir)
    with caplog.at_level(logging.WARNING, logger="ttfs.secrets"):
        for name in ("inner/tok", "../outside", "..", ".", "", "a\0b"):
            assert get_secret(name, env) is None, name
            assert get_hf_token(name, env) is None, name
    warned = [m for m in caplog.messages if "not a plain file name" in m]
    assert len(warned) == 12
    assert "nested" not in caplog.text


def test_configured_dir_allowed_and_escape_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Pretend none of the fixed prefixes covers tmp: only the configured dir is allowed.
    monkeypatch.setattr(secrets, "ALLOWED_PREFIXES", ("/nonexistent-prefix",))
    sdir = tmp_path / "secrets"
    sdir.mkdir()
    (sdir / "tok").write_text("inside")
    (tmp_path / "elsewhere").write_text(VALUE)
    (sdir / "escape").symlink_to(tmp_path / "elsewhere")
    (sdir / "dotdot").symlink_to(Path("..") / "elsewhere")
    env = _env(sdir)
    assert get_secret("tok", env) == "inside"
    with caplog.at_level(logging.WARNING, logger="ttfs.secrets"):
        assert get_secret("escape", env) is None
        assert get_secret("dotdot", env) is None
    whitelist = [m for m in caplog.messages if "does not match any allowed prefix" in m]
    assert (
        whitelist
        == [
            f"Secret path '{(tmp_path / 'elsewhere').resolve()}' does not match any allowed "
            "prefix in whitelist"
        ]
        * 2
    )
    assert VALUE not in caplog.text


def test_secrets_dir_itself_may_be_anywhere(tmp_path: Path) -> None:
    # a symlinked secrets dir that resolves to the configured dir is fine
    real = tmp_path / "real"
    real.mkdir()
    (real / "tok").write_text("ok")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert get_secret("tok", {SECRETS_DIR_ENV: str(link)}) == "ok"


def test_symlink_within_secrets_dir_allowed(sdir: Path) -> None:
    (sdir / "real").write_text("value")
    (sdir / "alias").symlink_to(sdir / "real")
    assert get_secret("alias", _env(sdir)) == "value"


def test_non_regular_file_ignored(sdir: Path) -> None:
    (sdir / "adir").mkdir()
    assert get_secret("adir", _env(sdir)) is None
    if hasattr(os, "mkfifo"):
        os.mkfifo(sdir / "fifo")  # would block forever if opened
        assert get_secret("fifo", _env(sdir)) is None


def test_value_never_logged(sdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (sdir / "hf").write_text(VALUE)
    (sdir / "cloud").write_text(VALUE)
    env = _env(
        sdir,
        TRUSS_SECRET_envcred=VALUE,
        HF_TOKEN=VALUE,
        HUGGING_FACE_HUB_TOKEN=VALUE,
    )
    with caplog.at_level(logging.DEBUG):
        assert get_hf_token("hf", env) == VALUE
        assert get_hf_token("missing", env) == VALUE
        assert get_secret("cloud", env) == VALUE
        assert get_secret("envcred", env) == VALUE
        assert get_secret("missing2", env) is None
    assert caplog.records  # something was logged...
    assert VALUE not in caplog.text  # ...but never the value
    for record in caplog.records:
        assert VALUE not in record.getMessage()
