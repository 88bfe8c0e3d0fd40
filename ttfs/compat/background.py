"""``LazyDataResolverV2``: resolve in a background thread while model code starts.

truss's model server builds one with the data directory; it starts the resolve at once (when a
manifest exists) and the model calls :meth:`LazyDataResolverV2.block_until_download_complete`
in ``__init__``/``load`` before it touches the weights; ``raise_if_not_collected`` lets the
server check that it did. Same names, arguments and results as upstream (truss
``lazy_data_resolver.py``), implemented here so that code written for it runs unchanged.

The resolve runs in a daemon thread and the waiting caller blocks on a lock, so the model's
threads keep running: bytes move in socket and file system calls that release the GIL, and the
Python bookkeeping around them takes its turn like any other thread.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from ..manifest import manifest_paths
from .truss_transfer import lazy_data_resolve

MISSING_COLLECTION_MESSAGE = (
    "model_cache: Data was not collected. Missing "
    "lazy_data_resolver.block_until_download_complete(). Call it in the __init__ or load() "
    "method of your model before using the files of model_cache."
)
_WARN_AFTER_SECS = 20.0


class LazyDataResolverV2:
    """Resolves the bptr manifests into ``data_dir`` in a background thread."""

    def __init__(self, data_dir: Path | str, logger: logging.Logger | None = None) -> None:
        self._data_dir = Path(data_dir)
        self.logger = logger or logging.getLogger("ttfs.truss_transfer")
        self._lock = threading.Lock()
        self._done = False
        self._result: str | BaseException = ""
        self._is_collected_by_user = False
        self._start_time = time.time()
        if self.bptr_exists():
            threading.Thread(
                target=self._prefetch, name="ttfs-lazy-data-resolver", daemon=True
            ).start()

    @staticmethod
    def bptr_exists() -> bool:
        """Whether any of the manifest lookup paths holds a file."""
        return any(p.is_file() for p in manifest_paths())

    def _prefetch(self) -> None:
        self._fetch()
        if not self._is_collected_by_user and time.time() - self._start_time > _WARN_AFTER_SECS:
            self.logger.warning(MISSING_COLLECTION_MESSAGE)

    def _fetch(self) -> str | BaseException:
        """Resolve once (later callers wait on the lock and get the same result)."""
        with self._lock:
            if not self._done:
                try:
                    self._result = (
                        lazy_data_resolve(str(self._data_dir)) if self.bptr_exists() else ""
                    )
                except Exception as e:
                    self.logger.error("Error occurred while fetching data: %s", e)
                    self._result = e
                self._done = True
            return self._result

    def block_until_download_complete(
        self, log_stats: bool = True, issue_collect: bool = True
    ) -> str:
        """Wait until every file is in place; return the download dir ("" without manifest).

        Raises:
            RuntimeError: ``Error occurred while fetching data: <error>``.
        """
        started = time.time()
        self._is_collected_by_user = issue_collect or self._is_collected_by_user
        result = self._fetch()
        if isinstance(result, BaseException):
            raise RuntimeError(f"Error occurred while fetching data: {result}") from result
        if log_stats and result:
            self.logger.info(
                "model_cache: Fetch took %.2f seconds, of which %.2f seconds were blocking",
                time.time() - self._start_time,
                time.time() - started,
            )
        return result

    def raise_if_not_collected(self) -> None:
        """Raise if the model never called :meth:`block_until_download_complete`.

        Raises:
            RuntimeError: it was not called.
        """
        if not self._is_collected_by_user:
            raise RuntimeError(MISSING_COLLECTION_MESSAGE)
