"""Google Cloud Storage: google-auth mints a token, httpx fetches media ranges.

Control plane: the service-account key of the pointer's secret becomes an OAuth2 access token
(read-only scope) through google-auth; the token is refreshed in a worker thread shortly before
it expires and shared by every object of that secret. ``STORAGE_EMULATOR_HOST`` points
everything at an emulator (fake-gcs-server), where a missing secret means anonymous access.

Data plane: ``GET {endpoint}/download/storage/v1/b/{bucket}/o/{object}?alt=media`` with a
``Range`` and ``Authorization: Bearer``, through the shared client. The token goes to that
endpoint only: the request follows no redirect. The manifest hash of a GCS object is its MD5,
which the block store checks.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Hashable, Mapping
from typing import Any
from urllib.parse import quote

import httpx
import trio

from ..config import Settings
from ..errors import AccessDenied, ProviderError, TransientError
from ..manifest import GcsResolution, Pointer
from ._cloud import CloudProvider, Target, deadline_in
from ._sdk import sdk
from .credentials import GcsCredentials, gcs_credentials

log = logging.getLogger(__name__)

READ_ONLY_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
ANONYMOUS_PROJECT = "ttfs-anonymous"


def service_account_credentials(info: dict[str, Any]) -> Any:
    """google-auth credentials for a service-account key (no request yet).

    Raises:
        ConfigError: google-auth is not installed.
        CredentialError-like ProviderError: the key cannot be loaded.
    """
    service_account = sdk("google.oauth2.service_account")
    try:
        return service_account.Credentials.from_service_account_info(info, scopes=[READ_ONLY_SCOPE])
    except (ValueError, KeyError) as e:
        raise ProviderError(
            f"Failed to create GCS client: the service-account key is invalid ({type(e).__name__})"
        ) from None


def make_gcs_client(creds: GcsCredentials) -> Any:
    """A google-cloud-storage client for listing (blocking: call it from a worker thread).

    Raises:
        ConfigError: google-cloud-storage is not installed.
        ProviderError: the client cannot be built.
    """
    storage = sdk("google.cloud.storage")
    try:
        if creds.service_account is None:
            anonymous = sdk("google.auth.credentials").AnonymousCredentials()
            credentials, project = anonymous, ANONYMOUS_PROJECT
        else:
            credentials = service_account_credentials(creds.service_account)
            project = creds.service_account.get("project_id") or ANONYMOUS_PROJECT
        return storage.Client(
            project=project,
            credentials=credentials,
            client_options={"api_endpoint": creds.endpoint},
        )
    except ProviderError:
        raise
    except Exception as e:
        raise ProviderError(f"Failed to create GCS client: {type(e).__name__}: {e}") from None


def refresh(credentials: Any) -> None:
    """Fetch a new access token (blocking).

    Raises:
        AccessDenied: the token endpoint refused the key.
        TransientError: the token endpoint could not be reached.
    """
    exceptions = sdk("google.auth.exceptions")
    transport = sdk("google.auth.transport.requests")
    try:
        credentials.refresh(transport.Request())
    except exceptions.RefreshError as e:
        raise AccessDenied(f"GCS token refresh refused: {e}") from None
    except exceptions.TransportError as e:
        raise TransientError(f"GCS token endpoint unreachable: {type(e).__name__}") from None


def media_url(endpoint: str, bucket: str, path: str) -> str:
    """The JSON API media-download URL of one object."""
    return (
        f"{endpoint}/download/storage/v1/b/{quote(bucket, safe='')}/o/"
        f"{quote(path, safe='')}?alt=media"
    )


class GcsProvider(CloudProvider):
    """Range reads of ``gcs`` pointers as media downloads with a bearer token."""

    name = "gcs"

    def __init__(
        self,
        settings: Settings,
        client: httpx.AsyncClient | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(settings, client, env)
        self._creds: dict[str, tuple[GcsCredentials, Any]] = {}  # secret -> (config, google)

    def _object_key(self, pointer: Pointer) -> Hashable:
        r = _resolution(pointer)
        return (pointer.runtime_secret_name, r.bucket_name, r.path)

    def _forget(self, pointer: Pointer) -> None:
        self._creds.pop(pointer.runtime_secret_name, None)

    def unverifiable(self, pointer: Pointer) -> str | None:
        if pointer.hashtype.lower() == "md5" and re.fullmatch(r"[0-9a-fA-F]{32}", pointer.hash):
            return None
        return f"hashtype {pointer.hashtype!r} with hash that is not an MD5 (random fallback?)"

    async def _sign(self, pointer: Pointer) -> Target:
        r = _resolution(pointer)
        name = pointer.runtime_secret_name
        entry = self._creds.get(name)
        if entry is None:
            config = gcs_credentials(name, self._env)
            google = (
                None
                if config.service_account is None
                else service_account_credentials(config.service_account)
            )
            entry = self._creds[name] = (config, google)
        config, google = entry
        url = media_url(config.endpoint, r.bucket_name, r.path)
        if google is None:
            return Target(url)
        if not google.token or _seconds_left(google.expiry) < 2 * 300:
            await trio.to_thread.run_sync(refresh, google)
        return Target(
            url,
            {"authorization": f"Bearer {google.token}"},
            deadline_in(_seconds_left(google.expiry)),
        )


def _seconds_left(expiry: dt.datetime | None) -> float:
    """Seconds until a google-auth expiry (a naive UTC datetime); inf when unknown."""
    if expiry is None:
        return float("inf")
    if expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=dt.timezone.utc)
    return (expiry - dt.datetime.now(dt.timezone.utc)).total_seconds()


def _resolution(pointer: Pointer) -> GcsResolution:
    if not isinstance(pointer.resolution, GcsResolution):
        raise ProviderError(f"{pointer.file_name}: not a gcs pointer")
    return pointer.resolution
