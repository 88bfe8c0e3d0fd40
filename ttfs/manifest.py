"""Baseten pointer ("bptr") manifests: parse, validate, merge and emit them.

A manifest is a JSON (or YAML) document ``{"pointers": [...], "models": null | [...]}`` in
which every pointer names one file: where to fetch it (its *resolution*), where to put it
(``file_name``), its size and a content hash used as a cache key. The format and the lookup,
merge and validation rules are those of Baseten's ``truss_transfer`` (see the spec, §1 and
§3.3-3.5), so manifests written by ``truss build`` work unchanged.

Why this module is stricter than upstream: a manifest decides which paths we write and which
cache files we name, so a hostile or broken one must be stopped before any byte moves.
:func:`parse_manifest` therefore rejects, with one line naming the manifest and the pointer
index, what upstream lets through: ``..`` components in ``file_name`` (path traversal), a hash
that is empty, ``.``/``..`` or contains ``/`` or NUL (it names a cache file), sizes that are not
plain integers in ``[0, 1 PiB]``, wrongly typed fields, and two pointers whose paths collide as
file versus directory. Everything upstream accepts and a real manifest uses still parses:
absolute file names, the historic untagged http resolution, the tag in any key position,
unknown keys, exact duplicates and same-name/different-hash pairs (the merge resolves those).

Manifests are looked up at the three upstream paths (:data:`MANIFEST_PATHS`); tests and
non-root users point ``TTFS_MANIFEST_PATHS`` (an ``os.pathsep``-separated list) elsewhere.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from ttfs.errors import ManifestError

log = logging.getLogger(__name__)

DEFAULT_SECRET_NAME = "hf_access_token"
"""Secret name a pointer or model uses when it does not say (upstream default)."""

MANIFEST_PATHS: tuple[str, ...] = (
    "/bptr/bptr-manifest",
    "/bptr/bptr-manifest.json",
    "/static-bptr/static-bptr-manifest.json",
)
"""Where manifests are looked up, in merge order (spec §1.11)."""

MANIFEST_PATHS_ENV = "TTFS_MANIFEST_PATHS"
"""Overrides :data:`MANIFEST_PATHS` with an ``os.pathsep``-separated list (empty: no paths)."""

MAX_SIZE = 2**50
"""Largest ``size`` a pointer may declare (1 PiB); anything larger is treated as hostile."""

MODEL_KINDS: frozenset[str] = frozenset({"http", "hf", "gcs", "s3", "azure"})
"""Accepted ``ModelRepo.kind`` values; ``"hf"`` is an alias of ``"http"``."""

_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1
_MAX_SHOWN = 200  # longest user string quoted in an error message
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})$"
)
_MEMORY = "<memory>"
_MERGED = "<merged pointers>"


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpResolution:
    """A plain HTTP(S) GET; HuggingFace files are this kind too."""

    resolution_type: ClassVar[str] = "http"
    url: str
    expiration_timestamp: int

    def to_json(self) -> dict[str, Any]:
        return {
            "resolution_type": self.resolution_type,
            "url": self.url,
            "expiration_timestamp": self.expiration_timestamp,
        }


@dataclass(frozen=True, slots=True)
class GcsResolution:
    """A Google Cloud Storage object (``path`` is the key inside ``bucket_name``)."""

    resolution_type: ClassVar[str] = "gcs"
    path: str
    bucket_name: str

    def to_json(self) -> dict[str, Any]:
        return {
            "resolution_type": self.resolution_type,
            "path": self.path,
            "bucket_name": self.bucket_name,
        }


@dataclass(frozen=True, slots=True)
class S3Resolution:
    """An AWS S3 object; ``region`` is always emitted, ``null`` when unknown."""

    resolution_type: ClassVar[str] = "s3"
    bucket_name: str
    key: str
    region: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "resolution_type": self.resolution_type,
            "bucket_name": self.bucket_name,
            "key": self.key,
            "region": self.region,
        }


@dataclass(frozen=True, slots=True)
class AzureResolution:
    """An Azure Blob Storage object."""

    resolution_type: ClassVar[str] = "azure"
    account_name: str
    container_name: str
    blob_name: str

    def to_json(self) -> dict[str, Any]:
        return {
            "resolution_type": self.resolution_type,
            "account_name": self.account_name,
            "container_name": self.container_name,
            "blob_name": self.blob_name,
        }


Resolution = HttpResolution | GcsResolution | S3Resolution | AzureResolution


@dataclass(frozen=True, slots=True)
class Pointer:
    """One file of a manifest (spec §1.2)."""

    resolution: Resolution
    uid: str
    file_name: str
    hashtype: str
    hash: str
    size: int
    last_modified_time: str | None = None
    runtime_secret_name: str = DEFAULT_SECRET_NAME

    def to_json(self) -> dict[str, Any]:
        """The pointer as the creator emits it (key order of spec §1.2)."""
        d: dict[str, Any] = {
            "resolution": self.resolution.to_json(),
            "uid": self.uid,
            "file_name": self.file_name,
            "hashtype": self.hashtype,
            "hash": self.hash,
            "size": self.size,
        }
        if self.last_modified_time is not None:
            d["last_modified_time"] = self.last_modified_time
        d["runtime_secret_name"] = self.runtime_secret_name
        return d


@dataclass(frozen=True, slots=True)
class ModelRepo:
    """A model repository expanded into pointers at resolve time (spec §1.10)."""

    repo_id: str
    revision: str = ""
    volume_folder: str = ""
    kind: str = "hf"
    allow_patterns: tuple[str, ...] | None = None
    ignore_patterns: tuple[str, ...] | None = None
    runtime_secret_name: str = DEFAULT_SECRET_NAME

    @property
    def normalized_kind(self) -> str:
        """``kind`` with the ``"hf"`` alias folded into ``"http"`` (what upstream emits)."""
        return "http" if self.kind == "hf" else self.kind

    def to_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "allow_patterns": None if self.allow_patterns is None else list(self.allow_patterns),
            "ignore_patterns": None if self.ignore_patterns is None else list(self.ignore_patterns),
            "volume_folder": self.volume_folder,
            "runtime_secret_name": self.runtime_secret_name,
            "kind": self.normalized_kind,
        }


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed manifest; ``source`` (a path or a description) names it in every error."""

    pointers: tuple[Pointer, ...]
    models: tuple[ModelRepo, ...] | None = None
    source: str = _MEMORY
    # Set by parse_manifest: every pointer passed the checks of validate_pointers already, so a
    # lone parsed manifest need not be validated twice (100k pointers: ~1 s on a small VM).
    validated: bool = field(default=False, compare=False)
    # ... and so did the file/directory collision check (parse_manifest(collisions=True)).
    collisions_checked: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "pointers": [p.to_json() for p in self.pointers],
            "models": None if self.models is None else [m.to_json() for m in self.models],
        }

    def dumps(self) -> str:
        """Pretty JSON with a 2-space indent, as the creator writes it."""
        return json.dumps(self.to_json(), indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _show(value: object) -> str:
    """Quote a user value for a one-line error message (escaped, length-capped)."""
    if isinstance(value, str):
        text = value if len(value) <= _MAX_SHOWN else value[:_MAX_SHOWN] + "..."
        return repr(text)
    text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = text[:_MAX_SHOWN] + "..."
    return f"{text} ({type(value).__name__})"


def _bare(value: str) -> str:
    """A string for an error message without quotes, non-printables escaped."""
    if value.isprintable() and len(value) <= _MAX_SHOWN:
        return value
    return _show(value)[1:-1]


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class _Problem(Exception):
    """Internal: what is wrong with one object; the caller adds where it is."""


def _get_str(obj: Mapping[Any, Any], key: str, what: str) -> str:
    if key not in obj:
        raise _Problem(f"{what}: missing required key '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise _Problem(f"{what}: '{key}' must be a string, got {_type_name(value)}")
    return value


def _get_opt_str(obj: Mapping[Any, Any], key: str, what: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _Problem(f"{what}: '{key}' must be a string or null, got {_type_name(value)}")


def _get_i64(obj: Mapping[Any, Any], key: str, what: str) -> int:
    if key not in obj:
        raise _Problem(f"{what}: missing required key '{key}'")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Problem(f"{what}: '{key}' must be an integer, got {_type_name(value)}")
    if not _I64_MIN <= value <= _I64_MAX:
        raise _Problem(f"{what}: '{key}' {value} is out of the signed 64-bit range")
    return value


def _format_datetime(value: _dt.datetime) -> str:
    """RFC 3339 in UTC with ``Z`` (YAML turns unquoted timestamps into datetimes)."""
    if value.tzinfo is not None:
        value = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        frac = f"{value.microsecond:06d}"
        text += "." + (frac[:3] if frac.endswith("000") else frac)
    return text + "Z"


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _parse_tagged(obj: Mapping[Any, Any], tag: str) -> Resolution:
    what = f"{tag} resolution"
    if tag == "http":
        return HttpResolution(
            url=_get_str(obj, "url", what),
            expiration_timestamp=_get_i64(obj, "expiration_timestamp", what),
        )
    if tag == "gcs":
        return GcsResolution(
            path=_get_str(obj, "path", what), bucket_name=_get_str(obj, "bucket_name", what)
        )
    if tag == "s3":
        return S3Resolution(
            bucket_name=_get_str(obj, "bucket_name", what),
            key=_get_str(obj, "key", what),
            region=_get_opt_str(obj, "region", what),
        )
    return AzureResolution(
        account_name=_get_str(obj, "account_name", what),
        container_name=_get_str(obj, "container_name", what),
        blob_name=_get_str(obj, "blob_name", what),
    )


def _parse_resolution(obj: object) -> Resolution:
    """Tagged form first, then the historic untagged http form (spec §1.3)."""
    if not isinstance(obj, Mapping):
        raise _Problem(f"'resolution' must be an object, got {_type_name(obj)}")
    tag = obj.get("resolution_type")
    tagged_problem: _Problem | None = None
    if isinstance(tag, str) and tag in ("http", "gcs", "s3", "azure"):
        try:
            return _parse_tagged(obj, tag)
        except _Problem as exc:
            tagged_problem = exc
    if "url" in obj and "expiration_timestamp" in obj:
        try:
            return _parse_tagged(obj, "http")
        except _Problem as exc:
            raise tagged_problem or exc from None
    if tagged_problem is not None:
        raise tagged_problem
    if tag is None:
        raise _Problem(
            "resolution has no 'resolution_type' and is not the historic form "
            "('url' + 'expiration_timestamp')"
        )
    raise _Problem(
        f"unknown resolution_type {_show(tag)} (expected http, gcs, s3 or azure, or the "
        "historic form with 'url' + 'expiration_timestamp')"
    )


def _parse_pointer_fast(obj: object) -> Pointer | None:
    """The common well-formed, safe http pointer without per-field helper calls (100k
    pointers: ~3x faster); None sends anything else through :func:`_parse_pointer_checked` and
    :func:`_check_pointer`, which accept everything this accepts and explain what they do not.
    A pointer returned here passed the checks of :func:`_check_pointer` (its name, hash and
    size are in the forms their fast accepts recognise)."""
    if type(obj) is not dict:
        return None
    try:  # subscripts, not .get(): a mount's start runs this 10^5 times
        res = obj["resolution"]
        uid = obj["uid"]
        name = obj["file_name"]
        hashtype = obj["hashtype"]
        hash_ = obj["hash"]
        size = obj["size"]
        if type(res) is not dict:
            return None
        url = res["url"]
        exp = res["expiration_timestamp"]
    except KeyError:
        return None
    if len(res) != 2 and res.get("resolution_type", "http") != "http":
        return None
    if len(obj) == 6:
        secret = DEFAULT_SECRET_NAME
    else:
        secret = obj.get("runtime_secret_name", DEFAULT_SECRET_NAME)
        if obj.get("last_modified_time") is not None:
            return None
    if (
        type(url) is not str
        or type(exp) is not int
        or type(uid) is not str
        or type(name) is not str
        or type(hashtype) is not str
        or type(hash_) is not str
        or type(size) is not int
        or type(secret) is not str
        or not _I64_MIN <= exp <= _I64_MAX
        or not 0 <= size <= MAX_SIZE
        or not _plain_name(name)
        or not _plain_hash(hash_)
    ):
        return None
    return _new_pointer(_new_http(url, exp), uid, name, hashtype, hash_, size, secret)


# The fast parser's constructors: the same frozen objects as ``Pointer(...)`` and
# ``HttpResolution(...)``, with the slots filled through their descriptors instead of the
# generated ``__init__``'s keyword call and ``object.__setattr__`` per field (100k pointers:
# ~0.35 s of a mount's start). Only for values already checked; every field is set (tests compare
# them with the checked parser's objects).
_new = object.__new__
_POINTER_SETTERS = tuple(getattr(Pointer, f.name).__set__ for f in dataclasses.fields(Pointer))
_HTTP_SETTERS = tuple(
    getattr(HttpResolution, f.name).__set__ for f in dataclasses.fields(HttpResolution)
)


def _new_http(url: str, expiration_timestamp: int) -> HttpResolution:
    r = _new(HttpResolution)
    set_url, set_exp = _HTTP_SETTERS
    set_url(r, url)
    set_exp(r, expiration_timestamp)
    return r


def _new_pointer(
    resolution: Resolution, uid: str, name: str, hashtype: str, hash_: str, size: int, secret: str
) -> Pointer:
    p = _new(Pointer)
    s_res, s_uid, s_name, s_type, s_hash, s_size, s_lmt, s_secret = _POINTER_SETTERS
    s_res(p, resolution)
    s_uid(p, uid)
    s_name(p, name)
    s_type(p, hashtype)
    s_hash(p, hash_)
    s_size(p, size)
    s_lmt(p, None)
    s_secret(p, secret)
    return p


def _parse_pointer_checked(obj: object) -> Pointer:
    if not isinstance(obj, Mapping):
        raise _Problem(f"must be an object, got {_type_name(obj)}")
    if "resolution" not in obj:
        raise _Problem("missing required key 'resolution'")
    resolution = _parse_resolution(obj["resolution"])
    what = "pointer"
    uid = _get_str(obj, "uid", what)
    file_name = _get_str(obj, "file_name", what)
    hashtype = _get_str(obj, "hashtype", what)
    hash_ = _get_str(obj, "hash", what)
    if "size" not in obj:
        raise _Problem("missing required key 'size'")
    size = obj["size"]
    if isinstance(size, bool) or not isinstance(size, int):
        raise _Problem(f"size must be an integer, got {_show(size)}")
    lmt = obj.get("last_modified_time")
    if isinstance(lmt, _dt.datetime):
        lmt = _format_datetime(lmt)
    if lmt is not None:
        if not isinstance(lmt, str):
            raise _Problem(
                f"'last_modified_time' must be an RFC 3339 string, got {_type_name(lmt)}"
            )
        if not _RFC3339.match(lmt):
            raise _Problem(f"'last_modified_time' {_show(lmt)} is not an RFC 3339 timestamp")
    secret = obj.get("runtime_secret_name", DEFAULT_SECRET_NAME)
    if not isinstance(secret, str):
        raise _Problem(f"'runtime_secret_name' must be a string, got {_type_name(secret)}")
    return Pointer(
        resolution=resolution,
        uid=uid,
        file_name=file_name,
        hashtype=hashtype,
        hash=hash_,
        size=size,
        last_modified_time=lmt,
        runtime_secret_name=secret,
    )


def _parse_patterns(obj: Mapping[Any, Any], key: str) -> tuple[str, ...] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Problem(f"'{key}' must be a list of strings or null")
    return tuple(value)


def _parse_model(obj: object) -> ModelRepo:
    if not isinstance(obj, Mapping):
        raise _Problem(f"must be an object, got {_type_name(obj)}")
    what = "model"
    repo_id = _get_str(obj, "repo_id", what)
    revision = _get_str(obj, "revision", what)
    volume_folder = _get_str(obj, "volume_folder", what)
    secret = _get_str(obj, "runtime_secret_name", what)
    kind = _get_str(obj, "kind", what)
    if kind not in MODEL_KINDS:
        raise _Problem(f"unknown kind {_show(kind)} (expected one of {sorted(MODEL_KINDS)})")
    return ModelRepo(
        repo_id=repo_id,
        revision=revision,
        volume_folder=volume_folder,
        kind=kind,
        allow_patterns=_parse_patterns(obj, "allow_patterns"),
        ignore_patterns=_parse_patterns(obj, "ignore_patterns"),
        runtime_secret_name=secret,
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _load_yaml(text: str) -> object:
    """A YAML manifest, with a safe loader (no object construction). PyYAML is imported here,
    not with the module: JSON manifests (every mount's start) never need it.

    Raises:
        ValueError: the text is not YAML (the message says where).
    """
    import yaml

    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise ValueError(_yaml_detail(exc)) from None


def _yaml_detail(exc: Any) -> str:
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError):
        parts = [p for p in (exc.context, exc.problem) if p]
        mark = exc.problem_mark or exc.context_mark
        detail = "; ".join(parts) or "invalid YAML"
        if mark is not None:
            detail += f" at line {mark.line + 1} column {mark.column + 1}"
        return _one_line(detail)
    return _one_line(str(exc)) or "invalid YAML"


def _load_document(text: str, source: str, fmt: Literal["json", "yaml"]) -> object:
    label = "JSON" if fmt == "json" else "YAML"
    try:
        if fmt == "json":
            return json.loads(text)
        return _load_yaml(text)
    except json.JSONDecodeError as exc:
        detail = _one_line(str(exc))
    except (ValueError, RecursionError, MemoryError) as exc:
        detail = _one_line(str(exc)) or type(exc).__name__
    raise ManifestError(f"Failed to parse {label} manifest from {source}: {detail}")


def _guess_fmt(text: str, source: str) -> Literal["json", "yaml"]:
    if source.endswith(".json"):
        return "json"
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return "yaml"
    return "json"


def parse_manifest(
    text: str,
    *,
    source: str = _MEMORY,
    fmt: Literal["json", "yaml"] | None = None,
    collisions: bool = True,
) -> Manifest:
    """Parse and validate one manifest document.

    ``fmt`` picks the parser; when ``None`` it is JSON if ``source`` ends in ``.json``,
    otherwise JSON if the text is valid JSON, else YAML. Pointer indices in errors are 0-based.
    ``collisions=False`` leaves out the file/directory collision check, for a caller that makes
    it anyway (a mount's tree: 100k pointers, ~0.5 s of a start that should take under 2 s).

    Raises:
        ManifestError: the document does not parse, lacks ``pointers``, or a pointer or model
            is malformed or hostile (one line, naming ``source`` and the index).
    """
    text = text.removeprefix("\ufeff")
    if fmt is None:
        fmt = _guess_fmt(text, source)
    if fmt not in ("json", "yaml"):
        raise ManifestError(f"manifest {source}: unknown format {fmt!r} (expected json or yaml)")
    label = "JSON" if fmt == "json" else "YAML"
    doc = _load_document(text, source, fmt)
    if not isinstance(doc, Mapping):
        raise ManifestError(
            f"Failed to parse {label} manifest from {source}: "
            f"expected an object at the top level, got {_type_name(doc)}"
        )
    if "pointers" not in doc:
        raise ManifestError(
            f"Failed to parse {label} manifest from {source}: missing required key 'pointers'"
        )
    raw_pointers = doc["pointers"]
    if not isinstance(raw_pointers, list):
        raise ManifestError(
            f"Failed to parse {label} manifest from {source}: "
            f"'pointers' must be an array, got {_type_name(raw_pointers)}"
        )
    pointers: list[Pointer] = []
    for index, raw in enumerate(raw_pointers):
        pointer = _parse_pointer_fast(raw)  # checked already, when it is not None
        if pointer is None:
            try:
                pointer = _parse_pointer_checked(raw)
            except _Problem as exc:
                raise ManifestError(f"manifest {source}: {_where_raw(index, raw)}: {exc}") from None
            _check_pointer(pointer, index, source)
        pointers.append(pointer)
    if collisions:
        _check_collisions(pointers, source)

    models: tuple[ModelRepo, ...] | None = None
    raw_models = doc.get("models")
    if raw_models is not None:
        if not isinstance(raw_models, list):
            raise ManifestError(
                f"Failed to parse {label} manifest from {source}: "
                f"'models' must be an array or null, got {_type_name(raw_models)}"
            )
        parsed: list[ModelRepo] = []
        for index, raw in enumerate(raw_models):
            try:
                parsed.append(_parse_model(raw))
            except _Problem as exc:
                repo = raw.get("repo_id") if isinstance(raw, Mapping) else None
                where = f"model {index}" + (
                    f" (repo_id {_show(repo)})" if isinstance(repo, str) else ""
                )
                raise ManifestError(f"manifest {source}: {where}: {exc}") from None
        models = tuple(parsed)
    return Manifest(
        pointers=tuple(pointers),
        models=models,
        source=source,
        validated=True,
        collisions_checked=collisions,
    )


def load_manifest(path: str | os.PathLike[str], *, collisions: bool = True) -> Manifest:
    """Read and parse the manifest at ``path``: ``.json`` → JSON, anything else → YAML
    (``collisions``: as :func:`parse_manifest`).

    Raises:
        ManifestError: unreadable (``Unable to read manifest from <path>: <reason>``), not
            UTF-8, or invalid (see :func:`parse_manifest`).
    """
    source = os.fspath(path)
    fmt: Literal["json", "yaml"] = "json" if source.endswith(".json") else "yaml"
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ManifestError(f"Unable to read manifest from {source}: {reason}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        label = "JSON" if fmt == "json" else "YAML"
        raise ManifestError(
            f"Failed to parse {label} manifest from {source}: not valid UTF-8 ({exc.reason} "
            f"at byte {exc.start})"
        ) from None
    return parse_manifest(text, source=source, fmt=fmt, collisions=collisions)


# --------------------------------------------------------------------------------------------
# Validation shared by parsing and validate_pointers
# --------------------------------------------------------------------------------------------


def _where_raw(index: int, raw: object) -> str:
    name = raw.get("file_name") if isinstance(raw, Mapping) else None
    if isinstance(name, str):
        return f"pointer {index} (file_name {_show(name)})"
    return f"pointer {index}"


def _plain_name(file_name: str) -> bool:
    """The common safe name, recognised without splitting (stricter than
    :func:`_name_problem`'s full rules: ``..`` anywhere); the fast parser accepts only these."""
    return bool(
        file_name
        and "\0" not in file_name
        and ".." not in file_name
        and not file_name.endswith("/")
        and file_name.strip("/.")
    )


def _plain_hash(hash_: str) -> bool:
    """A hash :func:`_hash_problem` has nothing against."""
    return bool(hash_) and "/" not in hash_ and "\0" not in hash_ and hash_ not in (".", "..")


def _name_problem(file_name: str) -> str | None:
    """Why ``file_name`` cannot be a destination, or None when it can."""
    if _plain_name(file_name):
        return None
    if not file_name:
        return "file_name must not be empty"
    if "\0" in file_name:
        return "file_name must not contain NUL"
    parts = file_name.split("/")
    if ".." in parts:
        return "file_name must not contain '..' components"
    if file_name.endswith("/"):
        return "file_name must not end with '/' (it names a file, not a directory)"
    if not [p for p in parts if p not in ("", ".")]:
        return "file_name must name a file (it normalises to the directory itself)"
    return None


def is_plain_relative(file_name: str) -> bool:
    """Whether ``file_name`` is relative and already normal (no empty or ``.`` component):
    then its components are ``file_name.split("/")``, as they are for nearly every name, and
    callers at 10^5 names skip normalising it (3x faster)."""
    return not (
        file_name.startswith(("/", "./"))
        or file_name.endswith(("/", "/."))
        or "//" in file_name
        or "/./" in file_name
        or file_name in ("", ".")
    )


def _normalised_parts(file_name: str) -> tuple[str, ...]:
    """Components without empty and ``.`` parts; absolute names start with ``"/"``."""
    if is_plain_relative(file_name):
        return tuple(file_name.split("/"))
    parts = tuple(p for p in file_name.split("/") if p not in ("", "."))
    return ("/", *parts) if file_name.startswith("/") else parts


def _hash_problem(hash_: str) -> str | None:
    if _plain_hash(hash_):
        return None
    if "/" in hash_:
        return f"Hash {_bare(hash_)} contains '/', which is not allowed"
    if not hash_:
        return "hash must not be empty"
    if "\0" in hash_:
        return "hash must not contain NUL"
    if hash_ in (".", ".."):
        return f"hash must not be {hash_!r}"
    return None


def _check_pointer(pointer: Pointer, index: int, source: str) -> None:
    """Raise ManifestError for a pointer that is unsafe or malformed."""
    problem = _name_problem(pointer.file_name)
    if problem is None:
        problem = _hash_problem(pointer.hash)
    if problem is None:
        size: object = pointer.size
        if isinstance(size, bool) or not isinstance(size, int):
            problem = f"size must be an integer, got {_show(size)}"
        elif not 0 <= size <= MAX_SIZE:
            problem = f"size {size} is outside the allowed range 0..{MAX_SIZE} (1 PiB)"
    if problem is not None:
        raise ManifestError(
            f"manifest {source}: pointer {index} (file_name {_show(pointer.file_name)}): {problem}"
        )


def _check_collisions(pointers: Sequence[Pointer], source: str) -> None:
    """Reject a file name that another pointer also uses as a directory."""
    # Invariant: every ancestor of a directory in ``dirs`` is in ``dirs`` too, and no path is
    # in both maps. So a pointer's walk up its directories stops at the first one already
    # known, and only the new ones can collide with a file: one or two lookups per pointer
    # instead of one per component (100k pointers: ~4x faster).
    files: dict[tuple[str, ...], int] = {}
    dirs: dict[tuple[str, ...], int] = {}
    for index, pointer in enumerate(pointers):
        parts = _normalised_parts(pointer.file_name)
        other: int | None = dirs.get(parts)
        new_depth = len(parts)
        while new_depth > 1 and parts[: new_depth - 1] not in dirs:
            new_depth -= 1
        if other is None:
            for depth in range(new_depth, len(parts)):
                other = files.get(parts[:depth])
                if other is not None:
                    break
        if other is not None:
            raise ManifestError(
                f"manifest {source}: pointer {index} (file_name {_show(pointer.file_name)}): "
                f"collides with pointer {other} (file_name "
                f"{_show(pointers[other].file_name)}): one path would be both a file and a "
                "directory"
            )
        files.setdefault(parts, index)
        for depth in range(new_depth, len(parts)):
            dirs[parts[:depth]] = index


# --------------------------------------------------------------------------------------------
# Lookup, merge, validate
# --------------------------------------------------------------------------------------------


def manifest_paths(env: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """The manifest lookup paths: :data:`MANIFEST_PATHS`, or ``TTFS_MANIFEST_PATHS`` if set.

    ``TTFS_MANIFEST_PATHS`` is an ``os.pathsep``-separated list; empty entries are skipped, so
    setting it to ``""`` disables the lookup.
    """
    env = os.environ if env is None else env
    override = env.get(MANIFEST_PATHS_ENV)
    if override is None:
        return tuple(Path(p) for p in MANIFEST_PATHS)
    return tuple(Path(p) for p in override.split(os.pathsep) if p)


def find_manifests(
    env: Mapping[str, str] | None = None, *, collisions: bool = True
) -> list[Manifest]:
    """Load every manifest that exists as a regular file (symlinks followed), in lookup order
    (``collisions``: as :func:`parse_manifest`).

    Raises:
        ManifestError: one of them cannot be read or parsed (aborts, as upstream does).
    """
    found: list[Manifest] = []
    for path in manifest_paths(env):
        if path.is_file():
            log.info("Found manifest file at: %s", path)
            found.append(load_manifest(path, collisions=collisions))
    return found


def merge_pointers(manifests: Sequence[Manifest]) -> list[Pointer]:
    """Merge pointers of ``manifests`` in order (spec §3.4).

    An exact ``(file_name, hash)`` repeat is dropped silently; a pointer whose ``file_name``
    was already kept with another hash is dropped with a warning (first wins).
    """
    kept_hash: dict[str, str] = {}  # file_name -> the hash kept for it (one lookup a pointer)
    merged: list[Pointer] = []
    for manifest in manifests:
        for pointer in manifest.pointers:
            first = kept_hash.get(pointer.file_name)
            if first is not None:
                if first == pointer.hash:
                    continue  # an exact repeat
                log.warning(
                    "Conflicting file found: %s has hash %s in one manifest and %s in another. "
                    "Using the first one.",
                    pointer.file_name,
                    first,
                    pointer.hash,
                )
                continue
            kept_hash[pointer.file_name] = pointer.hash
            merged.append(pointer)
    return merged


def is_expired(pointer: Pointer, now: float | None = None) -> bool:
    """True for an http pointer whose ``expiration_timestamp`` lies before ``now``."""
    if not isinstance(pointer.resolution, HttpResolution):
        return False
    current = time.time() if now is None else now
    return pointer.resolution.expiration_timestamp < current


def log_expired(pointers: Sequence[Pointer], *, now: float | None = None) -> None:
    """Log (at ERROR) every expired http pointer; upstream continues, and so do we."""
    current = time.time() if now is None else now
    for pointer in pointers:
        resolution = pointer.resolution  # is_expired, inline: 10^5 pointers at a mount's start
        if isinstance(resolution, HttpResolution) and resolution.expiration_timestamp < current:
            log.error(
                "Pointer %s has expired at %d. Current time is %d. "
                "This will lead to a download failure.",
                pointer.file_name,
                resolution.expiration_timestamp,
                int(current),
            )


def validate_pointers(
    pointers: Sequence[Pointer], *, now: float | None = None, collisions: bool = True
) -> None:
    """Check merged pointers before any download (spec §3.5, plus the checks of parsing).

    An expired http pointer is only logged at ERROR (upstream continues; the download will
    likely fail). A hash containing ``/`` fails with upstream's text; the stricter name, hash,
    size and file/directory-collision checks of :func:`parse_manifest` are repeated because
    pointers built in memory (JIT models) never went through the parser. ``collisions=False``
    leaves the collision check to the caller (a mount's tree makes it).

    Raises:
        ManifestError: a pointer is unsafe or malformed.
    """
    for index, pointer in enumerate(pointers):
        _check_pointer(pointer, index, _MERGED)
    log_expired(pointers, now=now)
    if collisions:
        _check_collisions(pointers, _MERGED)


def destination(download_dir: str | os.PathLike[str], file_name: str) -> Path:
    """Where ``file_name`` is written (spec §1.7 join semantics, made safe).

    An absolute ``file_name`` discards ``download_dir``; a relative one goes under it (``""``
    means relative to the current directory). ``.`` and repeated ``/`` are normalised away.

    Raises:
        ManifestError: ``file_name`` is empty, contains NUL or a ``..`` component, or names the
            directory itself; so a relative name never leaves ``download_dir`` lexically.
    """
    problem = _name_problem(file_name)
    if problem is not None:
        raise ManifestError(f"file_name {_show(file_name)}: {problem}")
    parts = _normalised_parts(file_name)
    base = os.fspath(download_dir)
    if parts[0] == "/" or not base:
        return Path(*parts)
    return Path(base).joinpath(*parts)
