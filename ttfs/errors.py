"""The one exception tree of ttfs.

Every error ttfs raises on purpose is a :class:`TtfsError`. Each class carries the errno the FUSE
layer replies with, the exit code the CLI uses and the log level it deserves, so the mapping from
"what went wrong" to "what the user sees" lives here and nowhere else::

    TtfsError                          errno    exit  where raised
     ├─ UserError                      EINVAL   2     bad input the user can fix
     │   ├─ ManifestError              EINVAL   2     manifest parsing / validation
     │   ├─ ConfigError                EINVAL   2     settings, flags, env vars
     │   └─ CredentialError            EACCES   2     a secret is missing or malformed
     ├─ ProviderError                  EIO      1     providers/* (origin trouble)
     │   ├─ ObjectNotFound             ENOENT   1     404 at the origin
     │   ├─ AccessDenied               EACCES   1     401/403 that re-resolving did not fix
     │   ├─ TransientError             EAGAIN   1     retryable: timeouts, resets, 408/429/5xx
     │   └─ StaleManifest              ESTALE   1     origin size differs from the manifest
     ├─ IntegrityError                 EIO      1     hash/size mismatch after download
     ├─ CacheError                     EIO      1     block store trouble
     │   ├─ CacheFull                  ENOSPC   1     disk full / cache cap cannot be met
     │   └─ CacheBusy                  EBUSY    1     another process owns the cache directory
     ├─ DownloadError                  EIO      1     a file could not be fetched (wraps the cause)
     └─ MountError                     EIO      1     mount / unmount / control channel

Every error is also an ``Exception``, which is what ``truss_transfer`` callers catch.
Messages never contain secrets: providers strip query strings and tokens before raising.
"""

from __future__ import annotations

import errno as _errno
import logging
from typing import ClassVar


class TtfsError(Exception):
    """Base of every error ttfs raises on purpose."""

    errno: ClassVar[int] = _errno.EIO
    exit_code: ClassVar[int] = 1
    log_level: ClassVar[int] = logging.ERROR


class UserError(TtfsError):
    """Bad input the user can fix; the CLI prints one line and exits 2."""

    errno = _errno.EINVAL
    exit_code = 2


class ManifestError(UserError):
    """A manifest could not be read, parsed or validated."""


class ConfigError(UserError):
    """A flag, an environment variable or a setting is invalid."""


class CredentialError(UserError):
    """A secret that a pointer needs is missing or malformed."""

    errno = _errno.EACCES


class ProviderError(TtfsError):
    """The origin did not give us the bytes."""


class ObjectNotFound(ProviderError):
    errno = _errno.ENOENT


class AccessDenied(ProviderError):
    errno = _errno.EACCES


class Redirected(ProviderError):
    """A URL sent straight to a worker (its origin had served URLs without redirects) answered
    with a redirect: it must be resolved in process, where redirects are followed."""


class TransientError(ProviderError):
    """Worth retrying: a timeout, a reset connection, 408/429/5xx.

    ``retry_after`` carries the server's ``Retry-After`` in seconds when it sent one; ``kind``
    names the failure for the metrics' ``ttfs_errors_total{kind=...}`` (``http_503``,
    ``timeout``, ``network``, ``short_body``, ``bad_range``, ...).
    """

    errno = _errno.EAGAIN
    log_level = logging.WARNING

    def __init__(
        self, message: str, *, retry_after: float | None = None, kind: str = "transient"
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.kind = kind


class StaleManifest(ProviderError):
    """The origin's object is not the one the manifest describes (size differs)."""

    errno = _errno.ESTALE


class IntegrityError(TtfsError):
    """Downloaded bytes do not match the manifest's hash or size."""


class CacheError(TtfsError):
    """The local block store failed."""


class CacheFull(CacheError):
    errno = _errno.ENOSPC


class CacheBusy(CacheError):
    """Another process owns the cache directory and cannot serve this one (ttfs.owner)."""

    errno = _errno.EBUSY


class DownloadError(TtfsError):
    """A file could not be downloaded; the message names the file and the cause."""

    def __init__(self, file_name: str, cause: BaseException) -> None:
        text = str(cause)
        # Most causes already name the file; say it once.
        super().__init__(text if file_name in text else f"{file_name}: {text}")
        self.file_name = file_name
        self.cause = cause
        if isinstance(cause, TtfsError):
            self.errno = cause.errno  # type: ignore[misc]


class MountError(TtfsError):
    """Mounting, unmounting or talking to a live mount failed."""
