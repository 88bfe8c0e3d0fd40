"""Cloud credentials from runtime secrets: the JSON formats of spec §3.10, and our additions.

A pointer (or a model repo) names a secret; :func:`~ttfs.secrets.get_secret` finds it in env
``TRUSS_SECRET_<name>`` or the file ``/secrets/<name>``. This module parses what it holds:

* **S3**: ``{"access_key_id", "secret_access_key", "region"[, "session_token"]}`` (upstream),
  plus ``"endpoint_url"`` for S3-compatible stores and emulators; without it the standard
  ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables are honoured.
* **GCS**: a service-account key file (``client_email``, ``private_key``, ``token_uri``...).
  With ``STORAGE_EMULATOR_HOST`` set and no secret, access is anonymous (what emulators expect).
* **Azure**: ``{"account_key"[, "use_emulator"]}`` (upstream), plus ``"connection_string"``
  (Azurite or any account), ``"endpoint"`` (a blob service URL) and ``"sas_token"``.
  ``use_emulator`` targets Azurite at ``AZURITE_BLOB_STORAGE_URL`` (object_store's variable) or
  ``http://127.0.0.1:10000``, with the well-known development key when none is given.

Missing and malformed secrets raise :class:`~ttfs.errors.CredentialError` with upstream's texts.
No value read here is ever logged, put in a ``repr`` or in an exception message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CredentialError
from ..secrets import get_secret

AWS_FORMAT = (
    "Failed to parse AWS credentials from JSON. The json needs to be in the format: "
    '{"access_key_id": "...", "secret_access_key": "...", "region": "..."}'
)
AZURE_FORMAT = (
    "Failed to parse Azure credentials from JSON. The json needs to be in the format: "
    '{"account_key": "...", "use_emulator": false} (or {"connection_string": "..."} or '
    '{"sas_token": "..."})'
)
GCS_FORMAT = (
    "Failed to parse GCS credentials from JSON. The secret must be a service-account key file "
    '(JSON with "client_email" and "private_key")'
)

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
"""Azurite's published development key (not a secret: it is in Microsoft's docs)."""
AZURITE_URL = "http://127.0.0.1:10000"
GCS_PUBLIC = "https://storage.googleapis.com"


def scrub(text: str, secrets: tuple[str | None, ...]) -> str:
    """``text`` with every secret value replaced by ``***`` (for third-party error texts)."""
    for value in secrets:
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _opt_str(doc: Mapping[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


# -- S3 ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AwsCredentials:
    """Keys for S3 (values hidden from ``repr``)."""

    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    region: str
    session_token: str | None = field(default=None, repr=False)
    endpoint_url: str | None = None

    def secrets(self) -> tuple[str | None, ...]:
        return (self.secret_access_key, self.session_token, self.access_key_id)


def parse_aws(text: str, env: Mapping[str, str] | None = None) -> AwsCredentials:
    """Parse the AWS secret JSON.

    Raises:
        CredentialError: not JSON, or a required field is missing (upstream's text).
    """
    doc = _json_object(text)
    if doc is None:
        raise CredentialError(AWS_FORMAT)
    values = {k: doc.get(k) for k in ("access_key_id", "secret_access_key", "region")}
    if not all(isinstance(v, str) and v for v in values.values()):
        raise CredentialError(AWS_FORMAT)
    env = _env(env)
    endpoint = (
        _opt_str(doc, "endpoint_url")
        or _opt_str(doc, "endpoint")
        or (env.get("AWS_ENDPOINT_URL_S3") or "").strip()
        or (env.get("AWS_ENDPOINT_URL") or "").strip()
        or None
    )
    return AwsCredentials(
        access_key_id=str(values["access_key_id"]),
        secret_access_key=str(values["secret_access_key"]),
        region=str(values["region"]),
        session_token=_opt_str(doc, "session_token"),
        endpoint_url=endpoint.rstrip("/") if endpoint else None,
    )


def aws_credentials(name: str, env: Mapping[str, str] | None = None) -> AwsCredentials:
    """The S3 credentials of secret ``name``.

    Raises:
        CredentialError: the secret is missing or malformed.
    """
    text = get_secret(name, env)
    if text is None:
        raise CredentialError(f"AWS credential '{name}' not found in environment variable or file")
    return parse_aws(text, env)


# -- GCS --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GcsCredentials:
    """A service-account key (hidden from ``repr``), or None for anonymous access."""

    service_account: dict[str, Any] | None = field(repr=False)
    endpoint: str = GCS_PUBLIC

    @property
    def anonymous(self) -> bool:
        return self.service_account is None

    def secrets(self) -> tuple[str | None, ...]:
        if self.service_account is None:
            return ()
        return tuple(
            str(self.service_account.get(k) or "") for k in ("private_key", "private_key_id")
        )


def gcs_endpoint(env: Mapping[str, str] | None = None) -> str | None:
    """The emulator base URL from ``STORAGE_EMULATOR_HOST`` (``http://`` added), or None."""
    host = (_env(env).get("STORAGE_EMULATOR_HOST") or "").strip()
    if not host:
        return None
    if "://" not in host:
        host = "http://" + host
    return host.rstrip("/")


def parse_gcs(text: str) -> dict[str, Any]:
    """Parse a service-account key file.

    Raises:
        CredentialError: not JSON or not a service-account key.
    """
    doc = _json_object(text)
    if doc is None or not all(_opt_str(doc, k) for k in ("client_email", "private_key")):
        raise CredentialError(GCS_FORMAT)
    return doc


def gcs_credentials(name: str, env: Mapping[str, str] | None = None) -> GcsCredentials:
    """The GCS credentials of secret ``name``; anonymous only against an emulator.

    Raises:
        CredentialError: the secret is missing (and no emulator is configured) or malformed.
    """
    emulator = gcs_endpoint(env)
    text = get_secret(name, env)
    if text is None:
        if emulator is not None:
            return GcsCredentials(None, emulator)
        raise CredentialError(
            f"Invalid GCS URI: GCS credential '{name}' not found in environment variable or file"
        )
    return GcsCredentials(parse_gcs(text), emulator or GCS_PUBLIC)


# -- Azure ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AzureCredentials:
    """How to reach one storage account: its blob endpoint and a key or a SAS token."""

    account: str
    endpoint: str
    account_key: str | None = field(default=None, repr=False)
    sas_token: str | None = field(default=None, repr=False)

    def secrets(self) -> tuple[str | None, ...]:
        return (self.account_key, self.sas_token)


def _connection_string(text: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    for item in text.split(";"):
        key, sep, value = item.strip().partition("=")
        if sep:
            parts[key.strip().lower()] = value.strip()
    return parts


def _from_connection_string(text: str, account: str, env: Mapping[str, str]) -> AzureCredentials:
    parts = _connection_string(text)
    if parts.get("usedevelopmentstorage", "").lower() == "true":
        base = (env.get("AZURITE_BLOB_STORAGE_URL") or AZURITE_URL).rstrip("/")
        return AzureCredentials(AZURITE_ACCOUNT, f"{base}/{AZURITE_ACCOUNT}", AZURITE_KEY)
    named = parts.get("accountname")
    if named and named != account:
        raise CredentialError(
            f"Azure connection string is for account '{named}' but the source names '{account}'"
        )
    endpoint = parts.get("blobendpoint")
    if not endpoint:
        protocol = parts.get("defaultendpointsprotocol", "https")
        suffix = parts.get("endpointsuffix", "core.windows.net")
        endpoint = f"{protocol}://{account}.blob.{suffix}"
    key = parts.get("accountkey") or None
    sas = parts.get("sharedaccesssignature") or None
    if key is None and sas is None:
        raise CredentialError(AZURE_FORMAT)
    return AzureCredentials(account, endpoint.rstrip("/"), key, sas.lstrip("?") if sas else None)


def parse_azure(text: str, account: str, env: Mapping[str, str] | None = None) -> AzureCredentials:
    """Parse the Azure secret JSON for ``account`` (a bare connection string is accepted too).

    Raises:
        CredentialError: not JSON (nor a connection string), or no key/SAS/connection string.
    """
    env = _env(env)
    doc = _json_object(text)
    if doc is None:
        if "=" in text and ";" in text:
            return _from_connection_string(text, account, env)
        raise CredentialError(AZURE_FORMAT)
    conn = _opt_str(doc, "connection_string")
    if conn is not None:
        return _from_connection_string(conn, account, env)
    key = _opt_str(doc, "account_key")
    sas = _opt_str(doc, "sas_token")
    emulator = doc.get("use_emulator") is True or str(doc.get("use_emulator")).lower() == "true"
    endpoint = _opt_str(doc, "endpoint")
    if emulator:
        base = (env.get("AZURITE_BLOB_STORAGE_URL") or AZURITE_URL).rstrip("/")
        endpoint = endpoint or f"{base}/{account}"
        if key is None and sas is None and account == AZURITE_ACCOUNT:
            key = AZURITE_KEY
    if key is None and sas is None:
        raise CredentialError(AZURE_FORMAT)
    endpoint = endpoint or f"https://{account}.blob.core.windows.net"
    return AzureCredentials(account, endpoint.rstrip("/"), key, sas.lstrip("?") if sas else None)


def azure_credentials(
    name: str, account: str, env: Mapping[str, str] | None = None
) -> AzureCredentials:
    """The Azure credentials of secret ``name`` for storage account ``account``.

    Raises:
        CredentialError: the secret is missing or malformed.
    """
    text = get_secret(name, env)
    if text is None:
        raise CredentialError(
            f"Azure credential '{name}' not found in environment variable or file"
        )
    return parse_azure(text, account, env)
