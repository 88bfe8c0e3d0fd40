"""Azure end to end on Azurite: create a manifest from a prefix, resolve it, mount it.

Azurite is installed by the fixture (npm) when missing. Checked: the pointers of spec §2.8
(uid ``azure:account:container:blob``, hashtype etag, the listed etag as hash), the URI forms,
upstream's missing-credential text (spec §7.1), the three credential forms (``account_key`` +
``use_emulator``, a connection string, a SAS token), bytes identical after ``ttfs resolve`` and
through a mount, the clear "cannot be verified" notice (an Azure etag is not a content hash),
``If-Match`` turning a rewritten blob into a stale-manifest error, and that the account key
never appears in our output or in any request Azurite logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.emulators import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    Emulator,
    assert_secret_free,
    azurite_connection_string,
    mount_and_read,
    read_tree,
    run_azurite,
    ttfs_cli,
)
from ttfs.config import Settings
from ttfs.create import create_manifest
from ttfs.errors import CredentialError, ManifestError, ObjectNotFound
from ttfs.manifest import ModelRepo
from ttfs.providers import AzureProvider

pytestmark = pytest.mark.slow

SECRET_NAME = "azure-storage"


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    with run_azurite(tmp_path_factory.mktemp("azurite")) as emu:
        yield emu


def _service(azurite: Emulator) -> Any:
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(azurite_connection_string(azurite))


class Container:
    def __init__(self, azurite: Emulator, name: str) -> None:
        self.client = _service(azurite).create_container(name)
        self.name = name
        rnd = random.Random(name)
        self.files: dict[str, bytes] = {
            "config.json": b'{"d_model": 64}',
            "tokenizer.json": rnd.randbytes(50_000),
            "model.safetensors": rnd.randbytes(3 * 1024 * 1024 + 11),
            "README.md": b"# model\n",
            "nested/dir/weights.bin": rnd.randbytes(300_000),
        }
        for rel, data in self.files.items():
            self.put(f"llama/{rel}", data)
        self.put("llama-v2/x.bin", b"sibling prefix")

    def put(self, name: str, data: bytes) -> None:
        self.client.upload_blob(name, data, overwrite=True)

    def etag(self, name: str) -> str:
        return str(self.client.get_blob_client(name).get_blob_properties().etag)


@pytest.fixture
def container(azurite: Emulator, request: pytest.FixtureRequest) -> Container:
    return Container(azurite, "c" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:20])


@pytest.fixture
def az_env(azurite: Emulator, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The upstream secret format, pointed at Azurite the way object_store does."""
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", azurite.url)
    monkeypatch.setenv(
        f"TRUSS_SECRET_{SECRET_NAME}",
        json.dumps({"account_key": AZURITE_KEY, "use_emulator": True}),
    )
    return dict(os.environ)


def _repo(container: Container, prefix: str = "llama", **kw: Any) -> ModelRepo:
    kw.setdefault("volume_folder", "julien_dummy")
    kw.setdefault("runtime_secret_name", SECRET_NAME)
    return ModelRepo(
        repo_id=f"azure://{AZURITE_ACCOUNT}/{container.name}/{prefix}", kind="azure", **kw
    )


def test_create_from_prefix(container: Container, az_env: dict[str, str]) -> None:
    from truss_transfer import PyModelRepo, create_basetenpointer_from_models

    text = create_basetenpointer_from_models(
        [
            PyModelRepo(
                f"azure://{AZURITE_ACCOUNT}/{container.name}/llama/",
                volume_folder="julien_dummy",
                kind="azure",
                ignore_patterns=["*.md"],
                runtime_secret_name=SECRET_NAME,
            )
        ]
    )
    pointers = json.loads(text)["pointers"]
    expected = sorted(k for k in container.files if k != "README.md")
    assert [p["resolution"]["blob_name"] for p in pointers] == [f"llama/{k}" for k in expected]
    for p in pointers:
        blob = p["resolution"]["blob_name"]
        rel = blob.removeprefix("llama/")
        assert p["resolution"] == {
            "resolution_type": "azure",
            "account_name": AZURITE_ACCOUNT,
            "container_name": container.name,
            "blob_name": blob,
        }
        assert p["uid"] == f"azure:{AZURITE_ACCOUNT}:{container.name}:{blob}"
        assert p["hashtype"] == "etag"
        # Upstream's normalised form of the quoted etag (spec §1.4): _0x..._
        assert p["hash"] == "_" + container.etag(blob).strip('"') + "_"
        assert p["hash"].startswith("_0x")
        assert p["size"] == len(container.files[rel])
        assert p["file_name"] == f"/app/model_cache/julien_dummy/{rel}"
        assert p["last_modified_time"].endswith("Z")


def test_creation_errors(
    container: Container, azurite: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # spec §7.1: the accepted outcome of upstream's Azure test
    with pytest.raises(
        CredentialError,
        match="Azure credential 'azure-storage' not found in environment variable or file",
    ):
        create_manifest([_repo(container)])
    monkeypatch.setenv(f"TRUSS_SECRET_{SECRET_NAME}", '{"use_emulator": false}')
    with pytest.raises(CredentialError, match=r"^Failed to parse Azure credentials from JSON"):
        create_manifest([_repo(container)])
    monkeypatch.setenv(
        f"TRUSS_SECRET_{SECRET_NAME}",
        json.dumps({"connection_string": azurite_connection_string(azurite)}),
    )
    with pytest.raises(ManifestError, match=r"^No objects found for weights source .*'nothing'"):
        create_manifest([_repo(container, "nothing")])
    with pytest.raises(
        ManifestError, match=r"^No objects matched weights filters .* Listed 5 object\(s\)"
    ):
        create_manifest([_repo(container, ignore_patterns=("*",))])
    with pytest.raises(ObjectNotFound, match=r"^Failed to list objects: container 'missing'"):
        create_manifest(
            [
                ModelRepo(
                    f"azure://{AZURITE_ACCOUNT}/missing/x",
                    kind="azure",
                    runtime_secret_name=SECRET_NAME,
                )
            ]
        )
    with pytest.raises(ManifestError, match=r"^Invalid Azure URI format"):
        create_manifest([ModelRepo("azure://account/container-only", runtime_secret_name="x")])
    with pytest.raises(CredentialError, match="connection string is for account"):
        create_manifest([ModelRepo("azure://other/c/p", runtime_secret_name=SECRET_NAME)])


def _read_all(
    pointers: tuple[Any, ...], tmp_path: Path
) -> tuple[dict[str, bytes], list[httpx.Request]]:
    """Read every pointer whole through an AzureProvider; return the bytes and the requests."""
    seen: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        seen.append(request)

    async def main() -> dict[str, bytes]:
        got: dict[str, bytes] = {}
        client = httpx.AsyncClient(event_hooks={"request": [record]})
        provider = AzureProvider(Settings(cache_dir=tmp_path / "c"), client=client)
        try:
            for pointer in pointers:
                buf = bytearray()
                await provider.read_range(pointer, 0, pointer.size, buf.extend)
                got[pointer.resolution.blob_name] = bytes(buf)
        finally:
            await provider.aclose()
        return got

    return trio.run(main), seen


def test_connection_string_and_sas_token(
    container: Container, azurite: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    sas = generate_container_sas(
        AZURITE_ACCOUNT,
        container.name,
        account_key=AZURITE_KEY,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1),
    )
    secrets = {
        "connection string": json.dumps({"connection_string": azurite_connection_string(azurite)}),
        "bare connection string": azurite_connection_string(azurite),
        "sas token": json.dumps({"sas_token": sas, "endpoint": f"{azurite.url}/{AZURITE_ACCOUNT}"}),
    }
    for what, secret in secrets.items():
        monkeypatch.setenv(f"TRUSS_SECRET_{SECRET_NAME}", secret)
        manifest = create_manifest([_repo(container, allow_patterns=("*.json",))])
        assert len(manifest.pointers) == 2, what
        got, seen = _read_all(manifest.pointers, tmp_path)
        assert got == {
            "llama/config.json": container.files["config.json"],
            "llama/tokenizer.json": container.files["tokenizer.json"],
        }, what
        for request in seen:
            assert request.url.port == azurite.port
            assert "sig=" in str(request.url) and "authorization" not in request.headers
            assert request.headers["if-match"].startswith('"0x')
            assert AZURITE_KEY not in str(request.url)


def test_create_resolve_and_mount(
    container: Container, az_env: dict[str, str], azurite: Emulator, tmp_path: Path
) -> None:
    root = tmp_path / "model_cache"
    manifest = tmp_path / "manifest.json"
    created = ttfs_cli(
        "create",
        "--azure",
        f"azure://{AZURITE_ACCOUNT}/{container.name}/llama",
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
        env=az_env,
    )
    assert created.returncode == 0, created.stderr
    expected = {f"llama/{k}": v for k, v in container.files.items()}
    resolved = ttfs_cli(
        "resolve",
        str(manifest),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--log-level",
        "debug",
        env=az_env,
    )
    assert resolved.returncode == 0, resolved.stderr
    assert read_tree(root) == expected
    assert resolved.stderr.count("an Azure etag is not a content hash") == len(expected)

    files, status, daemon_log = mount_and_read(
        manifest, str(root), tmp_path / "mnt", tmp_path / "mount-cache", az_env
    )
    assert files == expected
    assert "etag is not a content hash" in status
    debug_log = Path(azurite.extra["debug_log"]).read_text(errors="replace")
    assert "sig=" in debug_log  # SAS reads did reach Azurite
    assert_secret_free(
        {"account key": AZURITE_KEY},
        create=created.stdout + created.stderr,
        resolve=resolved.stdout + resolved.stderr,
        status=status,
        daemon_log=daemon_log,
        azurite_requests=debug_log,
    )


def test_rewritten_blob_is_a_stale_manifest(
    container: Container, az_env: dict[str, str], tmp_path: Path
) -> None:
    manifest = create_manifest(
        [_repo(container, allow_patterns=("config.json",))], model_path=str(tmp_path / "m")
    )
    path = tmp_path / "manifest.json"
    path.write_text(manifest.dumps())
    container.put("llama/config.json", b'{"d_model": 65}')
    done = ttfs_cli("resolve", str(path), "--cache-dir", str(tmp_path / "cache"), env=az_env)
    assert done.returncode == 1
    assert "changed since the manifest was made" in done.stderr
