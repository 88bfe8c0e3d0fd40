"""Secret JSON formats of the cloud providers (spec §3.10 plus our endpoint additions)."""

from __future__ import annotations

import json

import pytest

from ttfs.errors import CredentialError
from ttfs.providers.azure import azure_if_match
from ttfs.providers.credentials import (
    AZURITE_KEY,
    aws_credentials,
    gcs_credentials,
    parse_aws,
    parse_azure,
    parse_gcs,
    scrub,
)
from ttfs.providers.s3 import s3_if_match

AWS = {"access_key_id": "AKIA1234", "secret_access_key": "very-secret", "region": "eu-west-1"}


def test_aws_formats_and_endpoints() -> None:
    creds = parse_aws(json.dumps(AWS), env={})
    assert (creds.region, creds.endpoint_url, creds.session_token) == ("eu-west-1", None, None)
    assert "very-secret" not in repr(creds) and "AKIA1234" not in repr(creds)
    with_token = parse_aws(json.dumps({**AWS, "session_token": "tok"}), env={})
    assert with_token.session_token == "tok"
    assert parse_aws(
        json.dumps(AWS), env={"AWS_ENDPOINT_URL": "http://s3.local:9000/"}
    ).endpoint_url == ("http://s3.local:9000")
    env = {"AWS_ENDPOINT_URL": "http://a", "AWS_ENDPOINT_URL_S3": "http://b"}
    assert parse_aws(json.dumps(AWS), env=env).endpoint_url == "http://b"
    secret = json.dumps({**AWS, "endpoint_url": "http://c"})
    assert parse_aws(secret, env=env).endpoint_url == "http://c"  # the secret wins
    for bad in (
        "not json",
        "[]",
        json.dumps({"access_key_id": "x"}),
        json.dumps({**AWS, "region": 3}),
    ):
        with pytest.raises(
            CredentialError,
            match=(
                r"^Failed to parse AWS credentials from JSON\. The json needs to be in the "
                r'format: \{"access_key_id"'
            ),
        ):
            parse_aws(bad, env={})


def test_secret_lookup_order(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    from pathlib import Path

    secrets_dir = Path(os.environ["TTFS_SECRETS_DIR"])
    (secrets_dir / "aws").write_text(json.dumps({**AWS, "region": "from-file"}))
    assert aws_credentials("aws").region == "from-file"
    monkeypatch.setenv("TRUSS_SECRET_aws", json.dumps({**AWS, "region": "from-env"}))
    assert aws_credentials("aws").region == "from-env"
    with pytest.raises(CredentialError, match=r"^AWS credential 'nope' not found"):
        aws_credentials("nope")


def test_gcs_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    key = {"client_email": "a@b", "private_key": "-----BEGIN PRIVATE KEY-----\nabc\n"}
    assert parse_gcs(json.dumps(key))["client_email"] == "a@b"
    with pytest.raises(CredentialError, match=r"^Failed to parse GCS credentials"):
        parse_gcs(json.dumps({"client_email": "a@b"}))
    with pytest.raises(CredentialError, match=r"^Invalid GCS URI: GCS credential 'g' not found"):
        gcs_credentials("g", env={})
    anon = gcs_credentials("g", env={"STORAGE_EMULATOR_HOST": "localhost:4443"})
    assert anon.anonymous and anon.endpoint == "http://localhost:4443"
    monkeypatch.setenv("TRUSS_SECRET_g", json.dumps(key))
    creds = gcs_credentials("g")
    assert creds.endpoint == "https://storage.googleapis.com" and not creds.anonymous
    assert "PRIVATE" not in repr(creds)


def test_azure_formats() -> None:
    plain = parse_azure(json.dumps({"account_key": "k3y=="}), "acct", env={})
    assert (plain.endpoint, plain.account_key) == ("https://acct.blob.core.windows.net", "k3y==")
    assert "k3y" not in repr(plain)
    emu = parse_azure(
        json.dumps({"account_key": "k", "use_emulator": True}), "devstoreaccount1", env={}
    )
    assert emu.endpoint == "http://127.0.0.1:10000/devstoreaccount1"
    emu = parse_azure(
        json.dumps({"use_emulator": True}),
        "devstoreaccount1",
        env={"AZURITE_BLOB_STORAGE_URL": "http://127.0.0.1:5/"},
    )
    assert (emu.endpoint, emu.account_key) == ("http://127.0.0.1:5/devstoreaccount1", AZURITE_KEY)
    conn = (
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=abc==;"
        "EndpointSuffix=core.chinacloudapi.cn"
    )
    cs = parse_azure(json.dumps({"connection_string": conn}), "acct", env={})
    assert (cs.endpoint, cs.account_key) == ("https://acct.blob.core.chinacloudapi.cn", "abc==")
    assert parse_azure(conn, "acct", env={}).account_key == "abc=="  # a bare connection string
    dev = parse_azure("UseDevelopmentStorage=true;", "devstoreaccount1", env={})
    assert dev.endpoint == "http://127.0.0.1:10000/devstoreaccount1"
    sas = parse_azure(json.dumps({"sas_token": "?sv=1&sig=x"}), "acct", env={})
    assert (sas.sas_token, sas.account_key) == ("sv=1&sig=x", None)
    with pytest.raises(CredentialError, match="is for account 'acct' but the source names 'other'"):
        parse_azure(conn, "other", env={})
    for bad in ("nope", json.dumps({"use_emulator": False}), json.dumps([1])):
        with pytest.raises(CredentialError, match=r"^Failed to parse Azure credentials from JSON"):
            parse_azure(bad, "acct", env={})


def test_if_match_from_hashes() -> None:
    assert s3_if_match("_0123456789abcdef0123456789abcdef_") == '"0123456789abcdef0123456789abcdef"'
    assert s3_if_match("_0123456789abcdef0123456789abcdef-13_") == (
        '"0123456789abcdef0123456789abcdef-13"'
    )
    assert s3_if_match("s3-1234567") is None
    assert azure_if_match("0x8DD1234ABCD") == '"0x8DD1234ABCD"'
    assert azure_if_match("_0x8DD1234ABCD_") == '"0x8DD1234ABCD"'
    assert azure_if_match("azure-99") is None


def test_scrub() -> None:
    assert scrub("url?sig=abcdef&x=1 key=abcdef", ("abcdef", None, "")) == "url?sig=***&x=1 key=***"
