"""Lazy imports of the cloud SDKs, with a one-line error naming the extra to install.

The SDKs (boto3, google-cloud-storage, azure-storage-blob, huggingface_hub) are optional and
slow to import, so nothing imports them at module level: ``import ttfs`` stays fast, and a
manifest of plain http pointers never needs them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ConfigError

_EXTRA = {
    "boto3": ("boto3", "cloud"),
    "botocore": ("boto3", "cloud"),
    "google": ("google-cloud-storage", "cloud"),
    "azure": ("azure-storage-blob", "cloud"),
    "huggingface_hub": ("huggingface_hub", "hf"),
}


def sdk(module: str) -> ModuleType:
    """Import ``module`` (e.g. ``"boto3"``, ``"google.cloud.storage"``) or explain what to install.

    Raises:
        ConfigError: the SDK is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package, extra = _EXTRA.get(module.split(".", 1)[0], (module, "cloud"))
        raise ConfigError(
            f"{package} is not installed (needed for {module}): pip install 'ttfs[{extra}]' ({e})"
        ) from None
