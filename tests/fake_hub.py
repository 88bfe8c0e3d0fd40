"""A fake Hugging Face Hub that the real ``huggingface_hub`` client and ttfs talk to.

Two stdlib HTTP listeners on 127.0.0.1: the **hub** (API and ``resolve`` URLs) and a **CDN** on
another port (so it is a foreign origin, as on the real Hub: clients must not follow the 302
there with a token, and huggingface_hub reads file metadata from the 302 itself).

Hub routes (docs/reference/test-infra.md §4):

* ``GET /api/models/{repo}[/revision/{rev}]`` - model info: ``id``, ``sha`` (the commit a branch
  resolves to), ``siblings`` (with ``size``/``blobId``/``lfs`` when ``?blobs=true``);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]`` - the file tree, ``recursive`` or not, paginated
  with ``Link: <...>; rel="next"`` (``page_size`` entries per page);
* ``HEAD|GET /{repo}/resolve/{rev}/{path}`` - a git file answers 200 with ``ETag: "<git blob
  sha1>"`` and ``Content-Length``; an LFS file answers 302 to the CDN with ``X-Linked-Etag:
  "<sha256>"`` and ``X-Linked-Size``; both with ``X-Repo-Commit``.

Errors as the Hub spells them (``X-Error-Code`` / ``X-Error-Message``): an unknown repo is 401
``RepoNotFound`` without a token and 404 with one; a private repo is 401 ``RepoNotFound`` unless
the token is one of its readers; a gated repo lists publicly but its files answer 401 (no
token) or 403 (a token that did not accept the conditions) ``GatedRepo``; ``RevisionNotFound``
and ``EntryNotFound`` are 404s.

The CDN serves ``/{repo}/{sha}/{path}?sig=...`` with single ``Range`` support. Every request on
both ports is logged with its headers (:attr:`FakeHub.requests`) so tests can assert where a
token went. ``fail_next`` injects 500s; ``corrupt`` makes the CDN serve wrong bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_THRESHOLD = 10 * 1024 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubFile:
    path: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_sha1(self) -> str:
        return git_blob_sha1(self.data)

    @property
    def etag(self) -> str:
        """What the manifest hash must be: sha256 for LFS, the git blob sha1 otherwise."""
        return self.sha256 if self.lfs else self.git_sha1


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    sha: str
    branches: dict[str, str]
    private: bool = False
    gated: bool = False
    readers: frozenset[str] = frozenset()  # tokens that may read (private) or accepted (gated)


@dataclass
class Request:
    role: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    status: int = 0


@dataclass
class FakeHub:
    page_size: int = 3
    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    fail_next: int = 0  # answer this many next API requests with 500
    corrupt: set[str] = field(default_factory=set)  # CDN paths served with a flipped byte
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._hub = _Server(self, "hub")
        self._cdn = _Server(self, "cdn")

    # -- setup ----------------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        sha: str | None = None,
        lfs: Iterable[str] = (),
        private: bool = False,
        gated: bool = False,
        readers: Iterable[str] = (),
    ) -> HubRepo:
        lfs_names = set(lfs)
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha1(files[name]).digest())
        commit = sha or digest.hexdigest()
        repo = HubRepo(
            repo_id=repo_id,
            files={
                name: HubFile(name, data, name in lfs_names or len(data) >= LFS_THRESHOLD)
                for name, data in files.items()
            },
            sha=commit,
            branches={"main": commit},
            private=private,
            gated=gated,
            readers=frozenset(readers),
        )
        self.repos[repo_id] = repo
        return repo

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self._hub.url

    @property
    def cdn_url(self) -> str:
        return self._cdn.url

    def __enter__(self) -> FakeHub:
        self._hub.start()
        self._cdn.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hub.stop()
        self._cdn.stop()

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def log(self, role: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if role is None or r.role == role]

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_failure(self) -> bool:
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return True
            return False


class _Server:
    def __init__(self, hub: FakeHub, role: str) -> None:
        self.hub = hub
        self.role = role

        class Handler(_Handler):
            server_role = role
            fake = hub

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_role = "hub"
    fake: FakeHub
    _request: Request

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing -------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._handle(head=False)

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def _handle(self, *, head: bool) -> None:
        record = Request(
            self.server_role,
            self.command,
            self.path,
            {k.lower(): v for k, v in self.headers.items()},
        )
        self._request = record
        self.fake._record(record)
        try:
            if self.server_role == "cdn":
                self._cdn(head=head)
            else:
                self._hub(head=head)
        except _HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            body = json.dumps({"error": e.message}).encode()
            self._send(e.status, body, headers, head=head, content_type="application/json")

    def _send(
        self,
        status: int,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        head: bool,
        content_type: str = "application/octet-stream",
        length: int | None = None,
    ) -> None:
        self._request.status = status  # before the reply: the client may look right after it
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, doc: Any, headers: Mapping[str, str] | None = None, *, head: bool) -> None:
        self._send(
            200, json.dumps(doc).encode(), headers, head=head, content_type="application/json"
        )

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    # -- hub ------------------------------------------------------------------------------------
    def _repo(self, repo_id: str, *, files: bool) -> HubRepo:
        token = self._token()
        repo = self.fake.repos.get(repo_id)
        if repo is None or (repo.private and token not in repo.readers):
            if token is None or repo is not None:
                raise _HubError(
                    401, "RepoNotFound", "Repository Not Found / Invalid username or password."
                )
            raise _HubError(404, "RepoNotFound", "Repository not found")
        if files and repo.gated and token not in repo.readers:
            if token is None:
                raise _HubError(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in.",
                )
            raise _HubError(
                403,
                "GatedRepo",
                f"Access to model {repo_id} is restricted and you are not in the authorized list.",
            )
        return repo

    @staticmethod
    def _commit(repo: HubRepo, revision: str) -> str:
        if revision in (repo.sha, *repo.branches):
            return repo.branches.get(revision, revision)
        raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def _hub(self, *, head: bool) -> None:
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        path = split.path
        if path.startswith("/api/"):
            if self.fake._take_failure():
                raise _HubError(500, None, "Internal Error - We're working hard to fix this")
            self._api(path[len("/api/") :], query, head=head)
            return
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            self._resolve(m.group(1), unquote(m.group(2)), unquote(m.group(3)), head=head)
            return
        raise _HubError(404, None, "Not Found")

    def _api(self, rest: str, query: Mapping[str, list[str]], *, head: bool) -> None:
        m = re.match(r"^models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?$", rest)
        if not m:
            raise _HubError(404, None, "Not Found")
        repo_id, kind, revision, sub = m.group(1), m.group(2), m.group(3), m.group(4)
        repo = self._repo(repo_id, files=False)
        commit = self._commit(repo, unquote(revision) if revision else "main")
        if kind == "tree":
            self._tree(repo, commit, unquote(sub or ""), query, head=head)
            return
        blobs = query.get("blobs", ["false"])[0] == "true"
        siblings = []
        for f in sorted(repo.files.values(), key=lambda f: f.path):
            entry: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                entry.update(size=len(f.data), blobId=f.git_sha1)
                if f.lfs:
                    entry["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}
            siblings.append(entry)
        self._json(
            {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": "2025-01-01T00:00:00.000Z",
                "createdAt": "2025-01-01T00:00:00.000Z",
                "siblings": siblings,
            },
            head=head,
        )

    def _tree(
        self,
        repo: HubRepo,
        commit: str,
        sub: str,
        query: Mapping[str, list[str]],
        *,
        head: bool,
    ) -> None:
        recursive = query.get("recursive", ["false"])[0] == "true"
        base = sub.strip("/")
        prefix = base + "/" if base else ""
        entries: dict[str, dict[str, Any]] = {}
        for f in repo.files.values():
            if not f.path.startswith(prefix):
                continue
            rest = f.path[len(prefix) :]
            parts = rest.split("/")
            # directories on the way (all of them when recursive, the first level otherwise)
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                d = prefix + "/".join(parts[:depth])
                entries.setdefault(
                    d, {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "path": d}
                )
            if recursive or len(parts) == 1:
                entry: dict[str, Any] = {
                    "type": "file",
                    "oid": f.git_sha1,
                    "size": len(f.data),
                    "path": f.path,
                }
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
                entries[f.path] = entry
        if base and not entries:
            raise _HubError(404, "EntryNotFound", f"{base} does not exist on {commit}")
        ordered = [entries[k] for k in sorted(entries)]
        start = int(query.get("cursor", ["0"])[0])
        page = ordered[start : start + self.fake.page_size]
        headers = {}
        if start + self.fake.page_size < len(ordered):
            cursor = start + self.fake.page_size
            next_query = f"recursive={str(recursive).lower()}&expand=false&cursor={cursor}"
            sub_path = "/" + quote(base, safe="") if base else ""
            host = self.headers.get("Host", "127.0.0.1")
            url = f"http://{host}/api/models/{repo.repo_id}/tree/{commit}{sub_path}?{next_query}"
            headers["Link"] = f'<{url}>; rel="next"'
        self._json(page, headers, head=head)

    def _resolve(self, repo_id: str, revision: str, path: str, *, head: bool) -> None:
        repo = self._repo(repo_id, files=True)
        commit = self._commit(repo, revision)
        f = repo.files.get(path)
        if f is None:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {commit}")
        common = {"X-Repo-Commit": commit}
        if f.lfs:
            location = (
                f"{self.fake.cdn_url}/{repo_id}/{commit}/{quote(path)}?sig="
                + hashlib.sha256(path.encode()).hexdigest()[:16]
            )
            self._send(
                302,
                b"",
                {
                    **common,
                    "Location": location,
                    "X-Linked-Etag": f'"{f.sha256}"',
                    "X-Linked-Size": str(len(f.data)),
                    "ETag": f'W/"{f.git_sha1}"',
                },
                head=head,
            )
            return
        self._serve(f.data, {**common, "ETag": f'"{f.git_sha1}"'}, head=head)

    # -- cdn ------------------------------------------------------------------------------------
    def _cdn(self, *, head: bool) -> None:
        split = urlsplit(self.path)
        m = re.match(r"^/([^/]+/[^/]+)/([0-9a-f]{40})/(.+)$", split.path)
        if not m or "sig" not in parse_qs(split.query):
            raise _HubError(403, None, "AccessDenied")
        repo = self.fake.repos.get(m.group(1))
        path = unquote(m.group(3))
        f = repo.files.get(path) if repo else None
        if f is None:
            raise _HubError(404, None, "NoSuchKey")
        data = f.data
        if path in self.fake.corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        self._serve(data, {"ETag": f'"{f.sha256}"'}, head=head)

    def _serve(self, data: bytes, headers: Mapping[str, str], *, head: bool) -> None:
        headers = {**headers, "Accept-Ranges": "bytes"}
        spec = self.headers.get("Range")
        m = _RANGE.match(spec.strip()) if spec else None
        if not m or (not m.group(1) and not m.group(2)):
            self._send(200, data, headers, head=head)
            return
        size = len(data)
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:
            start, end = max(0, size - int(m.group(2))), size - 1
        if start >= size or end < start:
            self._send(416, b"", {**headers, "Content-Range": f"bytes */{size}"}, head=head)
            return
        self._send(
            206,
            data[start : end + 1],
            {**headers, "Content-Range": f"bytes {start}-{end}/{size}"},
            head=head,
        )
