"""Imports point down the layers of docs/architecture.md; libraries stay in their layer."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import ttfs

ROOT = Path(ttfs.__file__).parent

# module prefix -> imports it must never make
RULES: dict[str, set[str]] = {
    "ttfs.manifest": {"ttfs.blocks", "ttfs.fetch", "ttfs.providers", "ttfs.vfs", "ttfs.fuse"},
    "ttfs.blocks": {
        "httpx",
        "pyfuse3",
        "ttfs.providers",
        "ttfs.fetch",
        "ttfs.vfs",
        "ttfs.fuse",
        "ttfs.cli",
    },
    "ttfs.providers": {
        "pyfuse3",
        "diskcache",
        "ttfs.blocks",
        "ttfs.fetch",
        "ttfs.vfs",
        "ttfs.fuse",
        "ttfs.cli",
    },
    "ttfs.fetch": {
        "pyfuse3",
        "httpx",
        "diskcache",
        "ttfs.vfs",
        "ttfs.fuse",
        "ttfs.cli",
        "ttfs.resolve",
    },
    "ttfs.vfs": {"pyfuse3", "httpx", "diskcache", "click", "ttfs.fuse", "ttfs.cli"},
    "ttfs.fuse": {"httpx", "diskcache", "ttfs.cli"},
    "ttfs.resolve": {"pyfuse3", "httpx", "diskcache", "ttfs.fuse", "ttfs.vfs", "ttfs.cli"},
    "ttfs.compat": {"pyfuse3", "ttfs.fuse", "ttfs.cli"},
    "ttfs.control": {"pyfuse3", "ttfs.fuse"},
    # b10fs storage half: synchronous files and locks only (the fetch layer schedules it).
    "ttfs.blocks.shared": {
        "trio",
        "diskcache",
        "ttfs.blocks.store",
        "ttfs.resolve",
        "ttfs.compat",
        "ttfs.create",
    },
    "ttfs.create": {
        "pyfuse3",
        "diskcache",
        "ttfs.blocks",
        "ttfs.fetch",
        "ttfs.vfs",
        "ttfs.fuse",
        "ttfs.cli",
        "ttfs.resolve",
        "ttfs.compat",
    },
}
ONLY_IN = {
    "pyfuse3": "ttfs.fuse",
    "diskcache": "ttfs.blocks",
    "httpx": "ttfs.providers",
    "huggingface_hub": "ttfs.providers",
    "boto3": "ttfs.providers",
    "botocore": "ttfs.providers",
    "google": "ttfs.providers",
    "azure": "ttfs.providers",
    # Imported only when --metrics is given (the mount's start-up must not pay for it).
    "prometheus_client": "ttfs.telemetry.metrics",
}
ALLOWED_ELSEWHERE = {
    "httpx": {"ttfs.demo", "ttfs.create"},
    "huggingface_hub": {"ttfs.create"},
    "boto3": {"ttfs.create"},
    "botocore": {"ttfs.create"},
    "google": {"ttfs.create"},
    "azure": {"ttfs.create"},
}


def iter_imports() -> Iterator[tuple[str, str]]:
    for path in ROOT.rglob("*.py"):
        module = "ttfs." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield module, alias.name
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    name = ".".join([*base, node.module] if node.module else base)
                else:
                    name = node.module or ""
                yield module, name


def test_layering() -> None:
    violations = []
    for module, imported in iter_imports():
        for prefix, banned in RULES.items():
            if module == prefix or module.startswith(prefix + "."):
                for b in banned:
                    if imported == b or imported.startswith(b + "."):
                        violations.append(f"{module} imports {imported}")
        for lib, home in ONLY_IN.items():
            if imported == lib or imported.startswith(lib + "."):
                homes = {home} | ALLOWED_ELSEWHERE.get(lib, set())
                if not any(module == h or module.startswith(h + ".") for h in homes):
                    violations.append(f"{module} imports {lib} (only {home} may)")
    assert not violations, "\n".join(sorted(set(violations)))
