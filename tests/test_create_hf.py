"""Hugging Face manifests through the real huggingface_hub client against the fake hub.

Reproduces spec §7.2 ``test_dolly`` on a repo the test generates (8 files, same names, keys,
uid/file_name/url formats, expiration 4044816725, hashtype etag, hashes = sha256 of LFS files
and git blob sha1 of the others), then the rest of issue 4's HF part: the branch warning,
``HF_ENDPOINT``, pagination, patterns, private and gated repos with tokens from the secret rules,
clear errors (not found, unauthorized, gated, unknown revision), retries, JIT models, and a
create → resolve → mount round trip in which downloaded bytes are verified against the hashes
and the token reaches the hub only (never the CDN, never our output).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.emulators import assert_secret_free, mount_and_read, read_tree, ttfs_cli
from tests.fake_hub import FakeHub, HubRepo
from ttfs.create import create_manifest
from ttfs.errors import AccessDenied, ManifestError, ObjectNotFound
from ttfs.manifest import ModelRepo

DOLLY = "julien-c/dummy-unknown"
DOLLY_SHA = "60b8d3fe22aebb024b573f1cca224db3126d10f3"
TOKEN = "hf_ttfs_" + "".join(random.Random().choices("abcdefghijklmnop", k=24))
WRONG_TOKEN = "hf_wrong_token_0123456789"
EXPIRATION = 4044816725


def _dolly_files() -> dict[str, bytes]:
    rnd = random.Random(1)
    return {
        "config.json": rnd.randbytes(496),
        "tf_model.h5": rnd.randbytes(157312),
        "merges.txt": rnd.randbytes(36),
        ".gitattributes": rnd.randbytes(391),
        "README.md": rnd.randbytes(1114),
        "vocab.json": rnd.randbytes(239),
        "flax_model.msgpack": rnd.randbytes(58499),
        "pytorch_model.bin": rnd.randbytes(10 * 1024 * 1024 + 65074),  # >= 10 MiB: LFS
    }


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with FakeHub(page_size=3) as fake:
        fake.add_repo(
            DOLLY, _dolly_files(), sha=DOLLY_SHA, lfs=("tf_model.h5", "flax_model.msgpack")
        )
        rnd = random.Random(2)
        nested = {f"shards/model-{i:05d}.safetensors": rnd.randbytes(1000 + i) for i in range(4)}
        nested.update(
            {
                "config.json": b'{"a": 1}',
                "tokenizer/tokenizer.json": rnd.randbytes(2000),
                "original/consolidated.pth": rnd.randbytes(100),
                "README.md": b"# nested\n",
            }
        )
        fake.add_repo("org/nested", nested)
        private = {
            "private.json": b'{"private": true}',
            "model.safetensors": rnd.randbytes(10 << 20),
        }
        fake.add_repo("org/private", private, private=True, readers=[TOKEN])
        fake.add_repo("org/gated", {"config.json": b"{}"}, gated=True, readers=[TOKEN])
        yield fake


@pytest.fixture
def hf_env(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("TTFS_CREATE_RETRY_PAUSE", "0.01")
    hub.clear()
    return dict(os.environ)


def _secret_file(name: str, value: str) -> None:
    (Path(os.environ["TTFS_SECRETS_DIR"]) / name).write_text(value + "\n")


def test_dolly(hub: FakeHub, hf_env: dict[str, str], capfd: pytest.CaptureFixture[str]) -> None:
    """Spec §7.2 test_dolly, against the fake hub (HF_ENDPOINT honoured)."""
    from truss_transfer import PyModelRepo, create_basetenpointer_from_models

    text = create_basetenpointer_from_models(
        [
            PyModelRepo(
                repo_id=DOLLY,
                revision=DOLLY_SHA,
                runtime_secret_name="hf_access_token_2",
                volume_folder="julien_dummy",
            )
        ],
        "/app/model_cache",
    )
    doc = json.loads(text)
    assert doc["models"] is None
    pointers = doc["pointers"]
    repo: HubRepo = hub.repos[DOLLY]
    assert len(pointers) == 8
    assert sorted(p["file_name"] for p in pointers) == [p["file_name"] for p in pointers]
    for p in pointers:
        name = p["file_name"].removeprefix("/app/model_cache/julien_dummy/")
        f = repo.files[name]
        assert list(p) == [
            "resolution",
            "uid",
            "file_name",
            "hashtype",
            "hash",
            "size",
            "runtime_secret_name",
        ]
        assert p["resolution"] == {
            "resolution_type": "http",
            "url": f"{hub.url}/{DOLLY}/resolve/{DOLLY_SHA}/{name}",
            "expiration_timestamp": EXPIRATION,
        }
        assert p["uid"] == f"{DOLLY}:{DOLLY_SHA}:{name}"
        assert p["hashtype"] == "etag"
        assert p["hash"] == f.etag
        assert p["size"] == len(f.data)
        assert p["runtime_secret_name"] == "hf_access_token_2"
    by_name = {p["file_name"].rsplit("/", 1)[1]: p for p in pointers}
    assert len(by_name["pytorch_model.bin"]["hash"]) == 64  # LFS: sha256
    assert len(by_name["tf_model.h5"]["hash"]) == 64
    assert len(by_name["config.json"]["hash"]) == 40  # git blob sha1
    assert by_name["config.json"]["size"] == 496
    assert "Warning: Huggingface revision" not in capfd.readouterr().err
    # metadata came from the 302 itself: the CDN saw no HEAD (and nothing else)
    assert hub.log("cdn") == []
    heads = [r for r in hub.log("hub") if r.method == "HEAD"]
    assert len(heads) == 8 and {r.status for r in heads} == {200, 302}


def test_branch_is_resolved_with_the_upstream_warning(
    hub: FakeHub, hf_env: dict[str, str], capfd: pytest.CaptureFixture[str]
) -> None:
    manifest = create_manifest(
        [ModelRepo(DOLLY, revision="main", volume_folder="d", allow_patterns=("*.json",))]
    )
    err = capfd.readouterr().err
    assert (
        f"Warning: Huggingface revision main is not fixed, using {DOLLY_SHA} instead. "
        f"Please update your code to use `revision={DOLLY_SHA}` instead" in err
    )
    assert [p.uid for p in manifest.pointers] == [
        f"{DOLLY}:main:config.json",
        f"{DOLLY}:main:vocab.json",
    ]
    assert all(f"/resolve/{DOLLY_SHA}/" in p.resolution.url for p in manifest.pointers)  # type: ignore[union-attr]


def test_patterns_and_pagination(hub: FakeHub, hf_env: dict[str, str]) -> None:
    manifest = create_manifest(
        [
            ModelRepo(
                "org/nested",
                revision="main",
                volume_folder="n",
                allow_patterns=("*.safetensors", "*.json"),
                ignore_patterns=("original*", "*00003*"),
            )
        ],
        model_path="/models",
    )
    assert [p.file_name for p in manifest.pointers] == [
        "/models/n/config.json",
        "/models/n/shards/model-00000.safetensors",
        "/models/n/shards/model-00001.safetensors",
        "/models/n/shards/model-00002.safetensors",
        "/models/n/tokenizer/tokenizer.json",
    ]
    pages = [r for r in hub.log("hub") if "/tree/" in r.path]
    assert len(pages) >= 4 and any("cursor=" in r.path for r in pages)  # Link pagination
    with pytest.raises(
        ManifestError,
        match=(
            r"org/nested: No files matched weights filters\. Listed 8 file\(s\), "
            r"allow_patterns=\['\*\.gguf'\], ignore_patterns=None"
        ),
    ):
        create_manifest([ModelRepo("org/nested", revision="main", allow_patterns=("*.gguf",))])
    # empty volume folder and model path "" (JIT from the CLI): still absolute, as upstream
    (first, *_) = create_manifest(
        [ModelRepo("org/nested", allow_patterns=("config.json",))], model_path=""
    ).pointers
    assert first.file_name == "/config.json"


def test_private_repo(
    hub: FakeHub, hf_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = ModelRepo("org/private", revision="main", runtime_secret_name="hf-token")
    with pytest.raises(AccessDenied) as info:
        create_manifest([repo])
    message = str(info.value)
    assert message.startswith("Invalid metadata: Failed to get repo info for org/private: ")
    assert "unauthorized" in message and "no token found for secret 'hf-token'" in message
    _secret_file("hf-token", WRONG_TOKEN)
    with pytest.raises(AccessDenied, match="the token of secret 'hf-token' was refused"):
        create_manifest([repo])
    _secret_file("hf-token", TOKEN)
    manifest = create_manifest([repo])
    assert [p.size for p in manifest.pointers] == [10 << 20, 17]
    # HF_TOKEN works for any secret name when the file is missing (upstream code, not README)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert create_manifest([ModelRepo("org/private", runtime_secret_name="absent")]).pointers
    # the token went to the hub only, and no error text carried it
    for request in hub.log():
        if request.role == "cdn":
            assert "authorization" not in request.headers
    assert TOKEN not in message and WRONG_TOKEN not in message


def test_gated_repo(hub: FakeHub, hf_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    repo = ModelRepo("org/gated", revision="main")
    with pytest.raises(AccessDenied, match="the repo is gated: accept its conditions at"):
        create_manifest([repo])
    monkeypatch.setenv("HF_TOKEN", WRONG_TOKEN)
    with pytest.raises(AccessDenied, match=r"gated.*was refused"):
        create_manifest([repo])
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    (pointer,) = create_manifest([repo]).pointers
    assert pointer.size == 2


def test_not_found_and_bad_revision(
    hub: FakeHub, hf_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(AccessDenied, match="org/missing: unauthorized: the repo is private or"):
        create_manifest([ModelRepo("org/missing", revision="main")])
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ObjectNotFound, match="org/missing: repository not found at http"):
        create_manifest([ModelRepo("org/missing", revision="main")])
    with pytest.raises(ObjectNotFound, match=f"revision 'nope' not found in {DOLLY}"):
        create_manifest([ModelRepo(DOLLY, revision="nope")])


def test_transient_errors_are_retried(
    hub: FakeHub, hf_env: dict[str, str], capfd: pytest.CaptureFixture[str]
) -> None:
    hub.fail_next = 2
    manifest = create_manifest([ModelRepo(DOLLY, revision=DOLLY_SHA, allow_patterns=("*.txt",))])
    # no volume folder: HF joins paths (no "//"), as upstream's PathBuf::join
    assert [p.file_name for p in manifest.pointers] == ["/app/model_cache/merges.txt"]
    err = capfd.readouterr().err
    assert "Attempt 1 failed:" in err and "Attempt 2 failed:" in err
    hub.fail_next = 3
    with pytest.raises(Exception, match="Failed to get repo info for julien-c/dummy-unknown"):
        create_manifest([ModelRepo(DOLLY, revision=DOLLY_SHA)])
    hub.fail_next = 0


def test_direct_download(hub: FakeHub, hf_env: dict[str, str], tmp_path: Path) -> None:
    """Spec §7.2 test_direct_download: JIT models in lazy_data_resolve."""
    from truss_transfer import PyModelRepo, lazy_data_resolve

    os.environ["TTFS_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        lazy_data_resolve(
            "",
            [
                PyModelRepo(
                    DOLLY,
                    "main",
                    runtime_secret_name="none",
                    volume_folder="julien_dummy",
                    allow_patterns=["config.json", "pytorch_model.bin"],
                )
            ],
            str(tmp_path / "data"),
        )
    finally:
        del os.environ["TTFS_CACHE_DIR"]
    config = tmp_path / "data" / "julien_dummy" / "config.json"
    assert config.stat().st_size == 496
    weights = tmp_path / "data" / "julien_dummy" / "pytorch_model.bin"
    assert weights.read_bytes() == hub.repos[DOLLY].files["pytorch_model.bin"].data


def test_create_resolve_and_mount_private(
    hub: FakeHub, hf_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(hf_env, HF_TOKEN=TOKEN)
    root = tmp_path / "model_cache"
    manifest = tmp_path / "manifest.json"
    created = ttfs_cli(
        "create",
        "--hf",
        "org/private@main",
        "--hf",
        f"{DOLLY}@{DOLLY_SHA}",
        "--ignore",
        "tf_model.h5",
        "--volume-folder",
        "m",
        "--model-path",
        str(root),
        "-o",
        str(manifest),
        "--log-level",
        "debug",
        env=env,
    )
    assert created.returncode == 0, created.stderr
    assert "Warning: Huggingface revision main is not fixed" in created.stderr
    files = {**hub.repos["org/private"].files, **hub.repos[DOLLY].files}
    expected = {f"m/{k}": f.data for k, f in files.items() if k != "tf_model.h5"}
    hub.clear()
    resolved = ttfs_cli(
        "resolve",
        str(manifest),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--log-level",
        "debug",
        env=env,
    )
    assert resolved.returncode == 0, resolved.stderr
    assert read_tree(root) == expected
    # every file verified against the hub's hashes: sha256 for LFS, git blob sha1 otherwise
    assert resolved.stderr.count("(sha256)") == 3  # model.safetensors, .bin, .msgpack
    assert resolved.stderr.count("(git-sha1)") == len(expected) - 3

    mounted, status, daemon_log = mount_and_read(
        manifest, str(root), tmp_path / "mnt", tmp_path / "mount-cache", env
    )
    assert mounted == expected
    assert "sha256" in status and "git-sha1" in status
    cdn = hub.log("cdn")
    assert cdn and all("authorization" not in r.headers for r in cdn)
    private_hub = [r for r in hub.log("hub") if "org/private" in r.path]
    assert private_hub and all(
        r.headers.get("authorization") == f"Bearer {TOKEN}" for r in private_hub
    )
    assert_secret_free(
        {"token": TOKEN},
        create=created.stdout + created.stderr,
        resolve=resolved.stdout + resolved.stderr,
        status=status,
        daemon_log=daemon_log,
        cdn_requests=json.dumps([r.__dict__ for r in cdn]),
    )


def test_corrupt_download_is_caught(hub: FakeHub, hf_env: dict[str, str], tmp_path: Path) -> None:
    manifest = create_manifest(
        [ModelRepo(DOLLY, revision=DOLLY_SHA, allow_patterns=("flax_model.msgpack",))],
        model_path=str(tmp_path / "m"),
    )
    path = tmp_path / "manifest.json"
    path.write_text(manifest.dumps())
    hub.corrupt.add("flax_model.msgpack")
    try:
        done = ttfs_cli("resolve", str(path), "--cache-dir", str(tmp_path / "cache"), env=hf_env)
    finally:
        hub.corrupt.clear()
    assert done.returncode == 1
    assert "content does not match sha256" in done.stderr
    assert not list((tmp_path / "m").rglob("flax_model.msgpack"))
