"""Origins. ``ProviderSet`` picks the provider for a pointer's resolution type.

Only this package (and :mod:`ttfs.create`) imports httpx and the cloud SDKs; the SDKs are
imported lazily, when the first pointer of their kind is read.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..config import Settings
from ..errors import ConfigError
from ..manifest import AzureResolution, GcsResolution, HttpResolution, Pointer, S3Resolution
from ._stream import data_proxy, tune_httpcore
from .azure import AzureProvider
from .base import Provider, Sink, WireProvider, WireTarget, redact_url
from .gcs import GcsProvider
from .http import HttpProvider
from .s3 import S3Provider

__all__ = [
    "AzureProvider",
    "GcsProvider",
    "HttpProvider",
    "Provider",
    "ProviderSet",
    "S3Provider",
    "Sink",
    "WireProvider",
    "WireTarget",
    "data_proxy",
    "redact_url",
    "tune_httpcore",
]


class ProviderSet:
    """One provider instance per resolution type, created on first use, closed together."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._providers: dict[str, Provider] = {}

    def for_pointer(self, pointer: Pointer) -> Provider:
        """The provider that serves ``pointer``.

        Raises:
            ConfigError: no provider exists for the pointer's resolution type.
        """
        kind = type(pointer.resolution).resolution_type
        provider = self._providers.get(kind)
        if provider is None:
            resolution = pointer.resolution
            if isinstance(resolution, HttpResolution):
                provider = HttpProvider(self._settings)
            elif isinstance(resolution, S3Resolution):
                provider = S3Provider(self._settings)
            elif isinstance(resolution, GcsResolution):
                provider = GcsProvider(self._settings)
            elif isinstance(resolution, AzureResolution):
                provider = AzureProvider(self._settings)
            else:  # pragma: no cover - the manifest parser knows no other type
                raise ConfigError(f"{pointer.file_name}: resolution type {kind!r} is not supported")
            self._providers[kind] = provider
        return provider

    def prepare(self, pointers: Iterable[Pointer]) -> None:
        """Create now, in the calling thread, the provider of every resolution type among
        ``pointers``. Each builds an HTTP client whose TLS context takes 0.05-0.15 s to load
        (2-core VM), which the first read of a fresh mount would otherwise pay on the event
        loop, in front of the reader. Nothing is sent and no cloud SDK is imported."""
        first: dict[type, Pointer] = {}
        for pointer in pointers:
            first.setdefault(type(pointer.resolution), pointer)
        for pointer in first.values():
            self.for_pointer(pointer)

    def add(self, kind: str, provider: Provider) -> None:
        """Install a provider (tests inject fakes this way)."""
        self._providers[kind] = provider

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
        self._providers.clear()
