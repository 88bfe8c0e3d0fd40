"""A manifest's ``models`` list (JIT repos, spec §3.2 step 4) works on every surface.

``ttfs resolve`` and ``ttfs mount`` share :func:`ttfs.create.expand_pointers` with
``lazy_data_resolve``: models are expanded with the creator after the manifest's own pointers
(upstream's CLI uses model_path "" for them, so their names are ``/<volume_folder>/<file>``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_hub import FakeHub
from ttfs.create import expand_pointers
from ttfs.manifest import ModelRepo, parse_manifest

FILES = {"config.json": b'{"a": 1}', "weights.bin": os.urandom(3000)}


def _manifest(repo: str, sha: str, folder: str) -> dict[str, object]:
    return {
        "pointers": [],
        "models": [
            {
                "repo_id": repo,
                "revision": sha,
                "volume_folder": folder,
                "runtime_secret_name": "hf_access_token",
                "kind": "hf",
            }
        ],
    }


def test_expand_pointers_adds_jit_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTFS_CREATE_RETRY_PAUSE", "0.01")
    with FakeHub() as hub:
        repo = hub.add_repo("org/tiny", FILES)
        env = {"HF_ENDPOINT": hub.url, "TTFS_CREATE_RETRY_PAUSE": "0.01"}
        manifest = parse_manifest(json.dumps(_manifest("org/tiny", repo.sha, "tiny")))
        pointers = expand_pointers([manifest], [], "/models", env)
        assert sorted(p.file_name for p in pointers) == [
            "/models/tiny/config.json",
            "/models/tiny/weights.bin",
        ]
        more = expand_pointers([manifest], [ModelRepo("org/tiny", repo.sha, "x")], "/m", env)
        assert len(more) == 4 and {p.file_name.split("/")[2] for p in more} == {"tiny", "x"}
        assert expand_pointers([parse_manifest('{"pointers": []}')], [], "", env) == []


def test_ttfs_resolve_expands_a_models_manifest(tmp_path: Path) -> None:
    """Relative-to-root names: the test roots them in a tmp dir via volume_folder."""
    with FakeHub() as hub:
        repo = hub.add_repo("org/tiny", FILES)
        folder = str(tmp_path / "vol").lstrip("/")  # model_path "" -> "/<folder>/<file>"
        path = tmp_path / "m.json"
        path.write_text(json.dumps(_manifest("org/tiny", repo.sha, folder)))
        env = dict(
            os.environ,
            HF_ENDPOINT=hub.url,
            TTFS_CACHE_DIR=str(tmp_path / "cache"),
            TTFS_CREATE_RETRY_PAUSE="0.01",
        )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "ttfs",
                "resolve",
                str(path),
                str(tmp_path / "unused"),
                "--no-progress",
            ],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
    for name, data in FILES.items():
        assert (tmp_path / "vol" / name).read_bytes() == data
