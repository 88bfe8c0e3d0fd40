"""S3 and S3-compatible stores: boto3 signs, httpx fetches.

Control plane: a boto3 client per secret, built from the credential JSON (spec §3.10, plus an
endpoint override for R2/MinIO/SeaweedFS/moto via ``endpoint_url`` or ``AWS_ENDPOINT_URL``).
``generate_presigned_url`` is a local computation (no request), so each object costs one
signature per hour. Data plane: ranged GETs of the presigned URL through the shared client, with
``If-Match`` on the manifest's etag.

The region comes from the credential JSON (upstream), else the pointer's ``region``, else
``AWS_REGION``/``AWS_DEFAULT_REGION``. A custom endpoint uses path-style addressing (bucket in
the path), which every S3-compatible store accepts and which needs no wildcard DNS.

Verification: a single-part etag is the object's MD5 and the block store checks it; a multipart
etag (``<hex>-<parts>``) depends on the unknown part size and cannot be checked, which
``ttfs status`` says; ``If-Match`` still pins the object version.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Hashable, Mapping
from typing import Any

import httpx
import trio

from ..config import Settings
from ..errors import ProviderError
from ..manifest import Pointer, S3Resolution
from ._cloud import CloudProvider, Target, deadline_in
from ._sdk import sdk
from .credentials import AwsCredentials, aws_credentials

log = logging.getLogger(__name__)

PRESIGN_SECONDS = 3600
_ETAG_HASH = re.compile(r"^_([0-9a-fA-F]{32}(?:-\d+)?)_$")


def make_s3_client(creds: AwsCredentials, region: str | None = None) -> Any:
    """A boto3 S3 client for ``creds`` (blocking: call it from a worker thread).

    Raises:
        ConfigError: boto3 is not installed.
        ProviderError: the client cannot be built (``Failed to create S3 client: ...``).
    """
    boto3 = sdk("boto3")
    config_mod = sdk("botocore.config")
    try:
        session = boto3.session.Session(
            aws_access_key_id=creds.access_key_id,
            aws_secret_access_key=creds.secret_access_key,
            aws_session_token=creds.session_token,
            region_name=creds.region or region,
        )
        config = config_mod.Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if creds.endpoint_url else "auto"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        )
        return session.client("s3", endpoint_url=creds.endpoint_url, config=config)
    except Exception as e:  # botocore raises many unrelated types for bad configuration
        raise ProviderError(f"Failed to create S3 client: {type(e).__name__}: {e}") from None


def s3_if_match(hash_: str) -> str | None:
    """``"<etag>"`` for a normalised S3 etag hash (``_<hex>_``), None for a random fallback."""
    m = _ETAG_HASH.match(hash_)
    return f'"{m.group(1)}"' if m else None


class S3Provider(CloudProvider):
    """Range reads of ``s3`` pointers through presigned URLs."""

    name = "s3"

    def __init__(
        self,
        settings: Settings,
        client: httpx.AsyncClient | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(settings, client, env)
        self._boto: dict[str, Any] = {}  # secret name -> boto3 client

    def _object_key(self, pointer: Pointer) -> Hashable:
        r = _resolution(pointer)
        return (pointer.runtime_secret_name, r.bucket_name, r.key)

    def _forget(self, pointer: Pointer) -> None:
        self._boto.pop(pointer.runtime_secret_name, None)

    def if_match(self, pointer: Pointer) -> str | None:
        return s3_if_match(pointer.hash)

    def unverifiable(self, pointer: Pointer) -> str | None:
        m = _ETAG_HASH.match(pointer.hash)
        if m is None:
            return "not an S3 etag (random fallback hash)"
        if "-" in m.group(1):
            return "multipart S3 etag: it depends on the unknown part size"
        return None

    async def _sign(self, pointer: Pointer) -> Target:
        r = _resolution(pointer)
        client: Any = self._boto.get(pointer.runtime_secret_name)
        if client is None:
            creds = aws_credentials(pointer.runtime_secret_name, self._env)
            region = r.region or self._env.get("AWS_REGION") or self._env.get("AWS_DEFAULT_REGION")
            client = await trio.to_thread.run_sync(make_s3_client, creds, region)
            self._boto[pointer.runtime_secret_name] = client
        try:
            url = client.generate_presigned_url(
                "get_object",
                Params={"Bucket": r.bucket_name, "Key": r.key},
                ExpiresIn=PRESIGN_SECONDS,
            )
        except Exception as e:
            raise ProviderError(
                f"{pointer.file_name}: cannot presign s3://{r.bucket_name}/{r.key}: "
                f"{type(e).__name__}"
            ) from None
        return Target(str(url), {}, deadline_in(PRESIGN_SECONDS))


def _resolution(pointer: Pointer) -> S3Resolution:
    if not isinstance(pointer.resolution, S3Resolution):
        raise ProviderError(f"{pointer.file_name}: not an s3 pointer")
    return pointer.resolution
