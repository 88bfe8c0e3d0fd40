"""A loader process for the lazy figures: imports done in advance, timed operations on request.

The benchmark starts it once; it reads one JSON command per line on stdin and answers one JSON
line on stdout, so the time it reports is the filesystem's, not Python's start-up or the import
of safetensors. It runs in its own process because a reader that page-faults on a FUSE mount
while holding the GIL must never share an interpreter with a server of that mount.

Commands (paths are absolute):

* ``{"op": "tensor", "path": P, "name": N}``: ``safe_open(P).get_tensor(N)`` (numpy), the way a
  loader reads one tensor: header, then the tensor's bytes through an mmap.
* ``{"op": "load", "paths": [...]}``: every tensor of every shard, in order (a full load).
* ``{"op": "read", "paths": [...], "buf": B}``: sequential ``readinto`` of every file with a
  ``B``-byte buffer (8 MiB unless given).
* ``{"op": "load_file", "paths": [...]}``: ``safetensors.numpy.load_file`` of every shard.
* ``{"op": "load_threads", "paths": [...]}``: the same, one thread per shard at once (as vLLM's
  loader threads read different shards).
* ``{"op": "sha256", "paths": [...]}``: hex digests (output checks).

Answer: ``{"ok": true, "seconds": s, "cpu": c, "bytes": n, ...}`` (``cpu``: user+system seconds
of this process during the command) or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
from typing import Any

BUF = 8 << 20


def _tensor(path: str, name: str) -> int:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return int(f.get_tensor(name).nbytes)


def _load(paths: list[str]) -> int:
    from safetensors import safe_open

    total = 0
    for path in paths:
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                total += int(f.get_tensor(key).nbytes)
    return total


def _load_file(paths: list[str]) -> int:
    from safetensors.numpy import load_file

    total = 0
    for path in paths:
        total += sum(int(t.nbytes) for t in load_file(path).values())
    return total


def _load_threads(paths: list[str]) -> int:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(paths)) as pool:
        return sum(pool.map(lambda p: _load_file([p]), paths))


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _read(paths: list[str], size: int = BUF) -> int:
    buf = bytearray(size)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def _sha256(paths: list[str]) -> dict[str, str]:
    out = {}
    buf = bytearray(BUF)
    view = memoryview(buf)
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        out[path] = h.hexdigest()
    return out


def handle(cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd["op"]
    t0 = time.perf_counter()
    c0 = _cpu()
    extra: dict[str, Any] = {}
    if op == "ping":
        n = 0
    elif op == "tensor":
        n = _tensor(cmd["path"], cmd["name"])
    elif op == "load":
        n = _load(cmd["paths"])
    elif op == "read":
        n = _read(cmd["paths"], int(cmd.get("buf", BUF)))
    elif op == "load_file":
        n = _load_file(cmd["paths"])
    elif op == "load_threads":
        n = _load_threads(cmd["paths"])
    elif op == "sha256":
        extra["digests"] = _sha256(cmd["paths"])
        n = 0
    else:
        raise ValueError(f"unknown op {op!r}")
    seconds = time.perf_counter() - t0
    return {"ok": True, "seconds": seconds, "cpu": _cpu() - c0, "bytes": n, **extra}


def main() -> None:
    import numpy  # noqa: F401 - import cost paid before any timing
    import safetensors  # noqa: F401

    print(json.dumps({"ok": True, "ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = handle(json.loads(line))
        except Exception as e:
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
