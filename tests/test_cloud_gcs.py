"""GCS end to end on fake-gcs-server: create a manifest from a prefix, resolve it, mount it.

The service-account path is the real one: the secret is a key file whose ``token_uri`` points
at a local :class:`~tests.emulators.TokenServer`, google-auth signs a JWT grant with its RSA key
and gets an access token, and the provider sends that token as a bearer to the storage endpoint
(``STORAGE_EMULATOR_HOST``) and nowhere else. Checked: the pointers of spec §2.6 and the GCS
oracle of §7.2 (uid ``gcs-<md5>``, hashtype md5, last_modified_time), upstream's errors, bytes
identical after ``ttfs resolve`` and through a mount with every MD5 verified, anonymous access
to the emulator without a secret, and that neither the key nor the token leaks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.emulators import (
    Emulator,
    TokenServer,
    assert_secret_free,
    mount_and_read,
    read_tree,
    run_fake_gcs,
    service_account_json,
    ttfs_cli,
)
from ttfs.config import Settings
from ttfs.create import create_manifest
from ttfs.errors import CredentialError, ManifestError, ObjectNotFound
from ttfs.manifest import ModelRepo
from ttfs.providers import GcsProvider

pytestmark = pytest.mark.slow

SECRET_NAME = "gcs-account"
ACCESS_TOKEN = "ya29.ttfs-" + secrets.token_hex(16)
IGNORES = ("*.pth", "*cache*", "original*", "*.lock", "*.metadata")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    with run_fake_gcs(tmp_path_factory.mktemp("gcs")) as emu:
        yield emu


@pytest.fixture(scope="module")
def token_server() -> Iterator[TokenServer]:
    with TokenServer(ACCESS_TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def key_file(token_server: TokenServer) -> str:
    return service_account_json(token_server.url)


class Bucket:
    """A fresh bucket shaped like spec §7.2's ``gs://llama-3-2-1b-instruct/``."""

    def __init__(self, gcs: Emulator, name: str) -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(
            project="seed",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": gcs.url},
        )
        self.name = name
        self.bucket = client.create_bucket(name)
        rnd = random.Random(name)
        self.files: dict[str, bytes] = {
            "LICENSE.txt": rnd.randbytes(7712),
            "tokenizer.json": rnd.randbytes(90_000),
            "special_tokens_map.json": rnd.randbytes(296),
            "README.md": rnd.randbytes(4174),
            "generation_config.json": rnd.randbytes(189),
            "USE_POLICY.md": rnd.randbytes(6021),
            "config.json": rnd.randbytes(877),
            "tokenizer_config.json": rnd.randbytes(5452),
            ".gitattributes": rnd.randbytes(1519),
            "model.safetensors": rnd.randbytes(2 * 1024 * 1024 + 3),
            "original/consolidated.00.pth": rnd.randbytes(500),
            ".cache/huggingface/download/x.metadata": b"m",
            "model.safetensors.lock": b"",
        }
        for rel, data in self.files.items():
            self.bucket.blob(rel).upload_from_string(data)

    def kept(self) -> dict[str, bytes]:
        from ttfs.create.patterns import keep

        return {k: v for k, v in self.files.items() if keep(k, None, IGNORES)}


@pytest.fixture
def bucket(gcs: Emulator, request: pytest.FixtureRequest) -> Bucket:
    return Bucket(gcs, "ttfs-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16])


@pytest.fixture
def gcs_env(gcs: Emulator, key_file: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    monkeypatch.setenv(f"TRUSS_SECRET_{SECRET_NAME}", key_file)
    return dict(os.environ)


def _repo(bucket: Bucket, prefix: str = "", **kw: Any) -> ModelRepo:
    kw.setdefault("volume_folder", "julien_dummy")
    kw.setdefault("runtime_secret_name", SECRET_NAME)
    uri = f"gs://{bucket.name}/{prefix}" if prefix else f"gs://{bucket.name}/"
    return ModelRepo(repo_id=uri, kind="gcs", **kw)


def _secrets(key_file: str) -> dict[str, str]:
    key = json.loads(key_file)["private_key"]
    body = "".join(key.strip().splitlines()[1:-1])  # the base64 of the key, without PEM lines
    return {"access token": ACCESS_TOKEN, "private key": body[40:120]}


def test_gcs_oracle(bucket: Bucket, gcs_env: dict[str, str], token_server: TokenServer) -> None:
    """Spec §7.2 test_create_bptr_with_gcs, on a bucket the test generates."""
    from truss_transfer import PyModelRepo, create_basetenpointer_from_models

    text = create_basetenpointer_from_models(
        [
            PyModelRepo(
                f"gs://{bucket.name}/",
                volume_folder="julien_dummy",
                kind="gcs",
                ignore_patterns=list(IGNORES),
                runtime_secret_name=SECRET_NAME,
            )
        ]
    )
    pointers = json.loads(text)["pointers"]
    kept = bucket.kept()
    assert len(pointers) == len(kept) == 10
    for p in pointers:
        rel = p["resolution"]["path"]
        md5 = hashlib.md5(kept[rel]).hexdigest()
        assert p["resolution"] == {
            "resolution_type": "gcs",
            "path": rel,
            "bucket_name": bucket.name,
        }
        assert p["uid"] == f"gcs-{md5}"
        assert (p["hashtype"], p["hash"], p["size"]) == ("md5", md5, len(kept[rel]))
        assert p["file_name"] == f"/app/model_cache/julien_dummy/{rel}"
        assert p["runtime_secret_name"] == SECRET_NAME
        stamp = p["last_modified_time"]
        assert stamp.endswith("Z") and stamp[10] == "T" and stamp[4] == "-"
    # the listing went through a real token grant
    assert token_server.requests
    assert all("grant_type" in r["body"] for r in token_server.requests)


def test_creation_errors(
    bucket: Bucket, gcs: Emulator, key_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    with pytest.raises(
        CredentialError,
        match=(
            rf"^Invalid GCS URI: GCS credential '{SECRET_NAME}' not found in environment "
            "variable or file$"
        ),
    ):
        create_manifest([_repo(bucket)])
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    monkeypatch.setenv(f"TRUSS_SECRET_{SECRET_NAME}", "not json")
    with pytest.raises(CredentialError, match=r"^Failed to parse GCS credentials from JSON"):
        create_manifest([_repo(bucket)])
    monkeypatch.setenv(f"TRUSS_SECRET_{SECRET_NAME}", key_file)
    with pytest.raises(ManifestError, match=r"^No objects found for weights source .* prefix 'x/'"):
        create_manifest([_repo(bucket, "x/")])
    with pytest.raises(
        ManifestError,
        match=r"^No objects matched weights filters for source .* Listed 13 object\(s\)",
    ):
        create_manifest([_repo(bucket, allow_patterns=("*.gguf",))])
    with pytest.raises(ObjectNotFound, match=r"^Failed to list objects: gs://no-such-bucket"):
        create_manifest([ModelRepo("gs://no-such-bucket/m", runtime_secret_name=SECRET_NAME)])
    with pytest.raises(ManifestError, match=r"^Invalid GCS URI: URI must start with gs://"):
        create_manifest([ModelRepo("s3://b/k", kind="gcs")])


def test_anonymous_emulator_access(bucket: Bucket, gcs: Emulator, tmp_path: Path) -> None:
    """Against an emulator a missing secret means anonymous access, for listing and reads."""
    env = dict(os.environ, STORAGE_EMULATOR_HOST=gcs.url.removeprefix("http://"))
    manifest = create_manifest(
        [_repo(bucket, allow_patterns=("config.json",))], model_path=str(tmp_path / "m"), env=env
    )
    (pointer,) = manifest.pointers
    seen: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        seen.append(request)

    async def main() -> bytes:
        got = bytearray()
        client = httpx.AsyncClient(event_hooks={"request": [record]})
        provider = GcsProvider(Settings(cache_dir=tmp_path / "c"), client=client, env=env)
        try:
            await provider.read_range(pointer, 0, pointer.size, got.extend)
        finally:
            await provider.aclose()
        return bytes(got)

    assert trio.run(main) == bucket.files["config.json"]
    assert [r.headers.get("authorization") for r in seen] == [None]


def test_token_goes_to_the_storage_host_only(
    bucket: Bucket, gcs_env: dict[str, str], gcs: Emulator, tmp_path: Path
) -> None:
    manifest = create_manifest([_repo(bucket, allow_patterns=("*.json",))])
    seen: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        seen.append(request)

    async def main() -> None:
        client = httpx.AsyncClient(event_hooks={"request": [record]})
        provider = GcsProvider(Settings(cache_dir=tmp_path / "c"), client=client)
        try:
            for pointer in manifest.pointers:
                got = bytearray()
                await provider.read_range(pointer, 0, pointer.size, got.extend)
                rel = pointer.resolution.path  # type: ignore[union-attr]
                assert bytes(got) == bucket.files[rel]
        finally:
            await provider.aclose()

    trio.run(main)
    assert len(seen) == len(manifest.pointers) == 5
    for request in seen:
        assert request.url.host == "127.0.0.1" and request.url.port == gcs.port
        assert request.headers["authorization"] == f"Bearer {ACCESS_TOKEN}"
        assert request.url.path.startswith(f"/download/storage/v1/b/{bucket.name}/o/")


def test_create_resolve_and_mount(
    bucket: Bucket,
    gcs_env: dict[str, str],
    key_file: str,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    root = tmp_path / "model_cache"
    manifest = tmp_path / "manifest.json"
    created = ttfs_cli(
        "create",
        "--gcs",
        f"gs://{bucket.name}",
        *[arg for pattern in IGNORES for arg in ("--ignore", pattern)],
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
        env=gcs_env,
    )
    assert created.returncode == 0, created.stderr
    expected = {f"llama/{k}": v for k, v in bucket.kept().items()}
    resolved = ttfs_cli(
        "resolve",
        str(manifest),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--log-level",
        "debug",
        env=gcs_env,
    )
    assert resolved.returncode == 0, resolved.stderr
    assert read_tree(root) == expected
    assert resolved.stderr.count("(md5)") == len(expected)  # every object verified

    files, status, daemon_log = mount_and_read(
        manifest, str(root), tmp_path / "mnt", tmp_path / "mount-cache", gcs_env
    )
    assert files == expected
    doc = json.loads(status[status.index("{") :].rsplit("}", 1)[0] + "}")
    assert all(f["verified"] for f in doc["files"]), doc["files"]
    assert_secret_free(
        _secrets(key_file),
        create=created.stdout + created.stderr,
        resolve=resolved.stdout + resolved.stderr,
        status=status,
        daemon_log=daemon_log,
    )
    # The token endpoint only ever received JWT grants, never the access token.
    for request in token_server.requests:
        assert ACCESS_TOKEN not in json.dumps(request)
