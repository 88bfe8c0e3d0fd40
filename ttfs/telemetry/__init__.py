"""Logging setup, progress reporting and the run statistics file."""
