"""Parsing of the cloud source URIs a model repo names (spec §2.6-§2.8, §7.1 oracles).

The accepted forms and the error texts are upstream's, so a config that fails there fails here
with the same words:

* GCS: ``gs://bucket`` or ``gs://bucket/prefix``; the prefix may be empty.
* S3: ``s3://bucket/key-prefix``; the key part is mandatory (``s3://bucket`` is an error).
* Azure: ``azure://account/container/blob-prefix`` or
  ``https://account.blob.core.windows.net/container/blob-prefix``; all three parts non-empty.

Errors are :class:`~ttfs.errors.ManifestError` (bad input the user fixes in the config).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import ManifestError

AZURE_HOST_SUFFIX = ".blob.core.windows.net"


@dataclass(frozen=True, slots=True)
class GcsUri:
    bucket: str
    prefix: str


@dataclass(frozen=True, slots=True)
class S3Uri:
    bucket: str
    prefix: str


@dataclass(frozen=True, slots=True)
class AzureUri:
    account: str
    container: str
    prefix: str


def parse_gcs_uri(uri: str) -> GcsUri:
    """``gs://bucket[/prefix]`` → bucket and (possibly empty) prefix.

    Raises:
        ManifestError: not ``gs://`` or no bucket.
    """
    if not uri.startswith("gs://"):
        raise ManifestError(f"Invalid GCS URI: URI must start with gs://: {uri}")
    bucket, _, prefix = uri[len("gs://") :].partition("/")
    if not bucket:
        raise ManifestError(f"Invalid GCS URI: missing bucket name in {uri}")
    return GcsUri(bucket, prefix)


def parse_s3_uri(uri: str) -> S3Uri:
    """``s3://bucket/key-prefix`` → bucket and non-empty key prefix.

    Raises:
        ManifestError: not ``s3://``, no key part, or an empty bucket or key.
    """
    if not uri.startswith("s3://"):
        raise ManifestError(f"Invalid S3 URI format: {uri}")
    rest = uri[len("s3://") :]
    if "/" not in rest:
        raise ManifestError(f"Invalid S3 URI format: missing key part in {uri}")
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise ManifestError(f"Invalid S3 URI format: empty bucket or key in {uri}")
    return S3Uri(bucket, key)


def parse_azure_uri(uri: str) -> AzureUri:
    """``azure://account/container/prefix`` or the ``https://*.blob.core.windows.net`` form.

    Raises:
        ManifestError: another scheme or host, or an empty account, container or blob part.
    """
    if uri.startswith("azure://"):
        parts = uri[len("azure://") :].split("/", 2)
        if len(parts) < 3:
            raise ManifestError(
                f"Invalid Azure URI format: expected azure://account/container/blob in {uri}"
            )
        account, container, prefix = parts
    elif uri.startswith("https://"):
        split = urlsplit(uri)
        host = (split.hostname or "").lower()
        if not host.endswith(AZURE_HOST_SUFFIX):
            raise ManifestError(
                f"Invalid Azure URI format: host must be <account>{AZURE_HOST_SUFFIX} in {uri}"
            )
        account = host[: -len(AZURE_HOST_SUFFIX)]
        path = split.path.lstrip("/").split("/", 1)
        if len(path) < 2:
            raise ManifestError(
                f"Invalid Azure URI format: expected https://<account>{AZURE_HOST_SUFFIX}/"
                f"container/blob in {uri}"
            )
        container, prefix = path
    else:
        raise ManifestError(f"Invalid Azure URI format: {uri}")
    if not account or not container or not prefix:
        raise ManifestError(f"Invalid Azure URI format: empty account, container or blob in {uri}")
    return AzureUri(account, container, prefix)
