"""``make bench`` (``python -m bench``): run every benchmark and print its tables."""

import sys

from .driver import main

sys.exit(main())
