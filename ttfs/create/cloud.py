"""Pointers for the objects under a cloud prefix: the common algorithm of spec §2.5.

For S3, GCS and Azure alike: parse the URI, build a client from the repo's secret, list every
object under the prefix *as a directory* (``gs://b/dir`` lists ``dir/...``, not ``dirX``), make
each key relative to the prefix, filter it with the allow/ignore globs, and emit one pointer per
kept object with the provider's hash, uid and resolution. Nothing listed and nothing kept are
errors (upstream #2354: a typo in a prefix must not ship a container without weights).

Differences from upstream, on purpose:

* A URI that names one object (``s3://b/dir/model.bin``) yields that object (relative name: its
  last component) instead of "No objects found" - the error text itself invites such URIs.
* Keys ending in ``/`` (console-made "folder" markers) are skipped: they are not files.
* Pointers are sorted by relative path (upstream keeps listing order; object stores list in
  lexicographic order anyway), so the same bucket always gives the same manifest.
* GCS hashes come from the object's MD5 (JSON API ``md5Hash``), which is what upstream's
  quoted-ETag rule extracts from the XML API; composite objects have none and get upstream's
  random ``gcs-<u64>`` fallback.

The SDK calls are blocking; they run in the calling thread (creation is a batch job).
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import AccessDenied, ManifestError, ObjectNotFound, ProviderError, TtfsError
from ..manifest import AzureResolution, GcsResolution, ModelRepo, Pointer, Resolution, S3Resolution
from ..providers.azure import make_container_client
from ..providers.credentials import aws_credentials, azure_credentials, gcs_credentials, scrub
from ..providers.gcs import make_gcs_client
from ..providers.s3 import make_s3_client
from .patterns import filter_paths, show_patterns
from .uris import parse_azure_uri, parse_gcs_uri, parse_s3_uri

log = logging.getLogger(__name__)

_HASH_UNSAFE = str.maketrans({c: "_" for c in '/:\\*?"<>| '})


@dataclass(frozen=True, slots=True)
class Listed:
    """One object as a listing reports it."""

    key: str
    size: int
    etag: str | None
    last_modified: dt.datetime | None
    md5: str | None = None  # hex, where the store reports a content MD5


def normalize_hash(value: str) -> str:
    """Upstream's ``normalize_hash``: each of ``/ : \\ * ? " < > |`` and space becomes ``_``."""
    return value.translate(_HASH_UNSAFE)


def rfc3339(value: dt.datetime | None) -> str | None:
    """UTC with ``Z``; fractional seconds only when non-zero (3 or 6 digits)."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        frac = f"{value.microsecond:06d}"
        text += "." + (frac[:3] if frac.endswith("000") else frac)
    return text + "Z"


def _random_hash(prefix: str) -> str:
    return f"{prefix}-{random.getrandbits(64)}"


def _relative(key: str, prefix: str) -> str:
    """Spec §2.5 step 4: strip ``prefix/``, else ``prefix``, else keep the key."""
    if not prefix:
        return key
    directory = prefix if prefix.endswith("/") else prefix + "/"
    if key.startswith(directory):
        return key[len(directory) :]
    if key.startswith(prefix):
        return key[len(prefix) :].lstrip("/")
    return key


def _select(objects: Iterable[Listed], prefix: str) -> list[tuple[str, Listed]]:
    """(relative path, object) for the prefix as a directory, else the one object it names."""
    directory = prefix if (not prefix or prefix.endswith("/")) else prefix + "/"
    under: list[tuple[str, Listed]] = []
    exact: list[tuple[str, Listed]] = []
    for obj in objects:
        if obj.key.endswith("/"):
            continue  # a "folder" marker, not a file
        if obj.key.startswith(directory):
            under.append((_relative(obj.key, prefix), obj))
        elif prefix and obj.key == prefix:
            exact.append((prefix.rsplit("/", 1)[-1], obj))
    return under or exact


def build_pointers(
    repo: ModelRepo,
    model_path: str,
    prefix: str,
    objects: Iterable[Listed],
    *,
    resolution: Callable[[Listed], Resolution],
    hashed: Callable[[Listed], tuple[str, str]],
    uid: Callable[[Listed, str], str],
) -> list[Pointer]:
    """Steps 3-7 of spec §2.5 for listed ``objects``.

    ``hashed`` gives ``(hashtype, raw hash)``; the raw hash is normalised for the pointer and
    handed to ``uid`` as is (GCS builds its uid from it).

    Raises:
        ManifestError: nothing listed, or nothing survives the filters.
    """
    selected = _select(objects, prefix)
    if not selected:
        raise ManifestError(
            f"No objects found for weights source '{repo.repo_id}' under prefix '{prefix}'. "
            "Check that the URI points to an existing object or folder."
        )
    names = filter_paths((rel for rel, _ in selected), repo.allow_patterns, repo.ignore_patterns)
    if not names:
        raise ManifestError(
            f"No objects matched weights filters for source '{repo.repo_id}'. Listed "
            f"{len(selected)} object(s), allow_patterns={show_patterns(repo.allow_patterns)}, "
            f"ignore_patterns={show_patterns(repo.ignore_patterns)}."
        )
    by_name = dict(selected)
    pointers = []
    for rel in sorted(set(names)):
        obj = by_name[rel]
        hashtype, raw = hashed(obj)
        pointers.append(
            Pointer(
                resolution=resolution(obj),
                uid=uid(obj, raw),
                file_name=f"{model_path}/{repo.volume_folder}/{rel}",
                hashtype=hashtype,
                hash=normalize_hash(raw),
                size=obj.size,
                last_modified_time=rfc3339(obj.last_modified),
                runtime_secret_name=repo.runtime_secret_name,
            )
        )
    return pointers


def list_prefix(lister: Callable[[str], Iterable[Listed]], prefix: str) -> list[Listed]:
    """List ``prefix`` as a directory; if that is empty, look for the one object it names."""
    directory = prefix if (not prefix or prefix.endswith("/")) else prefix + "/"
    objects = list(lister(directory))
    if not objects and directory != prefix:
        objects = [o for o in lister(prefix) if o.key == prefix]
    return objects


def _listed(
    lister: Callable[[str], Iterable[Listed]],
    prefix: str,
    repo: ModelRepo,
    secrets: tuple[str | None, ...],
) -> list[Listed]:
    """:func:`list_prefix` with every failure a ProviderError whose text holds no secret."""
    try:
        return list_prefix(lister, prefix)
    except TtfsError as e:
        clean = scrub(str(e), secrets)
        if clean == str(e):
            raise
        raise type(e)(clean) from None
    except Exception as e:  # an SDK's transport error (requests, urllib3, aiohttp...)
        raise ProviderError(
            scrub(f"Failed to list objects: {repo.repo_id}: {type(e).__name__}: {e}", secrets)
        ) from None


# -- S3 ---------------------------------------------------------------------------------------


def create_s3(
    repo: ModelRepo, model_path: str, env: Mapping[str, str] | None = None
) -> list[Pointer]:
    """Pointers for ``s3://bucket/prefix`` (spec §2.7)."""
    uri = parse_s3_uri(repo.repo_id)
    creds = aws_credentials(repo.runtime_secret_name, env)
    client = make_s3_client(creds)
    objects = _listed(
        lambda p: _list_s3(client, uri.bucket, p, repo.repo_id), uri.prefix, repo, creds.secrets()
    )
    return build_pointers(
        repo,
        model_path,
        uri.prefix,
        objects,
        resolution=lambda o: S3Resolution(bucket_name=uri.bucket, key=o.key, region=None),
        hashed=lambda o: ("etag", o.etag or _random_hash("s3")),
        uid=lambda o, _h: f"s3:{uri.bucket}:{o.key}",
    )


def _list_s3(client: Any, bucket: str, prefix: str, source: str) -> Iterable[Listed]:
    botocore = _botocore_exceptions()
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", ()):
                yield Listed(
                    key=item["Key"],
                    size=int(item["Size"]),
                    etag=item.get("ETag"),
                    last_modified=item.get("LastModified"),
                )
    except botocore.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        raise _listing_error(code, f"s3://{bucket}", source, str(e)) from None
    except botocore.BotoCoreError as e:
        raise ProviderError(f"Failed to list objects: {source}: {e}") from None


def _botocore_exceptions() -> Any:
    from ..providers._sdk import sdk

    return sdk("botocore.exceptions")


# -- GCS --------------------------------------------------------------------------------------


def _md5_hex(b64: str | None) -> str | None:
    if not b64:
        return None
    try:
        raw = base64.b64decode(b64, validate=True)
    except ValueError:
        return None
    return raw.hex() if len(raw) == 16 else None


def create_gcs(
    repo: ModelRepo, model_path: str, env: Mapping[str, str] | None = None
) -> list[Pointer]:
    """Pointers for ``gs://bucket[/prefix]`` (spec §2.6)."""
    uri = parse_gcs_uri(repo.repo_id)
    creds = gcs_credentials(repo.runtime_secret_name, env)
    client = make_gcs_client(creds)
    objects = _listed(
        lambda p: _list_gcs(client, uri.bucket, p, repo.repo_id), uri.prefix, repo, creds.secrets()
    )
    return build_pointers(
        repo,
        model_path,
        uri.prefix,
        objects,
        resolution=lambda o: GcsResolution(path=o.key, bucket_name=uri.bucket),
        hashed=lambda o: ("md5", o.md5 or _random_hash("gcs")),
        uid=lambda _o, h: f"gcs-{h}",
    )


def _list_gcs(client: Any, bucket: str, prefix: str, source: str) -> Iterable[Listed]:
    from ..providers._sdk import sdk

    exceptions = sdk("google.api_core.exceptions")
    auth_exceptions = sdk("google.auth.exceptions")
    try:
        for blob in client.list_blobs(bucket, prefix=prefix or None):
            yield Listed(
                key=blob.name,
                size=int(blob.size or 0),
                etag=blob.etag,
                last_modified=blob.updated,
                md5=_md5_hex(blob.md5_hash),
            )
    except exceptions.NotFound as e:
        raise _listing_error("NoSuchBucket", f"gs://{bucket}", source, e.message) from None
    except (exceptions.Forbidden, exceptions.Unauthorized) as e:
        raise _listing_error("AccessDenied", f"gs://{bucket}", source, e.message) from None
    except exceptions.GoogleAPIError as e:
        raise ProviderError(f"Failed to list objects: {source}: {e}") from None
    except auth_exceptions.GoogleAuthError as e:
        raise AccessDenied(
            f"Failed to list objects: {source}: GCS authentication failed: {e}"
        ) from None


# -- Azure ------------------------------------------------------------------------------------


def create_azure(
    repo: ModelRepo, model_path: str, env: Mapping[str, str] | None = None
) -> list[Pointer]:
    """Pointers for ``azure://account/container/prefix`` (spec §2.8), container-scoped."""
    uri = parse_azure_uri(repo.repo_id)
    creds = azure_credentials(repo.runtime_secret_name, uri.account, env)
    client = make_container_client(creds, uri.container)
    objects = list_prefix(lambda p: _list_azure(client, uri.container, p, repo.repo_id), uri.prefix)
    return build_pointers(
        repo,
        model_path,
        uri.prefix,
        objects,
        resolution=lambda o: AzureResolution(
            account_name=uri.account, container_name=uri.container, blob_name=o.key
        ),
        # Upstream's form: the quoted ETag, normalised ('"' -> '_'), e.g. _0x8DC0FFEE_.
        hashed=lambda o: ("etag", _quoted(o.etag) or _random_hash("azure")),
        uid=lambda o, _h: f"azure:{uri.account}:{uri.container}:{o.key}",
    )


def _quoted(etag: str | None) -> str:
    """An ETag with its quotes, whether or not the SDK kept them ("" for none)."""
    bare = (etag or "").strip('"')
    return f'"{bare}"' if bare else ""


def _list_azure(client: Any, container: str, prefix: str, source: str) -> Iterable[Listed]:
    from ..providers._sdk import sdk

    exceptions = sdk("azure.core.exceptions")
    try:
        for blob in client.list_blobs(name_starts_with=prefix or None):
            md5 = blob.content_settings.content_md5 if blob.content_settings else None
            yield Listed(
                key=blob.name,
                size=int(blob.size or 0),
                etag=blob.etag,
                last_modified=blob.last_modified,
                md5=bytes(md5).hex() if md5 else None,
            )
    except exceptions.ResourceNotFoundError as e:
        raise _listing_error(
            "NoSuchBucket", f"container '{container}'", source, e.message
        ) from None
    except exceptions.ClientAuthenticationError as e:
        raise _listing_error(
            "AccessDenied", f"container '{container}'", source, e.message
        ) from None
    except exceptions.AzureError as e:
        raise ProviderError(f"Failed to list objects: {source}: {type(e).__name__}: {e}") from None


# -- errors -----------------------------------------------------------------------------------


def _listing_error(code: str, where: str, source: str, detail: object) -> ProviderError:
    first = str(detail).strip().splitlines()[0] if str(detail).strip() else ""
    if code in ("NoSuchBucket", "NotFound", "ContainerNotFound"):
        return ObjectNotFound(f"Failed to list objects: {where} does not exist ({source})")
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
        return AccessDenied(
            f"Failed to list objects: access to {where} denied ({source}): {code}"
            + (f": {first}" if first and code not in first else "")
        )
    return ProviderError(f"Failed to list objects: {source}: {first or code}")
