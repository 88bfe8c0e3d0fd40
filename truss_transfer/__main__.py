"""``python -m truss_transfer [DIR]`` and ``truss_transfer_cli [DIR]``.

Only the first argument is read (as upstream); exit 0 on success, 1 with
``Error during execution: ...`` on failure.
"""

from __future__ import annotations

import sys

from ttfs.errors import TtfsError

from . import lazy_data_resolve


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        lazy_data_resolve(args[0] if args else None)
    except TtfsError as e:
        print(f"Error during execution: {e}", file=sys.stderr)
        sys.exit(1)
    except NotImplementedError as e:
        print(f"Error during execution: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
