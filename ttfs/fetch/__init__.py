"""Fetch scheduling: priorities, single-flight, retries, verification."""

from .scheduler import Fetcher, FetcherStatistics, Priority, Source, open_fetcher

__all__ = ["Fetcher", "FetcherStatistics", "Priority", "Source", "open_fetcher"]
