"""Tests for ttfs.manifest: upstream oracles (spec §7.1, §7.3) and the stricter checks."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from ttfs.errors import ManifestError
from ttfs.manifest import (
    DEFAULT_SECRET_NAME,
    MANIFEST_PATHS,
    AzureResolution,
    GcsResolution,
    HttpResolution,
    Manifest,
    ModelRepo,
    Pointer,
    S3Resolution,
    destination,
    find_manifests,
    is_expired,
    load_manifest,
    manifest_paths,
    merge_pointers,
    parse_manifest,
    validate_pointers,
)

GETTYSBURG = "https://cdn.baseten.co/docs/production/Gettysburg.mp3"


def _raw_pointer(**overrides: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "resolution": {
            "resolution_type": "http",
            "url": GETTYSBURG,
            "expiration_timestamp": 2683764059,
        },
        "uid": "uid-1",
        "file_name": "file.txt",
        "hashtype": "sha256",
        "hash": "abc123",
        "size": 75649,
        "runtime_secret_name": "hf_access_token",
    }
    d.update(overrides)
    return d


def _doc(*pointers: dict[str, Any]) -> str:
    return json.dumps({"pointers": list(pointers), "models": None})


def _pointer(file_name: str = "file.txt", hash_: str = "abc123", **kw: Any) -> Pointer:
    resolution = kw.pop("resolution", HttpResolution(GETTYSBURG, 2683764059))
    return Pointer(
        resolution=resolution,
        uid=kw.pop("uid", "uid"),
        file_name=file_name,
        hashtype="sha256",
        hash=hash_,
        size=kw.pop("size", 100),
        **kw,
    )


# ------------------------------------------------------------------ types.rs oracles


def test_http_resolution_tagged() -> None:
    m = parse_manifest(_doc(_raw_pointer()))
    res = m.pointers[0].resolution
    assert isinstance(res, HttpResolution)
    assert res.url == GETTYSBURG
    assert res.expiration_timestamp == 2683764059


def test_gcs_resolution_tagged() -> None:
    raw = _raw_pointer(
        resolution={
            "resolution_type": "gcs",
            "path": "models/llama-3-2-1b-instruct/model.bin",
            "bucket_name": "llama-3-2-1b-instruct",
        }
    )
    res = parse_manifest(_doc(raw)).pointers[0].resolution
    assert isinstance(res, GcsResolution)
    assert res.path == "models/llama-3-2-1b-instruct/model.bin"
    assert res.bucket_name == "llama-3-2-1b-instruct"


def test_current_format_http_and_gcs() -> None:
    gcs = _raw_pointer(
        file_name="model.bin",
        hash="def456",
        resolution={
            "resolution_type": "gcs",
            "path": "models/llama-3-2-1b-instruct/model.bin",
            "bucket_name": "llama-3-2-1b-instruct",
        },
    )
    m = parse_manifest(_doc(_raw_pointer(), gcs))
    assert len(m.pointers) == 2
    assert isinstance(m.pointers[0].resolution, HttpResolution)
    assert isinstance(m.pointers[1].resolution, GcsResolution)
    assert m.models is None


def test_historic_untagged_manifest() -> None:
    text = json.dumps(
        {
            "pointers": [
                {
                    "resolution": {"url": GETTYSBURG, "expiration_timestamp": 2683764059},
                    "uid": "8c6b2f215f0333437cdd3fd9d4ed4cb3e8e4cf16b2fa0d6d4e0e7e3a12bcf88f",
                    "file_name": "random_github_file.yml",
                    "hashtype": "blake3",
                    "hash": "8c6b2f215f0333437cdd3fd9d4ed4cb3e8e4cf16b2fa0d6d4e0e7e3a12bcf88f",
                    "size": 75649,
                },
                {
                    "resolution": {"url": GETTYSBURG, "expiration_timestamp": 2683764059},
                    "uid": "8c6b2f215f0333437cdd3fd9d4ed4cb3e8e4cf16b2fa0d6d4e0e7e3a12bcf88f",
                    "file_name": "random_github_file2.yml",
                    "hashtype": "blake3",
                    "hash": "8c6b2f215f0333437cdd3fd9d4ed4cb3e8e4cf16b2fa0d6d4e0e7e3a12bcf88f",
                    "size": 75649,
                },
            ]
        }
    )
    m = parse_manifest(text)
    assert len(m.pointers) == 2
    assert all(isinstance(p.resolution, HttpResolution) for p in m.pointers)
    assert all(p.runtime_secret_name == DEFAULT_SECRET_NAME for p in m.pointers)
    assert m.pointers[0].last_modified_time is None


def test_untagged_fallback_with_unknown_tag_parses_as_http() -> None:
    raw = _raw_pointer(
        resolution={"resolution_type": "hf", "url": GETTYSBURG, "expiration_timestamp": 5}
    )
    res = parse_manifest(_doc(raw)).pointers[0].resolution
    assert res == HttpResolution(GETTYSBURG, 5)


def test_http_without_expiration_fails() -> None:
    for res in (
        {"resolution_type": "http", "url": GETTYSBURG},
        {"url": GETTYSBURG},
    ):
        with pytest.raises(ManifestError, match="expiration_timestamp"):
            parse_manifest(_doc(_raw_pointer(resolution=res)), source="/m.json")


def test_real_world_gcs_manifest_tag_positions() -> None:
    text = """{
      "pointers": [
        {
          "resolution": {
            "path": "tokenizer.json",
            "bucket_name": "llama-3-2-1b-instruct",
            "resolution_type": "gcs"
          },
          "uid": "gcs-3ff6b653d22a2676f3a03bd7b5d7ff88",
          "file_name": "/app/model_cache/tokenizer.json",
          "hashtype": "md5",
          "hash": "3ff6b653d22a2676f3a03bd7b5d7ff88",
          "size": 9085657,
          "last_modified_time": "2025-07-08T22:32:50.563Z",
          "runtime_secret_name": "gcs-account"
        },
        {
          "resolution": {
            "path": "USE_POLICY.md",
            "resolution_type": "gcs",
            "bucket_name": "llama-3-2-1b-instruct"
          },
          "uid": "gcs-1729addd533ca7a6e956e3f077f4a4e9",
          "file_name": "/app/model_cache/USE_POLICY.md",
          "hashtype": "md5",
          "hash": "1729addd533ca7a6e956e3f077f4a4e9",
          "size": 6021,
          "last_modified_time": "2025-07-08T22:32:48Z",
          "runtime_secret_name": "gcs-account"
        }
      ],
      "models": null
    }"""
    m = parse_manifest(text, source="real.json")
    first, second = m.pointers
    assert first.resolution == GcsResolution("tokenizer.json", "llama-3-2-1b-instruct")
    assert first.uid == "gcs-3ff6b653d22a2676f3a03bd7b5d7ff88"
    assert first.file_name == "/app/model_cache/tokenizer.json"
    assert first.hashtype == "md5"
    assert first.hash == "3ff6b653d22a2676f3a03bd7b5d7ff88"
    assert first.size == 9085657
    assert first.last_modified_time == "2025-07-08T22:32:50.563Z"
    assert first.runtime_secret_name == "gcs-account"
    assert second.file_name == "/app/model_cache/USE_POLICY.md"
    assert second.size == 6021
    assert second.resolution == GcsResolution("USE_POLICY.md", "llama-3-2-1b-instruct")
    # and the fields round-trip exactly
    again = parse_manifest(m.dumps())
    assert again.pointers == m.pointers
    assert json.loads(m.dumps()) == json.loads(text)


def test_s3_region_optional_and_azure() -> None:
    s3_missing = _raw_pointer(
        file_name="a", resolution={"resolution_type": "s3", "bucket_name": "b", "key": "k"}
    )
    s3_null = _raw_pointer(
        file_name="b",
        resolution={"resolution_type": "s3", "bucket_name": "b", "key": "k", "region": None},
    )
    s3_set = _raw_pointer(
        file_name="c",
        resolution={"bucket_name": "b", "key": "k", "region": "us-west-2", "resolution_type": "s3"},
    )
    azure = _raw_pointer(
        file_name="d",
        resolution={
            "resolution_type": "azure",
            "account_name": "acc",
            "container_name": "con",
            "blob_name": "dir/blob",
        },
    )
    m = parse_manifest(_doc(s3_missing, s3_null, s3_set, azure))
    assert m.pointers[0].resolution == S3Resolution("b", "k", None)
    assert m.pointers[1].resolution == S3Resolution("b", "k", None)
    assert m.pointers[2].resolution == S3Resolution("b", "k", "us-west-2")
    assert m.pointers[3].resolution == AzureResolution("acc", "con", "dir/blob")


def test_unknown_keys_ignored_and_defaults() -> None:
    raw = _raw_pointer(extra="x", another={"nested": [1, 2]})
    del raw["runtime_secret_name"]
    raw["resolution"]["unknown"] = 1
    doc = {"pointers": [raw], "version": 7}
    m = parse_manifest(json.dumps(doc))
    assert m.pointers[0].runtime_secret_name == "hf_access_token"
    assert m.models is None


def test_invalid_manifest_raises() -> None:
    with pytest.raises(ManifestError, match=r"/x/m\.json.*pointers"):
        parse_manifest('{"invalid": true}', source="/x/m.json")


def test_parse_errors_are_one_line_and_name_source(tmp_path: Path) -> None:
    bad_json = tmp_path / "m.json"
    bad_json.write_text('{"pointers": [')
    with pytest.raises(ManifestError) as exc:
        load_manifest(bad_json)
    msg = str(exc.value)
    assert msg.startswith(f"Failed to parse JSON manifest from {bad_json}: ")
    assert "\n" not in msg

    bad_yaml = tmp_path / "bptr-manifest"
    bad_yaml.write_text("pointers: [a, b\nmodels: {")
    with pytest.raises(ManifestError) as exc:
        load_manifest(bad_yaml)
    msg = str(exc.value)
    assert msg.startswith(f"Failed to parse YAML manifest from {bad_yaml}: ")
    assert "\n" not in msg


def test_unreadable_manifest(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ManifestError, match=f"Unable to read manifest from {missing}: "):
        load_manifest(missing)
    with pytest.raises(ManifestError, match="Unable to read manifest from"):
        load_manifest(tmp_path)  # a directory


def test_yaml_manifest_and_json_through_yaml(tmp_path: Path) -> None:
    yaml_text = f"""
pointers:
  - resolution:
      resolution_type: http
      url: {GETTYSBURG}
      expiration_timestamp: 4111111611
    uid: "raw-uid"
    file_name: nested/config.json
    hashtype: blake3
    hash: "8c6b2f215f0333437cdd3fd9d4ed4cb3e8e4cf16b2fa0d6d4e0e7e3a12bcf88f"
    size: 1482
    last_modified_time: 2025-07-08T22:32:50.563Z
models: null
"""
    p = tmp_path / "bptr-manifest"
    p.write_text(yaml_text)
    m = load_manifest(p)
    assert m.source == str(p)
    assert m.pointers[0].file_name == "nested/config.json"
    assert m.pointers[0].size == 1482
    assert m.pointers[0].resolution == HttpResolution(GETTYSBURG, 4111111611)
    # an unquoted YAML timestamp becomes a datetime; it is written back as RFC 3339 UTC
    assert m.pointers[0].last_modified_time == "2025-07-08T22:32:50.563Z"

    p.write_text(_doc(_raw_pointer()))  # JSON content, no extension -> YAML parser
    assert load_manifest(p).pointers[0].hash == "abc123"
    assert parse_manifest(_doc(_raw_pointer()), fmt="yaml").pointers[0].size == 75649


def test_models_parse_and_round_trip() -> None:
    models = [
        {
            "repo_id": "julien-c/dummy-unknown",
            "revision": "main",
            "allow_patterns": ["*.json"],
            "ignore_patterns": None,
            "volume_folder": "julien_dummy",
            "runtime_secret_name": "hf_access_token_2",
            "kind": "hf",
        },
        {
            "repo_id": "gs://bucket/prefix",
            "revision": "",
            "volume_folder": "v",
            "runtime_secret_name": "gcs-account",
            "kind": "gcs",
        },
    ]
    m = parse_manifest(json.dumps({"pointers": [], "models": models}))
    assert m.models is not None
    hf, gcs = m.models
    assert hf == ModelRepo(
        repo_id="julien-c/dummy-unknown",
        revision="main",
        volume_folder="julien_dummy",
        kind="hf",
        allow_patterns=("*.json",),
        ignore_patterns=None,
        runtime_secret_name="hf_access_token_2",
    )
    assert gcs.kind == "gcs" and gcs.allow_patterns is None
    d = hf.to_json()
    assert list(d) == [
        "repo_id",
        "revision",
        "allow_patterns",
        "ignore_patterns",
        "volume_folder",
        "runtime_secret_name",
        "kind",
    ]
    assert d["kind"] == "http"  # upstream serialises the hf alias as http
    again = parse_manifest(m.dumps())
    assert again.models is not None
    assert [x.to_json() for x in again.models] == [x.to_json() for x in m.models]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"kind": "ftp"}, "unknown kind"),
        ({"runtime_secret_name": None}, "runtime_secret_name"),
        ({"allow_patterns": "*.json"}, "allow_patterns"),
    ],
)
def test_bad_models(change: dict[str, Any], needle: str) -> None:
    model = {
        "repo_id": "r",
        "revision": "",
        "volume_folder": "",
        "runtime_secret_name": "s",
        "kind": "hf",
    }
    model.update(change)
    with pytest.raises(ManifestError, match=needle) as exc:
        parse_manifest(json.dumps({"pointers": [], "models": [model]}), source="/m.json")
    assert "manifest /m.json: model 0" in str(exc.value)


def test_model_missing_required_key() -> None:
    with pytest.raises(ManifestError, match="missing required key 'revision'"):
        parse_manifest(json.dumps({"pointers": [], "models": [{"repo_id": "r", "kind": "hf"}]}))


def test_resolution_type_inequality() -> None:
    assert HttpResolution.resolution_type == "http"
    assert GcsResolution.resolution_type == "gcs"
    assert S3Resolution.resolution_type == "s3"
    assert AzureResolution.resolution_type == "azure"
    assert HttpResolution.resolution_type != GcsResolution.resolution_type


# ------------------------------------------------------------------ lib.rs oracles


def test_constants() -> None:
    assert MANIFEST_PATHS == (
        "/bptr/bptr-manifest",
        "/bptr/bptr-manifest.json",
        "/static-bptr/static-bptr-manifest.json",
    )
    assert DEFAULT_SECRET_NAME == "hf_access_token"


def test_validate_valid_pointer_ok() -> None:
    validate_pointers([_pointer()], now=1_700_000_000)


def test_validate_expired_pointer_logs_error(caplog: pytest.LogCaptureFixture) -> None:
    p = _pointer(resolution=HttpResolution(GETTYSBURG, 1000))
    assert is_expired(p, now=2000)
    assert not is_expired(p, now=500)
    with caplog.at_level(logging.ERROR, logger="ttfs.manifest"):
        validate_pointers([p], now=2000)  # no exception
    records = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(records) == 1
    assert records[0].getMessage() == (
        "Pointer file.txt has expired at 1000. Current time is 2000. "
        "This will lead to a download failure."
    )


def test_is_expired_only_for_http() -> None:
    assert not is_expired(_pointer(resolution=GcsResolution("p", "b")), now=10**12)
    assert not is_expired(_pointer(), now=None)  # 2683764059 is in 2055


def test_validate_hash_with_slash_fails() -> None:
    with pytest.raises(ManifestError, match=r"Hash abc/def contains '/', which is not allowed"):
        validate_pointers([_pointer(hash_="abc/def")], now=0)


def test_validate_rechecks_in_memory_pointers() -> None:
    with pytest.raises(ManifestError, match=r"pointer 1 .*'\.\.'"):
        validate_pointers([_pointer("ok"), _pointer("../x")], now=0)
    with pytest.raises(ManifestError, match="both a file and a directory"):
        validate_pointers([_pointer("a/b"), _pointer("a/b/c", "h2")], now=0)
    with pytest.raises(ManifestError, match="size"):
        validate_pointers([_pointer(size=-5)], now=0)


def test_merge_two_distinct() -> None:
    m = Manifest((_pointer("a", "h1"), _pointer("b", "h2")))
    assert [p.file_name for p in merge_pointers([m])] == ["a", "b"]


def test_merge_identical_twice() -> None:
    p = _pointer("a", "h1")
    assert merge_pointers([Manifest((p,)), Manifest((p,))]) == [p]
    assert merge_pointers([Manifest((p, p))]) == [p]  # within one manifest too


def test_merge_same_name_different_hash(caplog: pytest.LogCaptureFixture) -> None:
    first = _pointer("model.bin", "hash1")
    second = _pointer("model.bin", "hash2")
    with caplog.at_level(logging.WARNING, logger="ttfs.manifest"):
        merged = merge_pointers([Manifest((first,)), Manifest((second,))])
    assert merged == [first]
    assert merged[0].hash == "hash1"
    assert (
        "Conflicting file found: model.bin has hash hash1 in one manifest and hash2 in another. "
        "Using the first one."
    ) in caplog.messages


def test_merge_empty() -> None:
    assert merge_pointers([]) == []
    assert merge_pointers([Manifest(())]) == []


def test_merge_same_hash_different_names_both_kept() -> None:
    merged = merge_pointers([Manifest((_pointer("a", "h"), _pointer("b", "h")))])
    assert len(merged) == 2


def test_merge_order_across_manifests() -> None:
    m1 = Manifest((_pointer("a", "1"), _pointer("b", "2")))
    m2 = Manifest((_pointer("c", "3"), _pointer("a", "1"), _pointer("b", "9")))
    assert [(p.file_name, p.hash) for p in merge_pointers([m1, m2])] == [
        ("a", "1"),
        ("b", "2"),
        ("c", "3"),
    ]


def test_current_hashes() -> None:
    m = Manifest((_pointer("a", "h1"), _pointer("b", "h2")))
    assert {p.hash for p in merge_pointers([m])} == {"h1", "h2"}


# ------------------------------------------------------------------ lookup paths


def test_manifest_paths_default_and_override() -> None:
    assert manifest_paths({}) == tuple(Path(p) for p in MANIFEST_PATHS)
    env = {"TTFS_MANIFEST_PATHS": os.pathsep.join(["/x/one", "", "/y/two.json"])}
    assert manifest_paths(env) == (Path("/x/one"), Path("/y/two.json"))
    assert manifest_paths({"TTFS_MANIFEST_PATHS": ""}) == ()


def test_find_manifests_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    yaml_path = tmp_path / "bptr" / "bptr-manifest"
    json_path = tmp_path / "bptr" / "bptr-manifest.json"
    static = tmp_path / "static-bptr" / "static-bptr-manifest.json"
    for p in (yaml_path, json_path, static):
        p.parent.mkdir(exist_ok=True)
    yaml_path.write_text(_doc(_raw_pointer(file_name="from-yaml")))
    static.write_text(_doc(_raw_pointer(file_name="from-static")))
    (tmp_path / "dir.json").mkdir()  # not a regular file: skipped
    link = tmp_path / "link.json"
    link.symlink_to(static)  # symlinks are followed
    env = {
        "TTFS_MANIFEST_PATHS": os.pathsep.join(
            str(p) for p in (yaml_path, json_path, static, tmp_path / "dir.json", link)
        )
    }
    with caplog.at_level(logging.INFO, logger="ttfs.manifest"):
        found = find_manifests(env)
    assert [m.source for m in found] == [str(yaml_path), str(static), str(link)]
    assert [m.pointers[0].file_name for m in found] == ["from-yaml", "from-static", "from-static"]
    assert f"Found manifest file at: {yaml_path}" in caplog.messages
    assert f"Found manifest file at: {json_path}" not in caplog.messages

    json_path.write_text('{"invalid": true}')
    with pytest.raises(ManifestError, match=str(json_path)):
        find_manifests(env)


def test_find_manifests_none(tmp_path: Path) -> None:
    assert find_manifests({"TTFS_MANIFEST_PATHS": str(tmp_path / "absent.json")}) == []


# ------------------------------------------------------------------ hostile manifests


HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"file_name": "../../escape"}, "'..' components"),
    ({"file_name": "a/../../b"}, "'..' components"),
    ({"file_name": "/app/../etc/passwd"}, "'..' components"),
    ({"file_name": ".."}, "'..' components"),
    ({"file_name": ""}, "must not be empty"),
    ({"file_name": "a\0b"}, "NUL"),
    ({"file_name": "dir/"}, "end with '/'"),
    ({"file_name": "./"}, "end with '/'"),
    ({"file_name": "."}, "normalises to the directory"),
    ({"file_name": "/"}, "end with '/'"),
    ({"hash": "a/b"}, "Hash a/b contains '/', which is not allowed"),
    ({"hash": ""}, "hash must not be empty"),
    ({"hash": "a\0b"}, "NUL"),
    ({"hash": "."}, "hash must not be"),
    ({"hash": ".."}, "hash must not be"),
    ({"size": -1}, "size"),
    ({"size": "12"}, "size must be an integer"),
    ({"size": 1.5}, "size must be an integer"),
    ({"size": True}, "size must be an integer"),
    ({"size": None}, "size must be an integer"),
    ({"size": 2**60}, "outside the allowed range"),
    ({"size": 2**50 + 1}, "outside the allowed range"),
    ({"uid": 5}, "'uid' must be a string"),
    ({"hashtype": None}, "'hashtype' must be a string"),
    ({"file_name": ["a"]}, "'file_name' must be a string"),
    ({"runtime_secret_name": 3}, "runtime_secret_name"),
    ({"last_modified_time": "yesterday"}, "RFC 3339"),
    ({"last_modified_time": 17}, "RFC 3339"),
    ({"resolution": {"resolution_type": "http", "url": 7, "expiration_timestamp": 1}}, "url"),
    (
        {"resolution": {"resolution_type": "http", "url": "u", "expiration_timestamp": "1"}},
        "expiration_timestamp' must be an integer",
    ),
    (
        {"resolution": {"resolution_type": "http", "url": "u", "expiration_timestamp": 2**64}},
        "64-bit",
    ),
    ({"resolution": {"resolution_type": "gcs", "path": "p"}}, "bucket_name"),
    (
        {"resolution": {"resolution_type": "s3", "bucket_name": "b", "key": "k", "region": 1}},
        "region",
    ),
    ({"resolution": {"resolution_type": "ftp", "x": 1}}, "unknown resolution_type 'ftp'"),
    ({"resolution": {"bucket_name": "b"}}, "no 'resolution_type'"),
    ({"resolution": "http://x"}, "'resolution' must be an object"),
]


@pytest.mark.parametrize(("change", "needle"), HOSTILE)
def test_hostile_pointer_rejected(change: dict[str, Any], needle: str) -> None:
    good = [_raw_pointer(file_name=f"ok{i}", hash=f"h{i}") for i in range(3)]
    bad = _raw_pointer(**{"file_name": "victim", **change})
    source = "/x/m.json"
    with pytest.raises(ManifestError) as exc:
        parse_manifest(_doc(*good, bad), source=source)
    msg = str(exc.value)
    assert needle in msg
    assert msg.startswith(f"manifest {source}: pointer 3")
    assert "\n" not in msg and "\0" not in msg


def test_hostile_message_shape() -> None:
    with pytest.raises(ManifestError) as exc:
        parse_manifest(
            _doc(
                *(_raw_pointer(file_name=f"f{i}") for i in range(3)),
                _raw_pointer(file_name="../../escape"),
            ),
            source="/x/m.json",
        )
    assert str(exc.value) == (
        "manifest /x/m.json: pointer 3 (file_name '../../escape'): "
        "file_name must not contain '..' components"
    )


def test_missing_pointer_keys() -> None:
    for key in ("resolution", "uid", "file_name", "hashtype", "hash", "size"):
        raw = _raw_pointer()
        del raw[key]
        with pytest.raises(ManifestError, match=f"missing required key '{key}'"):
            parse_manifest(_doc(raw), source="s")


def test_top_level_shapes() -> None:
    for text, needle in (
        ("[]", "expected an object"),
        ('{"pointers": {}}', "'pointers' must be an array"),
        ('{"pointers": [1]}', "pointer 0: must be an object"),
        ('{"pointers": [], "models": {}}', "'models' must be an array"),
    ):
        with pytest.raises(ManifestError, match=needle):
            parse_manifest(text, source="m.json")
    with pytest.raises(ManifestError, match="YAML"):
        parse_manifest("", source="bptr-manifest", fmt="yaml")


def test_file_directory_collision() -> None:
    pointers = [
        _raw_pointer(file_name="a/b", hash="1"),
        _raw_pointer(file_name="x", hash="2"),
        _raw_pointer(file_name="a/b/c", hash="3"),
    ]
    with pytest.raises(ManifestError) as exc:
        parse_manifest(_doc(*pointers), source="/m.json")
    assert str(exc.value).startswith("manifest /m.json: pointer 2 (file_name 'a/b/c'): ")
    assert "pointer 0" in str(exc.value)
    # reverse order, and with normalisation (./ and //)
    pointers = [
        _raw_pointer(file_name="./a//b/c", hash="1"),
        _raw_pointer(file_name="a/b", hash="2"),
    ]
    with pytest.raises(ManifestError, match=r"pointer 1.*both a file and a directory"):
        parse_manifest(_doc(*pointers))
    # absolute and relative names live in different namespaces
    ok = [_raw_pointer(file_name="/a/b", hash="1"), _raw_pointer(file_name="a/b/c", hash="2")]
    assert len(parse_manifest(_doc(*ok)).pointers) == 2


def test_a_caller_that_checks_collisions_itself_may_skip_them_and_nobody_else_does() -> None:
    """``collisions=False`` (the mount: its tree checks them) parses a colliding manifest; the
    manifest says so, and expanding it for anyone who wants the check (a resolve) still makes
    it."""
    from ttfs.create import expand_pointers

    colliding = _doc(_raw_pointer(file_name="a", hash="1"), _raw_pointer(file_name="a/b", hash="2"))
    lenient = parse_manifest(colliding, collisions=False)
    assert len(lenient.pointers) == 2 and not lenient.collisions_checked
    assert len(expand_pointers([lenient], collisions=False)) == 2
    with pytest.raises(ManifestError, match="both a file and a directory"):
        expand_pointers([lenient])
    assert parse_manifest(_doc(_raw_pointer(file_name="a", hash="1"))).collisions_checked


def test_duplicates_and_conflicts_are_not_parse_errors() -> None:
    same = _raw_pointer(file_name="a", hash="1")
    conflict = _raw_pointer(file_name="a", hash="2")
    m = parse_manifest(_doc(same, same, conflict))
    assert len(m.pointers) == 3
    assert len(merge_pointers([m])) == 1


def test_boundary_sizes_accepted() -> None:
    m = parse_manifest(_doc(_raw_pointer(file_name="z", size=0), _raw_pointer(size=2**50)))
    assert [p.size for p in m.pointers] == [0, 2**50]


# ------------------------------------------------------------------ destination


def test_destination() -> None:
    assert destination("/dl", "/app/model_cache/x.bin") == Path("/app/model_cache/x.bin")
    assert destination("/dl", "nested/config.json") == Path("/dl/nested/config.json")
    assert destination("/dl", "./a//b") == Path("/dl/a/b")
    assert destination("", "nested/config.json") == Path("nested/config.json")
    assert destination(Path("rel/dir"), "f") == Path("rel/dir/f")
    for bad in ("../x", "a/../../b", "a/..", "", ".", "./", "a\0b", "/.."):
        with pytest.raises(ManifestError):
            destination("/dl", bad)


def test_destination_never_escapes(tmp_path: Path) -> None:
    base = tmp_path / "dl"
    for name in ("a", "a/b/c", "./x", "...", "..a", "a..", ".hidden/..x"):
        out = destination(base, name)
        assert out.is_relative_to(base), name


# ------------------------------------------------------------------ emission


def test_to_json_key_order() -> None:
    p = Pointer(
        resolution=GcsResolution("p", "b"),
        uid="u",
        file_name="/f",
        hashtype="md5",
        hash="h",
        size=1,
        last_modified_time="2025-07-08T22:32:50.563Z",
        runtime_secret_name="gcs-account",
    )
    d = p.to_json()
    assert list(d) == [
        "resolution",
        "uid",
        "file_name",
        "hashtype",
        "hash",
        "size",
        "last_modified_time",
        "runtime_secret_name",
    ]
    no_time = _pointer().to_json()
    assert "last_modified_time" not in no_time
    assert list(no_time)[-1] == "runtime_secret_name"
    assert list(HttpResolution("u", 1).to_json()) == [
        "resolution_type",
        "url",
        "expiration_timestamp",
    ]
    assert list(GcsResolution("p", "b").to_json()) == ["resolution_type", "path", "bucket_name"]
    assert S3Resolution("b", "k").to_json() == {
        "resolution_type": "s3",
        "bucket_name": "b",
        "key": "k",
        "region": None,
    }
    assert list(S3Resolution("b", "k").to_json()) == [
        "resolution_type",
        "bucket_name",
        "key",
        "region",
    ]
    assert list(AzureResolution("a", "c", "b").to_json()) == [
        "resolution_type",
        "account_name",
        "container_name",
        "blob_name",
    ]


def test_round_trip_and_dumps() -> None:
    pointers = (
        _pointer("a", "1"),
        _pointer("b", "2", resolution=S3Resolution("bk", "key")),
        _pointer(
            "c",
            "3",
            resolution=AzureResolution("a", "c", "b"),
            last_modified_time="2025-01-01T00:00:00Z",
        ),
        _pointer("d", "4", resolution=GcsResolution("p", "bk"), runtime_secret_name="gcs"),
    )
    m = Manifest(pointers)
    text = m.dumps()
    assert text == json.dumps(m.to_json(), indent=2)
    assert '\n  "models": null' in text
    assert text.startswith('{\n  "pointers": [\n    {\n      "resolution": {\n')
    assert list(json.loads(text)) == ["pointers", "models"]
    again = parse_manifest(text, source="rt.json")
    assert again.pointers == pointers
    assert again.models is None
    assert again.dumps() == text


@pytest.mark.parametrize(
    "extra",
    [{}, {"runtime_secret_name": "tok"}, {"last_modified_time": None}, {"note": "x"}],
)
def test_the_fast_parser_makes_the_same_frozen_pointers_as_the_checked_one(
    extra: dict[str, object],
) -> None:
    """The fast path fills the slots through their descriptors: the objects must be the very
    ones the dataclass constructor makes (equal, hashable, frozen, every field set)."""
    import dataclasses

    from ttfs import manifest as m

    raw = {
        "resolution": {"url": "https://h/x", "expiration_timestamp": 4_000_000_000},
        "uid": "u",
        "file_name": "a/b.bin",
        "hashtype": "sha256",
        "hash": "ab" * 32,
        "size": 7,
        **extra,
    }
    fast, checked = m._parse_pointer_fast(raw), m._parse_pointer_checked(raw)
    assert fast is not None and type(fast) is m.Pointer
    assert fast == checked and hash(fast) == hash(checked) and repr(fast) == repr(checked)
    assert fast.resolution == checked.resolution and type(fast.resolution) is m.HttpResolution
    assert all(getattr(fast, f.name) == getattr(checked, f.name) for f in dataclasses.fields(fast))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.size = 8  # type: ignore[misc]
    assert dataclasses.replace(fast, size=8).size == 8
