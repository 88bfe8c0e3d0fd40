"""The fake Hugging Face hub of the benchmarks: metadata from Python, bytes from nginx.

It is the suite's own :class:`demo.origin.Origin` (the hub API ``/api/models/...``, the
``resolve`` route with its 302 and ``X-Linked-Etag``/``X-Linked-Size`` headers, git files
answered inline), with one change: the 302 of a large ("LFS") file points at the benchmark's
nginx (``/cdn/`` or ``/raw/``) instead of the Python CDN listener. So ``snapshot_download``
(``HF_ENDPOINT`` set to the hub) and ttfs (manifest URLs are ``resolve`` URLs) see the same
protocol as against huggingface.co, and every large byte comes from nginx.

It runs in the driver's process (threads; the driver only waits while contenders run), which
lets the benchmark read the hub's counters directly.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import httpx

from demo.origin import Origin

REPO_ID = "bench/model"


class Hub(Origin):
    """An :class:`Origin` whose resolve redirects go to ``cdn_base`` (settable per profile)."""

    def __init__(self, root: Path, cdn_base: str) -> None:
        super().__init__(root, keep_log=False)
        self.cdn_base = cdn_base

    def signed_url(self, rel_path: str) -> str:
        # rel_path is "<org>/<repo>/<file>": nginx serves the same root.
        return f"{self.cdn_base}/{quote(rel_path)}"

    def resolve_url(self, rel: str, revision: str = "main") -> str:
        return self.hf_url(REPO_ID, revision, rel)

    def warm(self) -> None:
        """Hash every file now (sha256 and git ids are computed once per file and cached) so
        that no contender's first request pays for it."""
        r = httpx.get(
            f"{self.base_url}/api/models/{REPO_ID}/revision/main",
            params={"blobs": "true"},
            timeout=600,
        )
        r.raise_for_status()
