"""Runtime secrets: the credentials a pointer's ``runtime_secret_name`` refers to.

The lookup rules are upstream ``truss_transfer``'s (spec §3.10), so a deployment's secrets work
unchanged:

* :func:`get_secret` (GCS, S3, Azure): env ``TRUSS_SECRET_<name>``, then the file
  ``<secrets dir>/<name>``;
* :func:`get_hf_token` (HuggingFace and other http): the file ``<secrets dir>/<name>``, then
  env ``HF_TOKEN``, then ``HUGGING_FACE_HUB_TOKEN`` (for *any* name, as upstream does).

Values are stripped of surrounding whitespace; an empty value counts as missing.

The secrets dir is ``/secrets``; ``TTFS_SECRETS_DIR`` overrides it (tests, non-root users).
Before a file is read its path is canonicalised (symlinks and ``..`` resolved) and must lie
under ``/secrets``, ``/aws-secrets``, ``/app``, ``/tmp`` or the configured secrets dir, so a
symlink planted in the secrets dir cannot make us read (and send to an origin) an arbitrary
file. Names containing ``/`` or NUL, or equal to ``.``/``..``, never reach the filesystem.
A missing or empty file is logged once per secret name per process. Secret values are never
logged.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

SECRETS_DIR = "/secrets"
"""Default secrets dir (upstream's hard-coded base)."""

SECRETS_DIR_ENV = "TTFS_SECRETS_DIR"
"""Environment variable overriding :data:`SECRETS_DIR`."""

ALLOWED_PREFIXES: tuple[str, ...] = ("/secrets", "/aws-secrets", "/app", "/tmp")
"""Canonical secret paths must lie under one of these (or under the configured secrets dir)."""

ENV_PREFIX = "TRUSS_SECRET_"
HF_TOKEN_ENVS: tuple[str, ...] = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

_MAX_SECRET_BYTES = 1024 * 1024  # service-account JSON is ~2 KiB; refuse anything absurd

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _reset_warnings() -> None:
    """Forget which "No secret found" warnings were already logged (for tests)."""
    with _warned_lock:
        _warned.clear()


def secrets_dir(env: Mapping[str, str] | None = None) -> Path:
    """The secrets dir: ``TTFS_SECRETS_DIR`` when set and non-empty, else ``/secrets``."""
    env = os.environ if env is None else env
    return Path(env.get(SECRETS_DIR_ENV) or SECRETS_DIR)


def _env_value(env: Mapping[str, str], key: str) -> str | None:
    value = env.get(key)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _valid_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


def _canonical(path: Path) -> Path:
    """Resolve symlinks and ``..``; for a missing file resolve the parent and re-append."""
    try:
        return path.resolve(strict=True)
    except FileNotFoundError:
        return path.parent.resolve() / path.name


def _under(path: Path, prefix: Path) -> bool:
    return path == prefix or path.is_relative_to(prefix)


def _allowed(canonical: Path, base: Path) -> bool:
    prefixes = [Path(p) for p in ALLOWED_PREFIXES]
    prefixes += [p.resolve() for p in prefixes]  # e.g. /tmp -> /private/tmp on macOS
    prefixes += [base, base.resolve()]
    return any(_under(canonical, p) for p in prefixes)


def _warn_missing(name: str, path: Path) -> None:
    with _warned_lock:
        if name in _warned:
            return
        _warned.add(name)
    log.warning(
        "No secret found in %s. Using unauthenticated access. Make sure to set `%s` in your "
        "Baseten.co secrets and add `secrets:- %s: null` to your config.yaml.",
        path,
        name,
        name,
    )


def _read_secret_file(name: str, env: Mapping[str, str]) -> str | None:
    """The trimmed content of ``<secrets dir>/<name>``, or None when absent/empty/refused."""
    base = secrets_dir(env)
    if not _valid_name(name):
        log.warning("Secret name %r is not a plain file name; not reading it from %s", name, base)
        return None
    path = base / name
    try:
        canonical = _canonical(path)
    except (OSError, RuntimeError) as exc:  # symlink loop, permission denied
        log.warning("Cannot resolve secret path '%s': %s", path, exc)
        return None
    if not _allowed(canonical, base):
        log.warning("Secret path '%s' does not match any allowed prefix in whitelist", canonical)
        return None
    try:
        st = canonical.stat()
        if not stat.S_ISREG(st.st_mode):
            log.warning("Secret path '%s' is not a regular file; ignoring it", canonical)
            return None
        if st.st_size > _MAX_SECRET_BYTES:
            log.warning(
                "Secret file '%s' is %d bytes (limit %d); ignoring it",
                canonical,
                st.st_size,
                _MAX_SECRET_BYTES,
            )
            return None
        with canonical.open("rb") as f:
            data = f.read(_MAX_SECRET_BYTES + 1)
    except FileNotFoundError:
        _warn_missing(name, path)
        return None
    except OSError as exc:
        log.warning("Cannot read secret file '%s': %s", canonical, exc.strerror or exc)
        _warn_missing(name, path)
        return None
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        log.warning("Secret file '%s' is not valid UTF-8; ignoring it", canonical)
        return None
    if not value:
        _warn_missing(name, path)
        return None
    return value


def get_secret(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """Generic secret lookup (cloud credentials): ``TRUSS_SECRET_<name>``, then the file.

    Returns the trimmed, non-empty value, or None. Missing credentials are the caller's call
    (fatal for cloud providers).
    """
    env = os.environ if env is None else env
    key = ENV_PREFIX + name
    value = _env_value(env, key)
    if value is not None:
        log.info("Secret '%s' resolved from environment variable '%s'", name, key)
        return value
    return _read_secret_file(name, env)


def get_hf_token(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """HuggingFace token lookup: the file, then ``HF_TOKEN``, then ``HUGGING_FACE_HUB_TOKEN``.

    The env fallback applies to any ``name`` (upstream code, not its README). Returns None for
    anonymous access.
    """
    env = os.environ if env is None else env
    value = _read_secret_file(name, env)
    if value is not None:
        return value
    for key in HF_TOKEN_ENVS:
        value = _env_value(env, key)
        if value is not None:
            log.debug("HF token for secret '%s' taken from environment variable '%s'", name, key)
            return value
    return None
