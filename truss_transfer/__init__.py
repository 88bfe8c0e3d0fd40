"""Drop-in replacement for Baseten's ``truss_transfer`` package, implemented by ttfs."""

from ttfs.compat.truss_transfer import (
    PyModelRepo,
    __version__,
    create_basetenpointer_from_models,
    lazy_data_resolve,
)

__all__ = ["PyModelRepo", "__version__", "create_basetenpointer_from_models", "lazy_data_resolve"]
