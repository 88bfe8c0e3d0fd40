"""``make bench``: run every benchmark and print its tables."""

from . import resolve

resolve.main()
