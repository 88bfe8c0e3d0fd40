"""Fetch scheduling: priorities, single-flight, retries, verification."""

from .queue import Priority
from .scheduler import Fetcher, FetcherStatistics, open_fetcher
from .source import Source

__all__ = ["Fetcher", "FetcherStatistics", "Priority", "Source", "open_fetcher"]
