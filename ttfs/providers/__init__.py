"""Origins. ``ProviderSet`` picks the provider for a pointer's resolution type.

Only this package imports httpx and the cloud SDKs.
"""

from __future__ import annotations

from ..config import Settings
from ..errors import ConfigError
from ..manifest import HttpResolution, Pointer
from .base import Provider, Sink, redact_url
from .http import HttpProvider

__all__ = ["HttpProvider", "Provider", "ProviderSet", "Sink", "redact_url"]


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
            if isinstance(pointer.resolution, HttpResolution):
                provider = HttpProvider(self._settings)
            else:
                raise ConfigError(
                    f"{pointer.file_name}: resolution type {kind!r} is not supported yet "
                    "(only http/Hugging Face pointers can be fetched)"
                )
            self._providers[kind] = provider
        return provider

    def add(self, kind: str, provider: Provider) -> None:
        """Install a provider (tests inject fakes this way)."""
        self._providers[kind] = provider

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
        self._providers.clear()
