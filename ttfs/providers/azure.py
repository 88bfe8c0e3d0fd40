"""Azure Blob Storage: azure-storage-blob signs SAS URLs, httpx fetches.

Control plane: the pointer's secret gives the account key (or a SAS token, or a connection
string) and the blob endpoint (``https://<account>.blob.core.windows.net``, or Azurite's
``http://127.0.0.1:10000/devstoreaccount1`` with ``use_emulator``). ``generate_blob_sas`` is a
local HMAC: a read-only SAS per blob, valid one hour. Unlike upstream, the container is part of
every request (upstream never passed it, so its Azure path could not work).

Data plane: ranged GETs of the SAS URL (absolute ranges only: Azurite mishandles suffix
ranges), with ``If-Match`` on the manifest's etag. An Azure etag is not a content hash, so the
bytes cannot be checked against the manifest; ``If-Match`` and the size check at least pin the
exact blob version that was listed.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Hashable, Mapping
from typing import Any
from urllib.parse import quote

import httpx

from ..config import Settings
from ..errors import ProviderError, TtfsError
from ..manifest import AzureResolution, Pointer
from ._cloud import CloudProvider, Target, deadline_in
from ._sdk import sdk
from .credentials import AzureCredentials, azure_credentials

log = logging.getLogger(__name__)

SAS_SECONDS = 3600
_ETAG_HASH = re.compile(r'^[_"]?(0x[0-9A-Fa-f]+)[_"]?$')


def make_container_client(creds: AzureCredentials, container: str) -> Any:
    """An azure-storage-blob ContainerClient scoped to ``container`` (for listing).

    Raises:
        ConfigError: azure-storage-blob is not installed.
        ProviderError: the client cannot be built (``Failed to create Azure client: ...``).
    """
    blob = sdk("azure.storage.blob")
    credential: Any
    if creds.account_key is not None:
        credential = {"account_name": creds.account, "account_key": creds.account_key}
    else:
        credential = creds.sas_token
    try:
        return blob.ContainerClient(
            account_url=creds.endpoint, container_name=container, credential=credential
        )
    except Exception as e:
        raise ProviderError(f"Failed to create Azure client: {type(e).__name__}: {e}") from None


def blob_url(creds: AzureCredentials, container: str, blob_name: str) -> str:
    return f"{creds.endpoint}/{quote(container, safe='')}/{quote(blob_name, safe='/')}"


def sas_for(creds: AzureCredentials, container: str, blob_name: str) -> str:
    """A read-only SAS query string for one blob (the caller's own token if it has no key)."""
    if creds.account_key is None:
        assert creds.sas_token is not None
        return creds.sas_token
    blob = sdk("azure.storage.blob")
    now = dt.datetime.now(dt.timezone.utc)
    token: str = blob.generate_blob_sas(
        account_name=creds.account,
        container_name=container,
        blob_name=blob_name,
        account_key=creds.account_key,
        permission=blob.BlobSasPermissions(read=True),
        start=now - dt.timedelta(minutes=5),  # tolerate clock skew
        expiry=now + dt.timedelta(seconds=SAS_SECONDS),
    )
    return token


def azure_if_match(hash_: str) -> str | None:
    """``"0x..."`` for a normalised Azure etag hash, None for a random fallback."""
    m = _ETAG_HASH.match(hash_)
    return f'"{m.group(1)}"' if m else None


class AzureProvider(CloudProvider):
    """Range reads of ``azure`` pointers through SAS URLs."""

    name = "azure"

    def __init__(
        self,
        settings: Settings,
        client: httpx.AsyncClient | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(settings, client, env)
        self._creds: dict[tuple[str, str], AzureCredentials] = {}  # (secret, account) -> creds

    def _object_key(self, pointer: Pointer) -> Hashable:
        r = _resolution(pointer)
        return (pointer.runtime_secret_name, r.account_name, r.container_name, r.blob_name)

    def _forget(self, pointer: Pointer) -> None:
        self._creds.pop((pointer.runtime_secret_name, _resolution(pointer).account_name), None)

    def if_match(self, pointer: Pointer) -> str | None:
        return azure_if_match(pointer.hash)

    def unverifiable(self, pointer: Pointer) -> str | None:
        return "an Azure etag is not a content hash"

    async def _sign(self, pointer: Pointer) -> Target:
        r = _resolution(pointer)
        key = (pointer.runtime_secret_name, r.account_name)
        creds = self._creds.get(key)
        if creds is None:
            creds = self._creds[key] = azure_credentials(key[0], r.account_name, self._env)
        try:
            sas = sas_for(creds, r.container_name, r.blob_name)
        except TtfsError:
            raise
        except Exception as e:
            raise ProviderError(
                f"{pointer.file_name}: cannot sign azure://{r.account_name}/{r.container_name}/"
                f"{r.blob_name}: {type(e).__name__}"
            ) from None
        url = f"{blob_url(creds, r.container_name, r.blob_name)}?{sas}"
        return Target(url, {}, deadline_in(SAS_SECONDS))


def _resolution(pointer: Pointer) -> AzureResolution:
    if not isinstance(pointer.resolution, AzureResolution):
        raise ProviderError(f"{pointer.file_name}: not an azure pointer")
    return pointer.resolution
