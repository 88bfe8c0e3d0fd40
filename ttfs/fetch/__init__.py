"""Fetch scheduling: priorities, single-flight, retries, verification."""

from .scheduler import Fetcher, FetcherStatistics, Priority, open_fetcher
from .source import Source

__all__ = ["Fetcher", "FetcherStatistics", "Priority", "Source", "open_fetcher"]
