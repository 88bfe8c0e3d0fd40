"""`truss-transfer-cli DIR`, `truss_transfer_cli DIR` and `python -m truss_transfer DIR`.

Only the first argument is read (as upstream); exit 0 on success, 1 on any failure, which is
reported once, as upstream's log line ``Error during execution: <error>``. A bad environment
value is such a failure too: one line, never a traceback.
"""

from __future__ import annotations

import logging
import sys

from ttfs.compat.truss_transfer import resolve_here
from ttfs.errors import TtfsError
from ttfs.providers import tune_httpcore
from ttfs.telemetry.logs import setup_logging

log = logging.getLogger("ttfs.truss_transfer")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    setup_logging(propagate=False)
    tune_httpcore()  # our own process: larger socket reads
    try:
        resolve_here(args[0] if args else None)  # our own process: no child needed
    except (TtfsError, NotImplementedError) as e:
        log.error("Error during execution: %s", e)
        sys.exit(1)
    except KeyboardInterrupt:
        log.error("Error during execution: interrupted")
        sys.exit(130)
    sys.exit(0)


if __name__ == "__main__":
    main()
