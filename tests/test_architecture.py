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
    # The cache owner: a lock, a socket protocol, and a server over the fetcher.
    "ttfs.owner": {
        "pyfuse3",
        "httpx",
        "diskcache",
        "ttfs.providers",
        "ttfs.vfs",
        "ttfs.fuse",
        "ttfs.cli",
        "ttfs.resolve",
        "ttfs.compat",
    },
    # b10fs storage half: synchronous files and locks only (the fetch layer schedules it).
    "ttfs.blocks.shared": {
        "trio",
        "diskcache",
        "ttfs.blocks.store",
        "ttfs.resolve",
        "ttfs.compat",
        "ttfs.create",
    },
    # The data plane's processes: below fetch and providers; the worker side starts without trio,
    # httpx or diskcache (ttfs.transfer.pool, the coordinator's side, may use trio).
    "ttfs.transfer": {
        "httpx",
        "pyfuse3",
        "diskcache",
        "ttfs.blocks",
        "ttfs.providers",
        "ttfs.fetch",
        "ttfs.vfs",
        "ttfs.fuse",
        "ttfs.cli",
        "ttfs.resolve",
    },
    "ttfs.transfer.worker": {"trio"},
    "ttfs.transfer.wire": {"trio"},
    "ttfs.transfer.protocol": {"trio"},
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
}
ALLOWED_ELSEWHERE = {
    "httpx": {"ttfs.create"},
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


def test_installed_package_does_not_need_the_demo() -> None:
    """The demo origin and model generator live in the top-level ``demo/`` package, which is not
    installed (pyproject's ``packages.find``); nothing installed may import it."""
    assert not (ROOT / "demo").exists()
    offenders = [
        f"{m} imports {i}" for m, i in iter_imports() if i == "demo" or i.startswith("demo.")
    ]
    assert offenders == []


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Leaf module -> the leaf modules it imports, TYPE_CHECKING imports included (a cycle hidden
    behind them is still a cycle of design). Importing a package counts as importing the
    modules its ``__init__`` re-exports from."""
    files = {
        "ttfs." + ".".join(p.relative_to(root).with_suffix("").parts): p for p in root.rglob("*.py")
    }
    raw: dict[str, set[str]] = {}
    known = {m.removesuffix(".__init__") for m in files}
    for dotted, path in files.items():
        module = dotted.removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        deps = raw.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = parts[: len(parts) - node.level + 1]
                    name = ".".join([*base, node.module] if node.module else base)
                else:
                    name = node.module or ""
                subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in known]
                deps.update(subs or [name])
    packages = {m.removesuffix(".__init__") for m in files if m.endswith(".__init__")}

    def leaves(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if not name or name in seen:
            return set()
        if name in packages:
            out: set[str] = set()
            for dep in raw[name]:
                if dep.startswith(name + "."):
                    out |= leaves(dep, seen | {name})
            return out
        return {name}

    graph: dict[str, set[str]] = {}
    for module, deps in raw.items():
        if module in packages:
            continue
        graph[module] = {leaf for d in deps for leaf in leaves(d) if leaf != module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    cycles = set()
    for start in graph:
        stack = [(start, (start,))]
        seen = {start}
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.add(tuple(sorted(path)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    return cycles


def test_no_import_cycles() -> None:
    assert find_cycles(module_graph()) == set()


def _defined_names(tree: ast.AST) -> set[str]:
    defined = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Attribute):
            defined.add(node.target.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
    return defined


def test_no_private_state_across_modules() -> None:
    """``obj._name``, where ``_name`` belongs to another ttfs module, is not allowed: no module
    edits another's private state (the shared tier once pushed into the fetcher's heap).
    Private names of the standard library or other packages are not this test's business."""
    trees = {path: ast.parse(path.read_text()) for path in ROOT.rglob("*.py")}
    defined = {path: _defined_names(tree) for path, tree in trees.items()}
    violations = []
    for path, tree in trees.items():
        elsewhere = set().union(*(names for p, names in defined.items() if p != path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            name = node.attr
            if not name.startswith("_") or name.startswith("__") or name in defined[path]:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if name in elsewhere:
                violations.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: .{name}")
    assert violations == []


def test_only_cache_owners_open_the_block_store() -> None:
    """The block store is correct with one writer only: it is opened where the owner lock of
    the cache directory is held (ttfs.owner), i.e. by the mount daemon and a resolve."""
    openers = set()
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "BlockStore":
                openers.add(str(path.relative_to(ROOT)))
    assert openers == {"fuse/serve.py", "resolve.py"}
