"""Manifest creation: model repos and bucket prefixes in, a bptr manifest out (spec §2).

``create_manifest(repos, model_path)`` is what ``create_basetenpointer_from_models``, JIT models
at resolve time (spec §3.2 step 4) and ``ttfs create`` call. Repos are processed in order, each
by the provider its ``kind`` and ``repo_id`` pick (routing of spec §2.2); any error aborts the
whole call. The result has ``models: null``.

Only this package and :mod:`ttfs.providers` talk to the vendor SDKs, and they import them
lazily, so creating an HF-only manifest never loads boto3, and vice versa.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

from ..manifest import (
    Manifest,
    ModelRepo,
    Pointer,
    log_expired,
    merge_pointers,
    validate_pointers,
)

__all__ = ["DEFAULT_MODEL_PATH", "create_manifest", "create_pointers", "route"]

log = logging.getLogger(__name__)

DEFAULT_MODEL_PATH = "/app/model_cache"


def route(repo: ModelRepo) -> str:
    """The provider for a repo: ``"hf"``, ``"gcs"``, ``"s3"`` or ``"azure"`` (spec §2.2).

    ``kind`` gcs/s3/azure wins whatever the ``repo_id`` says (a mismatching URI then fails in
    parsing, after a warning); ``http``/``hf`` look at the ``repo_id`` scheme.
    """
    kind = repo.normalized_kind
    rid = repo.repo_id
    if kind in ("gcs", "s3", "azure"):
        expected = {"gcs": ("gs://",), "s3": ("s3://",), "azure": ("azure://", "https://")}[kind]
        if not rid.startswith(expected):
            log.warning("repo %s has kind %s but does not look like a %s URI", rid, kind, kind)
        return kind
    if rid.startswith("gs://"):
        return "gcs"
    if rid.startswith("s3://"):
        return "s3"
    if rid.startswith("azure://") or ".blob.core.windows.net" in rid:
        return "azure"
    return "hf"


def create_pointers(
    repo: ModelRepo, model_path: str = DEFAULT_MODEL_PATH, env: Mapping[str, str] | None = None
) -> list[Pointer]:
    """The pointers of one repo (see :func:`create_manifest`)."""
    # Imported here: the SDK wrappers (and httpx) cost ~0.3 s, which a mount or resolve of a
    # manifest without JIT models never needs.
    from .cloud import create_azure, create_gcs, create_s3
    from .huggingface import create_hf

    provider = route(repo)
    if provider == "gcs":
        return create_gcs(repo, model_path, env)
    if provider == "s3":
        return create_s3(repo, model_path, env)
    if provider == "azure":
        return create_azure(repo, model_path, env)
    return create_hf(repo, model_path, env)


def create_manifest(
    repos: Sequence[ModelRepo],
    model_path: str = DEFAULT_MODEL_PATH,
    env: Mapping[str, str] | None = None,
) -> Manifest:
    """A manifest with the pointers of every repo, in order.

    ``env`` (default ``os.environ``) supplies secrets (``TRUSS_SECRET_*``, ``HF_TOKEN``),
    ``HF_ENDPOINT``, ``AWS_ENDPOINT_URL``, ``STORAGE_EMULATOR_HOST`` and the like.

    Raises:
        ManifestError: a bad URI, or nothing listed / nothing matched the patterns.
        CredentialError: a cloud secret is missing or malformed.
        ProviderError: the hub or the store refused or failed (not found, denied, gated...).
        ConfigError: the SDK a source needs is not installed.
    """
    env = os.environ if env is None else env
    pointers: list[Pointer] = []
    for repo in repos:
        found = create_pointers(repo, model_path, env)
        log.info("%s: %d file(s)", repo.repo_id, len(found))
        pointers.extend(found)
    return Manifest(pointers=tuple(pointers), models=None, source="<created>")


def expand_pointers(
    manifests: Sequence[Manifest],
    models: Sequence[ModelRepo] = (),
    model_path: str = "",
    env: Mapping[str, str] | None = None,
    *,
    collisions: bool = True,
) -> list[Pointer]:
    """Every pointer a resolve or mount serves: the manifests' pointers plus their JIT models.

    Spec §3.2 steps 3-6: the ``models`` of every manifest (after ``models`` given by the caller)
    are expanded with the creator using ``model_path`` ("" from the CLIs, as upstream), the
    result is merged after the manifests (§3.4) and validated (§3.5). Without models nothing
    touches the network. ``collisions=False``: the caller checks file/directory collisions
    itself (a mount's tree does, while it builds).

    Raises:
        ManifestError: a bad or hostile pointer, or a JIT model that lists nothing.
        CredentialError, ProviderError, ConfigError: expanding a JIT model failed.
    """
    jit = list(models)
    for manifest in manifests:
        jit.extend(manifest.models or ())
    merged = list(manifests)
    if jit:
        merged.append(create_manifest(jit, model_path, env))
    pointers = merge_pointers(merged)
    lone = merged[0] if len(merged) == 1 else None
    if lone is not None and lone.validated and (lone.collisions_checked or not collisions):
        # One parsed manifest: the parser ran the same checks on these very pointers (merging
        # only drops exact repeats), so only the expiry warning is left to give.
        log_expired(pointers)
    else:
        validate_pointers(pointers, collisions=collisions)
    return pointers
