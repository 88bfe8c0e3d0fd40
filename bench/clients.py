"""The Python peer downloaders, each run in a child process by the benchmark.

``python -m bench.clients snapshot REPO CACHE_DIR``
    ``huggingface_hub.snapshot_download(REPO, cache_dir=CACHE_DIR)`` with the library's defaults
    (8 worker threads, one plain GET per file); ``HF_ENDPOINT`` names the fake hub. Prints the
    snapshot directory.

``python -m bench.clients hf_transfer OUT_DIR URL=NAME...``
    ``hf_transfer.download`` of each file in turn with the settings huggingface_hub used when it
    still called hf_transfer (``HF_TRANSFER_CONCURRENCY`` 100 parallel 10 MiB chunks,
    ``parallel_failures=3``, ``max_retries=5``).

``python -m bench.clients snapshot_load REPO CACHE_DIR``
    ``snapshot_download``, then a full safetensors load of every shard (numpy), timed as one:
    "download, then load".
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HF_TRANSFER_CONCURRENCY = 100
DOWNLOAD_CHUNK_SIZE = 10 * 1024 * 1024


def snapshot(repo: str, cache_dir: str) -> str:
    from huggingface_hub import snapshot_download

    return str(snapshot_download(repo, cache_dir=cache_dir))


def shards(snapshot_dir: str) -> list[str]:
    index = json.loads((Path(snapshot_dir) / "model.safetensors.index.json").read_text())
    names = sorted(set(index["weight_map"].values()))
    return [str(Path(snapshot_dir) / n) for n in names]


def main(argv: list[str]) -> int:
    cmd, *args = argv
    if cmd == "snapshot":
        print(snapshot(args[0], args[1]))
    elif cmd == "snapshot_load":
        from .reader import _load

        t0 = time.perf_counter()
        path = snapshot(args[0], args[1])
        t1 = time.perf_counter()
        n = _load(shards(path))
        t2 = time.perf_counter()
        print(json.dumps({"dir": path, "download": t1 - t0, "load": t2 - t1, "bytes": n}))
    elif cmd == "hf_transfer":
        import hf_transfer

        out = Path(args[0])
        for pair in args[1:]:
            url, name = pair.rsplit("=", 1)
            dest = out / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            hf_transfer.download(
                url=url,
                filename=str(dest),
                max_files=HF_TRANSFER_CONCURRENCY,
                chunk_size=DOWNLOAD_CHUNK_SIZE,
                parallel_failures=3,
                max_retries=5,
            )
    else:
        print(f"unknown command {cmd}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
