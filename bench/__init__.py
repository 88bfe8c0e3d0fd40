"""Benchmarks (``make bench``): figures side by side on one origin, never asserted in tests."""
