"""ttfs: a lazy-loading FUSE filesystem and downloader for ML model weights.

Reads Baseten's bptr manifests; ``import truss_transfer`` gets the drop-in API.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
