"""URI parsing of cloud sources (spec §2.6-§2.8, the §7.1 oracles) and provider routing (§2.2)."""

from __future__ import annotations

import pytest

from ttfs.create import route
from ttfs.create.uris import AzureUri, GcsUri, S3Uri, parse_azure_uri, parse_gcs_uri, parse_s3_uri
from ttfs.errors import ManifestError
from ttfs.manifest import ModelRepo


def test_gcs_oracles() -> None:
    assert parse_gcs_uri("gs://my-bucket/path/to/file") == GcsUri("my-bucket", "path/to/file")
    assert parse_gcs_uri("gs://my-bucket") == GcsUri("my-bucket", "")
    assert parse_gcs_uri("gs://my-bucket/") == GcsUri("my-bucket", "")
    for bad in ("s3://my-bucket", "invalid"):
        with pytest.raises(ManifestError, match=r"^Invalid GCS URI: URI must start with gs://"):
            parse_gcs_uri(bad)
    with pytest.raises(ManifestError, match="Invalid GCS URI"):
        parse_gcs_uri("gs://")


def test_s3_oracles() -> None:
    assert parse_s3_uri("s3://my-bucket/path/to/file.txt") == S3Uri("my-bucket", "path/to/file.txt")
    assert parse_s3_uri("s3://bucket/single-file") == S3Uri("bucket", "single-file")
    with pytest.raises(ManifestError, match=r"^Invalid S3 URI format: invalid-uri$"):
        parse_s3_uri("invalid-uri")
    with pytest.raises(ManifestError, match="missing key part in s3://bucket-only"):
        parse_s3_uri("s3://bucket-only")
    with pytest.raises(ManifestError, match="empty bucket or key in s3:///empty-bucket"):
        parse_s3_uri("s3:///empty-bucket")
    with pytest.raises(ManifestError, match="empty bucket or key"):
        parse_s3_uri("s3://bucket/")


def test_azure_oracles() -> None:
    expected = AzureUri("myaccount", "mycontainer", "path/to/file.txt")
    assert parse_azure_uri("azure://myaccount/mycontainer/path/to/file.txt") == expected
    assert (
        parse_azure_uri("https://myaccount.blob.core.windows.net/mycontainer/path/to/file.txt")
        == expected
    )
    assert parse_azure_uri("azure://account/container/single-file") == AzureUri(
        "account", "container", "single-file"
    )
    for bad in (
        "invalid-uri",
        "azure://account-only",
        "azure://account/container-only",
        "azure:///empty-account/container/blob",
        "azure://account/container/",
        "https://example.com/container/blob",
        "https://myaccount.blob.core.windows.net/container-only",
    ):
        with pytest.raises(ManifestError, match=r"^Invalid Azure URI format"):
            parse_azure_uri(bad)


@pytest.mark.parametrize(
    ("repo_id", "kind", "expected"),
    [
        ("org/model", "hf", "hf"),
        ("org/model", "http", "hf"),
        ("gs://b/p", "hf", "gcs"),
        ("s3://b/p", "http", "s3"),
        ("azure://a/c/p", "hf", "azure"),
        ("https://acct.blob.core.windows.net/c/p", "hf", "azure"),
        ("org/model", "gcs", "gcs"),  # kind wins; the URI parser then fails
        ("gs://b/p", "s3", "s3"),
        ("s3://b/p", "azure", "azure"),
    ],
)
def test_routing(repo_id: str, kind: str, expected: str) -> None:
    assert route(ModelRepo(repo_id=repo_id, kind=kind)) == expected


def test_kind_mismatch_fails_in_uri_parsing() -> None:
    from ttfs.create import create_manifest

    with pytest.raises(ManifestError, match="Invalid GCS URI: URI must start with gs://"):
        create_manifest([ModelRepo(repo_id="org/model", kind="gcs")])


def test_unknown_kind_is_an_error() -> None:
    from truss_transfer import PyModelRepo, create_basetenpointer_from_models

    with pytest.raises(Exception, match=r"^Unknown kind: ftp$"):
        create_basetenpointer_from_models([PyModelRepo("org/x", kind="ftp")])


def test_py_model_repo_signature_and_attributes() -> None:
    from truss_transfer import PyModelRepo

    repo = PyModelRepo("org/x", "rev", "vol", "s3", ["*.json"], ["*.md"], "secret")
    assert (repo.repo_id, repo.revision, repo.volume_folder, repo.kind) == (
        "org/x",
        "rev",
        "vol",
        "s3",
    )
    assert (repo.allow_patterns, repo.ignore_patterns, repo.runtime_secret_name) == (
        ["*.json"],
        ["*.md"],
        "secret",
    )
    defaults = PyModelRepo("org/y")
    assert (defaults.revision, defaults.volume_folder, defaults.kind) == ("", "", "hf")
    assert defaults.allow_patterns is None and defaults.ignore_patterns is None
    assert defaults.runtime_secret_name == "hf_access_token"
    defaults.kind = "gcs"
    defaults.allow_patterns = ["*"]
    assert defaults.to_model_repo().kind == "gcs"
    assert defaults.to_model_repo().allow_patterns == ("*",)


def test_empty_model_list_gives_an_empty_manifest() -> None:
    import json

    from truss_transfer import create_basetenpointer_from_models

    text = create_basetenpointer_from_models([])
    assert json.loads(text) == {"pointers": [], "models": None}
    assert text == '{\n  "pointers": [],\n  "models": null\n}'
