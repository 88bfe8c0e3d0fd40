"""Drop-in replacement for Baseten's ``truss_transfer`` package, implemented by ttfs."""

from ttfs.compat.background import LazyDataResolverV2
from ttfs.compat.truss_transfer import (
    PyModelRepo,
    __version__,
    create_basetenpointer_from_models,
    lazy_data_resolve,
)

__all__ = [
    "LazyDataResolverV2",
    "PyModelRepo",
    "__version__",
    "create_basetenpointer_from_models",
    "lazy_data_resolve",
]
