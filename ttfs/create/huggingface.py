"""Pointers for a Hugging Face model repo (spec §2.4), through huggingface_hub.

One attempt: resolve the revision to a commit (``model_info``), list the files at that commit
(the paginated tree API), filter them (§2.3), then ``HEAD`` every kept file's resolve URL, at
most 20 at a time, reading the hash and size from the response itself: an LFS file answers 302
with ``X-Linked-Etag`` (its sha256) and ``X-Linked-Size``; a small file answers 200 with
``ETag`` (its git blob sha1) and ``Content-Length``. The block store later verifies downloaded
bytes against exactly these hashes. Up to 3 attempts, with a pause between them
(``TTFS_CREATE_RETRY_PAUSE`` seconds, default 5 as upstream); definite answers (not found,
gated, unauthorized, unknown revision) are not retried.

Beyond upstream: ``HF_ENDPOINT`` is honoured (mirrors, private hubs) for both the API calls and
the pointer URLs, and errors name the repo and say why. Pointers are sorted by file name.

The token comes from the secret rules for HF (§3.10: the file, then ``HF_TOKEN``, then
``HUGGING_FACE_HUB_TOKEN``); none means anonymous - never the token cached on this machine
by ``hf auth login``, which a manifest build must not pick up by accident.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import AccessDenied, ManifestError, ObjectNotFound, ProviderError, TtfsError
from ..manifest import HttpResolution, ModelRepo, Pointer
from ..providers._sdk import sdk
from ..providers.credentials import scrub
from ..secrets import get_hf_token
from .cloud import normalize_hash
from .patterns import filter_paths, show_patterns

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
EXPIRATION = 4044816725
"""The ``expiration_timestamp`` of HF pointers (upstream's constant, in 2098)."""
MAX_IN_FLIGHT = 20
ATTEMPTS = 3
RETRY_PAUSE_ENV = "TTFS_CREATE_RETRY_PAUSE"


class _Definite(Exception):
    """An answer that another attempt will not change; carries the error to raise."""

    def __init__(self, error: TtfsError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True, slots=True)
class _File:
    path: str
    size: int | None
    etag: str | None  # from the tree: LFS sha256 or git blob id, a fallback only


def hf_endpoint(env: Mapping[str, str] | None = None) -> str:
    """``HF_ENDPOINT`` without a trailing ``/``, or ``https://huggingface.co``."""
    env = os.environ if env is None else env
    return (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")


def retry_pause(env: Mapping[str, str] | None = None) -> float:
    env = os.environ if env is None else env
    raw = env.get(RETRY_PAUSE_ENV)
    try:
        return max(0.0, float(raw)) if raw else 5.0
    except ValueError:
        return 5.0


def _secret_hint(repo: ModelRepo, token: str | None) -> str:
    name = repo.runtime_secret_name
    if token is None:
        return (
            f"no token found for secret '{name}' (checked the secrets file, HF_TOKEN and "
            "HUGGING_FACE_HUB_TOKEN)"
        )
    return f"the token of secret '{name}' was refused"


def _hub_error(e: Exception, repo: ModelRepo, token: str | None, endpoint: str) -> _Definite | None:
    """Translate a huggingface_hub error into ours; None when it is worth another attempt."""
    errors = sdk("huggingface_hub.errors")
    where = f"Invalid metadata: Failed to get repo info for {repo.repo_id}"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, errors.GatedRepoError):
        return _Definite(
            AccessDenied(
                f"{where}: the repo is gated: accept its conditions at {endpoint}/{repo.repo_id} "
                f"with the account of the token; {_secret_hint(repo, token)}"
            )
        )
    if isinstance(e, errors.RevisionNotFoundError):
        return _Definite(
            ObjectNotFound(f"{where}: revision '{repo.revision}' not found in {repo.repo_id}")
        )
    # huggingface_hub < 1.0 called the remote one EntryNotFoundError
    entry_not_found = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
    if isinstance(e, entry_not_found):
        return _Definite(ObjectNotFound(f"{where}: file not found: {e.server_message or e}"))
    if isinstance(e, errors.RepositoryNotFoundError) or status in (401, 403):
        if status == 401 or (status == 403 and token is not None):
            return _Definite(
                AccessDenied(
                    f"{where}: unauthorized: the repo is private or does not exist, and "
                    f"{_secret_hint(repo, token)}"
                )
            )
        return _Definite(ObjectNotFound(f"{where}: repository not found at {endpoint}"))
    if (
        isinstance(e, errors.HfHubHTTPError)
        and status is not None
        and 400 <= status < 500
        and status not in (408, 429)
    ):
        return _Definite(ProviderError(f"{where}: HTTP {status}: {e.server_message or e}"))
    return None


def _attempt(
    api: Any, repo: ModelRepo, endpoint: str, token: str | None
) -> tuple[str, list[_File], dict[str, tuple[str, int]]]:
    """One attempt: (commit sha, kept files, {file: (etag, size)})."""
    hub = sdk("huggingface_hub")
    info = api.model_info(repo.repo_id, revision=repo.revision or None)
    sha = info.sha
    if not sha:
        raise ProviderError(f"the hub returned no commit sha for {repo.repo_id}")
    files: list[_File] = []
    for entry in api.list_repo_tree(repo.repo_id, revision=sha, recursive=True):
        if getattr(entry, "type", "file") == "directory" or not hasattr(entry, "size"):
            continue
        lfs = getattr(entry, "lfs", None)
        fallback = getattr(lfs, "sha256", None) if lfs is not None else None
        files.append(_File(entry.path, entry.size, fallback or getattr(entry, "blob_id", None)))
    names = filter_paths((f.path for f in files), repo.allow_patterns, repo.ignore_patterns)
    if not names:
        raise _Definite(
            ManifestError(
                f"{repo.repo_id}: No files matched weights filters. Listed {len(files)} file(s), "
                f"allow_patterns={show_patterns(repo.allow_patterns)}, "
                f"ignore_patterns={show_patterns(repo.ignore_patterns)}"
            )
        )
    kept = {f.path: f for f in files}

    def head(name: str) -> tuple[str, tuple[str, int]]:
        url = hub.hf_hub_url(repo.repo_id, name, revision=sha, endpoint=endpoint)
        meta = hub.get_hf_file_metadata(url, token=token or False, endpoint=endpoint)
        tree = kept[name]
        etag = meta.etag or tree.etag or ""
        size = meta.size if meta.size is not None else (tree.size or 0)
        return name, (etag, int(size))

    with ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT, thread_name_prefix="ttfs-hf") as pool:
        metadata = dict(pool.map(head, sorted(set(names))))
    return sha, [kept[n] for n in sorted(set(names))], metadata


def create_hf(
    repo: ModelRepo,
    model_path: str,
    env: Mapping[str, str] | None = None,
    *,
    endpoint: str | None = None,
    pause: float | None = None,
) -> list[Pointer]:
    """Pointers for one Hugging Face repo at ``repo.revision``.

    Raises:
        ObjectNotFound: the repo, the revision or a file does not exist.
        AccessDenied: the repo is private or gated and the token cannot read it.
        ManifestError: no file survives the filters.
        ProviderError: the hub kept failing (after 3 attempts).
    """
    hub = sdk("huggingface_hub")
    endpoint = (endpoint or hf_endpoint(env)).rstrip("/")
    pause = retry_pause(env) if pause is None else pause
    token = get_hf_token(repo.runtime_secret_name, env)
    api = hub.HfApi(endpoint=endpoint, token=token or False, library_name="ttfs")
    last: Exception | None = None
    for attempt in range(1, ATTEMPTS + 1):
        try:
            sha, files, metadata = _attempt(api, repo, endpoint, token)
            break
        except _Definite as e:
            raise e.error from None
        except TtfsError:
            raise
        except Exception as e:
            definite = _hub_error(e, repo, token, endpoint)
            if definite is not None:
                raise definite.error from None
            last = e
            print(f"Attempt {attempt} failed: {scrub(_one_line(e), (token,))}", file=sys.stderr)
            if attempt < ATTEMPTS:
                time.sleep(pause)
    else:
        raise ProviderError(
            f"Invalid metadata: Failed to get repo info for {repo.repo_id}: "
            f"{scrub(_one_line(last), (token,)) if last else 'unknown error'}"
        )
    if repo.revision != sha:
        print(
            f"Warning: Huggingface revision {repo.revision} is not fixed, using {sha} instead. "
            f"Please update your code to use `revision={sha}` instead otherwise its unclear "
            "which files you want to download and will update in future deployments.",
            file=sys.stderr,
        )
    base = f"{model_path}/{repo.volume_folder}"
    pointers = []
    for f in files:
        etag, size = metadata[f.path]
        url = hub.hf_hub_url(repo.repo_id, f.path, revision=sha, endpoint=endpoint)
        pointers.append(
            Pointer(
                resolution=HttpResolution(url=url, expiration_timestamp=EXPIRATION),
                uid=f"{repo.repo_id}:{repo.revision}:{f.path}",
                file_name=_join(base, f.path),
                hashtype="etag",
                hash=normalize_hash(etag.replace('"', "")),
                size=size,
                runtime_secret_name=repo.runtime_secret_name,
            )
        )
    return pointers


def _join(base: str, rel: str) -> str:
    """Path join as upstream's ``PathBuf::join``: an absolute ``rel`` replaces ``base``."""
    if rel.startswith("/"):
        return rel
    return base + rel if base.endswith("/") else f"{base}/{rel}"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
