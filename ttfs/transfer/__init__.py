"""The data plane's processes: worker processes that move range bodies into blob files.

Layout (docs/architecture.md, "Workers"):

* :mod:`.wire` — one blocking ranged GET over ``http.client`` into a reused buffer (stdlib only);
* :mod:`.protocol` — the framed messages between the coordinator and a worker;
* :mod:`.worker` — the worker process (``python -m ttfs.transfer.worker``): GET, ``pwrite``,
  xxh3 per block, one report per landed block;
* :mod:`.pool` — the coordinator's side (trio): spawn, dispatch, requeue on a dead worker.

This ``__init__`` imports nothing, so a worker process starts without trio, httpx or diskcache.
"""
