"""S3 end to end on moto_server: create a manifest from a prefix, resolve it, mount it.

What is checked: the pointers of spec §2.7 (resolution, uid, hash = quoted etag normalised,
last_modified_time, file_name), the AWS oracle of spec §7.2, upstream's error texts (missing or
malformed credentials, nothing listed, nothing matched), bytes identical after ``ttfs resolve``
and through a mount, MD5 verified for single-part objects and said to be unverifiable for a
multipart one, ``If-Match`` turning a rewritten object into a clear stale-manifest error, the
endpoint override (secret JSON and ``AWS_ENDPOINT_URL``), JIT models, and that neither key
appears in our output, the daemon log, ``ttfs status`` or moto's request log.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.emulators import (
    Emulator,
    assert_secret_free,
    mount_and_read,
    read_tree,
    run_moto,
    ttfs_cli,
)
from ttfs.create import create_manifest
from ttfs.errors import CredentialError, ManifestError, ObjectNotFound
from ttfs.manifest import ModelRepo

pytestmark = pytest.mark.slow

ACCESS_KEY = "AKIATTFSTEST" + secrets.token_hex(4).upper()
SECRET_KEY = "s3-secret-" + secrets.token_hex(12)
SECRET_NAME = "aws-secret-json"
IGNORES = ["*.pth", "*cache*", "original*", "*.lock", "*.metadata"]


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    with run_moto(tmp_path_factory.mktemp("moto")) as emu:
        yield emu


def _client(moto: Emulator) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=moto.url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )


def _secret(moto: Emulator, **extra: Any) -> str:
    doc = {
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "region": "us-east-1",
        "endpoint_url": moto.url,
    }
    doc.update(extra)
    return json.dumps({k: v for k, v in doc.items() if v is not None})


class Bucket:
    """A fresh bucket with a model-like tree under ``models/llama/``."""

    def __init__(self, moto: Emulator, name: str) -> None:
        self.client = _client(moto)
        self.name = name
        self.client.create_bucket(Bucket=name)
        rnd = __import__("random").Random(name)
        self.files: dict[str, bytes] = {
            "config.json": b'{"hidden_size": 64}',
            "tokenizer.json": rnd.randbytes(70_000),
            "model.safetensors": rnd.randbytes(3 * 1024 * 1024 + 17),
            "README.md": b"# llama\n",
            "rank-0/checkpoint-24/tokenizer_config.json": rnd.randbytes(5_000),
            "original/consolidated.00.pth": rnd.randbytes(1000),
            ".cache/huggingface/x.lock": b"",
        }
        for rel, data in self.files.items():
            self.put(f"models/llama/{rel}", data)
        self.put("models/llama-2/other.bin", b"not under the prefix")  # sibling prefix
        self.put("models/llama/folder/", b"")  # a console "folder" marker

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def put_multipart(self, key: str, data: bytes) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
        self.client.upload_fileobj(io.BytesIO(data), self.name, key, Config=config)

    def etag(self, key: str) -> str:
        return str(self.client.head_object(Bucket=self.name, Key=key)["ETag"])


@pytest.fixture
def bucket(moto: Emulator, request: pytest.FixtureRequest) -> Bucket:
    name = "ttfs-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16]
    return Bucket(moto, name)


@pytest.fixture
def s3_env(moto: Emulator, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv(f"TRUSS_SECRET_{SECRET_NAME}", _secret(moto))
    return dict(os.environ)


def _repo(bucket: Bucket, prefix: str = "models/llama", **kw: Any) -> ModelRepo:
    kw.setdefault("volume_folder", "julien_dummy")
    kw.setdefault("runtime_secret_name", SECRET_NAME)
    return ModelRepo(repo_id=f"s3://{bucket.name}/{prefix}", kind="s3", **kw)


KEYS = {"access key id": ACCESS_KEY, "secret access key": SECRET_KEY}


# -- creation -----------------------------------------------------------------------------------


def test_create_from_prefix_with_patterns(bucket: Bucket, s3_env: dict[str, str]) -> None:
    from truss_transfer import PyModelRepo, create_basetenpointer_from_models

    text = create_basetenpointer_from_models(
        [
            PyModelRepo(
                f"s3://{bucket.name}/models/llama/",
                volume_folder="julien_dummy",
                kind="s3",
                ignore_patterns=[*IGNORES, "*.md"],
                runtime_secret_name=SECRET_NAME,
            )
        ]
    )
    assert text.startswith('{\n  "pointers": [\n    {\n      "resolution": {')
    doc = json.loads(text)
    assert doc["models"] is None
    names = [p["file_name"] for p in doc["pointers"]]
    expected = ["config.json", "model.safetensors", "rank-0/checkpoint-24/tokenizer_config.json"]
    expected.append("tokenizer.json")
    assert names == [f"/app/model_cache/julien_dummy/{n}" for n in sorted(expected)]
    for p in doc["pointers"]:
        rel = p["file_name"].removeprefix("/app/model_cache/julien_dummy/")
        key = f"models/llama/{rel}"
        assert list(p) == [
            "resolution",
            "uid",
            "file_name",
            "hashtype",
            "hash",
            "size",
            "last_modified_time",
            "runtime_secret_name",
        ]
        assert p["resolution"] == {
            "resolution_type": "s3",
            "bucket_name": bucket.name,
            "key": key,
            "region": None,
        }
        assert p["uid"] == f"s3:{bucket.name}:{key}"
        assert p["hashtype"] == "etag"
        md5 = hashlib.md5(bucket.files[rel]).hexdigest()
        assert p["hash"] == f"_{md5}_" == bucket.etag(key).replace('"', "_")
        assert p["size"] == len(bucket.files[rel])
        assert p["last_modified_time"].endswith("Z") and p["last_modified_time"][10] == "T"
        assert p["runtime_secret_name"] == SECRET_NAME


def test_aws_oracle(bucket: Bucket, s3_env: dict[str, str]) -> None:
    """Spec §7.2 test_create_bptr_with_aws, on a bucket the test generates."""
    manifest = create_manifest(
        [
            _repo(
                bucket,
                "models/llama/",
                allow_patterns=("*tokenizer_config.json",),
                ignore_patterns=tuple(IGNORES),
            )
        ]
    )
    (p,) = [x.to_json() for x in manifest.pointers]
    key = "models/llama/rank-0/checkpoint-24/tokenizer_config.json"
    assert p["resolution"] == {
        "resolution_type": "s3",
        "bucket_name": bucket.name,
        "key": key,
        "region": None,
    }
    assert p["uid"] == f"s3:{bucket.name}:{key}"
    assert (
        p["file_name"] == "/app/model_cache/julien_dummy/rank-0/checkpoint-24/tokenizer_config.json"
    )
    assert p["hashtype"] == "etag"
    assert p["hash"] == "_" + hashlib.md5(bucket.files[key[13:]]).hexdigest() + "_"
    assert p["size"] == 5_000


def test_single_object_uri_and_env_endpoint(
    bucket: Bucket, moto: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The endpoint from AWS_ENDPOINT_URL instead of the secret; a URI naming one object.
    monkeypatch.setenv(f"TRUSS_SECRET_{SECRET_NAME}", _secret(moto, endpoint_url=None))
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
    manifest = create_manifest([_repo(bucket, "models/llama/config.json", volume_folder="v")])
    (p,) = manifest.pointers
    assert p.file_name == "/app/model_cache/v/config.json"
    assert p.size == len(bucket.files["config.json"])


def test_creation_errors(bucket: Bucket, moto: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        CredentialError,
        match=f"^AWS credential '{SECRET_NAME}' not found in environment variable or file$",
    ):
        create_manifest([_repo(bucket)])
    monkeypatch.setenv(f"TRUSS_SECRET_{SECRET_NAME}", '{"access_key_id": "x"}')
    with pytest.raises(CredentialError, match=r"^Failed to parse AWS credentials from JSON"):
        create_manifest([_repo(bucket)])
    # The secret file works as well as the variable.
    monkeypatch.delenv(f"TRUSS_SECRET_{SECRET_NAME}")
    (Path(os.environ["TTFS_SECRETS_DIR"]) / SECRET_NAME).write_text(_secret(moto) + "\n")
    with pytest.raises(
        ManifestError,
        match=(
            rf"^No objects found for weights source 's3://{bucket.name}/models/nothing' under "
            r"prefix 'models/nothing'\. Check that the URI points to an existing object or folder"
        ),
    ):
        create_manifest([_repo(bucket, "models/nothing")])
    with pytest.raises(
        ManifestError,
        match=(
            rf"^No objects matched weights filters for source 's3://{bucket.name}/models/llama'\. "
            r"Listed 7 object\(s\), allow_patterns=\['\*\.gguf'\], ignore_patterns=None\.$"
        ),
    ):
        create_manifest([_repo(bucket, allow_patterns=("*.gguf",))])
    with pytest.raises(ManifestError, match="Listed 7 object"):
        create_manifest([_repo(bucket, allow_patterns=())])  # an empty allow list keeps nothing
    with pytest.raises(ObjectNotFound, match=r"^Failed to list objects: s3://no-such-bucket"):
        create_manifest([ModelRepo("s3://no-such-bucket/x", runtime_secret_name=SECRET_NAME)])
    with pytest.raises(ManifestError, match="missing key part"):
        create_manifest([ModelRepo(f"s3://{bucket.name}", runtime_secret_name=SECRET_NAME)])


# -- run time -----------------------------------------------------------------------------------


def test_create_resolve_and_mount(
    bucket: Bucket, s3_env: dict[str, str], tmp_path: Path, moto: Emulator
) -> None:
    big = __import__("random").Random(7).randbytes(11 * 1024 * 1024 + 5)
    bucket.put_multipart("models/llama/big/multipart.bin", big)
    assert bucket.etag("models/llama/big/multipart.bin").endswith('-3"')
    root = tmp_path / "model_cache"
    manifest = tmp_path / "manifest.json"
    created = ttfs_cli(
        "create",
        "--s3",
        f"s3://{bucket.name}/models/llama",
        "--ignore",
        "original*",
        "--ignore",
        "*cache*",
        "--volume-folder",
        "llama",
        "--model-path",
        str(root),
        "--secret",
        SECRET_NAME,
        "-o",
        str(manifest),
        "--log-level",
        "debug",
        env=s3_env,
    )
    assert created.returncode == 0, created.stderr
    assert "6 pointer(s)" in created.stderr
    expected = {
        f"llama/{rel}": data
        for rel, data in bucket.files.items()
        if not rel.startswith(("original/", ".cache/"))
    }
    expected["llama/big/multipart.bin"] = big

    resolved = ttfs_cli(
        "resolve",
        str(manifest),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--log-level",
        "debug",
        env=s3_env,
    )
    assert resolved.returncode == 0, resolved.stderr
    assert read_tree(root) == expected
    out = resolved.stderr
    assert out.count("(md5)") == 5  # every single-part object verified against its etag
    assert "big/multipart.bin: content cannot be verified" in out
    assert "multipart S3 etag" in out and "If-Match pins" in out

    files, status, daemon_log = mount_and_read(
        manifest, str(root), tmp_path / "mnt", tmp_path / "mount-cache", s3_env
    )
    assert files == expected
    assert "multipart S3 etag" in status  # status says what it cannot verify
    assert_secret_free(
        KEYS,
        create=created.stdout + created.stderr,
        resolve=resolved.stdout + resolved.stderr,
        status=status,
        daemon_log=daemon_log,
    )
    # moto logs every request line: the secret never travels (presigned URLs carry a signature).
    assert_secret_free({"secret access key": SECRET_KEY}, moto_log=moto.log_text())
    assert "X-Amz-Signature=" in moto.log_text()


def test_rewritten_object_is_a_stale_manifest(
    bucket: Bucket, s3_env: dict[str, str], tmp_path: Path
) -> None:
    manifest = create_manifest(
        [_repo(bucket, allow_patterns=("config.json",))], model_path=str(tmp_path / "m")
    )
    path = tmp_path / "manifest.json"
    path.write_text(manifest.dumps())
    same_size = b'{"hidden_size": 65}'
    assert len(same_size) == len(bucket.files["config.json"])
    bucket.put("models/llama/config.json", same_size)
    done = ttfs_cli("resolve", str(path), "--cache-dir", str(tmp_path / "cache"), env=s3_env)
    assert done.returncode == 1
    assert "changed since the manifest was made" in done.stderr
    assert not (tmp_path / "m" / "julien_dummy" / "config.json").exists()


def test_missing_credentials_at_resolve_time(
    bucket: Bucket, s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = create_manifest(
        [_repo(bucket, allow_patterns=("config.json",))], model_path=str(tmp_path / "m")
    )
    path = tmp_path / "manifest.json"
    path.write_text(manifest.dumps())
    env = {k: v for k, v in s3_env.items() if not k.startswith("TRUSS_SECRET_")}
    done = ttfs_cli("resolve", str(path), "--cache-dir", str(tmp_path / "cache"), env=env)
    assert done.returncode != 0
    assert f"AWS credential '{SECRET_NAME}' not found in environment variable or file" in (
        done.stderr
    )


def test_jit_models_and_manifest_models(
    bucket: Bucket, s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from truss_transfer import PyModelRepo, lazy_data_resolve

    monkeypatch.setenv("TTFS_CACHE_DIR", str(tmp_path / "cache"))
    repo = PyModelRepo(
        f"s3://{bucket.name}/models/llama",
        volume_folder="jit",
        kind="s3",
        allow_patterns=["*.json"],
        runtime_secret_name=SECRET_NAME,
    )
    out = tmp_path / "out"
    assert lazy_data_resolve(str(out), [repo], str(tmp_path / "models")) == str(out)
    jit = tmp_path / "models" / "jit"
    assert (jit / "config.json").read_bytes() == bucket.files["config.json"]
    # `*` crosses `/`: "*.json" keeps the nested tokenizer config too
    assert (jit / "rank-0/checkpoint-24/tokenizer_config.json").exists()
    assert not (jit / "model.safetensors").exists()
    assert (jit / "tokenizer.json").read_bytes() == bucket.files["tokenizer.json"]

    # A manifest's "models" list is expanded at resolve time (with model_path "": absolute).
    with pytest.raises(Exception, match="model_path must be provided"):
        lazy_data_resolve(str(out), [repo])
    doc = {
        "pointers": [],
        "models": [
            {
                "repo_id": f"s3://{bucket.name}/models/llama",
                "revision": "",
                "allow_patterns": ["README.md"],
                "ignore_patterns": None,
                "volume_folder": str(tmp_path / "from-manifest"),
                "runtime_secret_name": SECRET_NAME,
                "kind": "s3",
            }
        ],
    }
    manifest = tmp_path / "bptr-manifest.json"
    manifest.write_text(json.dumps(doc))
    monkeypatch.setenv("TTFS_MANIFEST_PATHS", str(manifest))
    lazy_data_resolve(str(out))
    assert (tmp_path / "from-manifest" / "README.md").read_bytes() == b"# llama\n"


def test_secrets_stay_with_their_hosts(
    bucket: Bucket, s3_env: dict[str, str], moto: Emulator, tmp_path: Path
) -> None:
    """One manifest from a private HF repo and an S3 prefix (a --models file, two secrets):
    the HF token reaches only the hub, the AWS keys reach nobody (presigned URLs)."""
    from tests.fake_hub import FakeHub

    hf_token = "hf_mixed_" + secrets.token_hex(12)
    root = tmp_path / "model_cache"
    models = [
        {
            "repo_id": "org/secret-model",
            "revision": "main",
            "allow_patterns": None,
            "ignore_patterns": None,
            "volume_folder": "hf",
            "runtime_secret_name": "hf-token",
            "kind": "hf",
        },
        {
            "repo_id": f"s3://{bucket.name}/models/llama",
            "revision": "",
            "allow_patterns": ["*.json"],
            "ignore_patterns": None,
            "volume_folder": "s3",
            "runtime_secret_name": SECRET_NAME,
            "kind": "s3",
        },
    ]
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps(models))
    with FakeHub() as hub:
        weights = __import__("random").Random(3).randbytes(10 << 20)
        hub.add_repo(
            "org/secret-model",
            {"config.json": b"{}", "model.safetensors": weights},
            private=True,
            readers=[hf_token],
        )
        env = dict(s3_env, HF_ENDPOINT=hub.url, HF_TOKEN=hf_token)
        manifest = tmp_path / "manifest.json"
        created = ttfs_cli(
            "create",
            "--models",
            str(models_file),
            "--model-path",
            str(root),
            "-o",
            str(manifest),
            env=env,
        )
        assert created.returncode == 0, created.stderr
        resolved = ttfs_cli(
            "resolve", str(manifest), "--cache-dir", str(tmp_path / "cache"), env=env
        )
        assert resolved.returncode == 0, resolved.stderr
        assert (root / "hf" / "model.safetensors").read_bytes() == weights
        assert (root / "s3" / "config.json").read_bytes() == bucket.files["config.json"]
        hub_log = json.dumps([r.__dict__ for r in hub.log()])
        assert any(r.headers.get("authorization") == f"Bearer {hf_token}" for r in hub.log("hub"))
        assert all("authorization" not in r.headers for r in hub.log("cdn"))
    assert_secret_free({**KEYS}, hub_and_cdn_requests=hub_log)
    # S3 is where the AWS keys belong, yet only the key id travels (in the presigned URL).
    assert_secret_free(
        {"hf token": hf_token, "secret access key": SECRET_KEY}, moto_log=moto.log_text()
    )
    assert_secret_free(
        {"hf token": hf_token, **KEYS},
        create=created.stdout + created.stderr,
        resolve=resolved.stdout + resolved.stderr,
    )
