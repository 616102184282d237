"""normkit: fast, numerically careful CPU normalization layers.

Public names only; see ``../shared/API.md`` for the contract.
"""
from ._version import __version__
from .backends import (BackendUnavailableError, available_backends, get_backend,
                       get_num_threads, set_backend, set_num_threads, use_backend)

__all__ = [
    "__version__", "BackendUnavailableError", "available_backends", "get_backend",
    "get_num_threads", "set_backend", "set_num_threads", "use_backend",
]
