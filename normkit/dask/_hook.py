"""The dispatch hook: send a call to the Dask implementation when it gets a Dask array.

Imported by ``normkit.functional``, ``normkit.layers`` and ``normkit.recalibration``;
it must stay cheap and must never import Dask itself. Until some code has imported
``dask.array`` (which any code that builds a Dask array has done), a hooked call costs
one global test; after that, one ``isinstance`` per argument.
"""
from __future__ import annotations

import functools
import sys

__all__ = ["dask_aware", "get_task_threads", "is_dask", "set_task_threads"]

_array_type: type | None = None   # dask.array.Array, once dask.array has been imported
_task_threads = 1           # kernel threads per task in a Dask worker process


def _dask_array_type() -> type | None:
    global _array_type
    if _array_type is None:
        module = sys.modules.get("dask.array")
        _array_type = getattr(module, "Array", None)     # None: not (fully) imported yet
    return _array_type


def is_dask(a) -> bool:
    """True for a ``dask.array.Array`` (without importing Dask)."""
    t = _array_type or _dask_array_type()
    return t is not None and isinstance(a, t)


def any_dask(args, kwargs) -> bool:
    t = _array_type or _dask_array_type()
    if t is None:
        return False
    return (any(isinstance(a, t) for a in args)
            or any(isinstance(a, t) for a in kwargs.values()))


def dask_aware(impl_name):
    """Decorator: calls with a Dask array argument go to ``normkit.dask._functional.<impl_name>``.

    Written for the NumPy path's speed (tiny calls cost a few microseconds): before
    ``dask.array`` is imported, one global test and a dict lookup; after, one
    ``isinstance`` per argument, inline.
    """
    modules = sys.modules

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t = _array_type
            if t is None:
                if "dask.array" not in modules or (t := _dask_array_type()) is None:
                    return fn(*args, **kwargs)
            for a in args:
                if isinstance(a, t):
                    return _dispatch(impl_name, args, kwargs)
            if kwargs:
                for a in kwargs.values():
                    if isinstance(a, t):
                        return _dispatch(impl_name, args, kwargs)
            return fn(*args, **kwargs)
        return wrapper
    return decorate


def _dispatch(impl_name, args, kwargs):
    from . import _functional
    return getattr(_functional, impl_name)(*args, **kwargs)


def set_task_threads(n: int) -> None:
    """Kernel threads each task may use inside a Dask *worker process* (default 1).

    Read when a graph is built and carried by its tasks; in a worker the task calls
    ``normkit.set_num_threads(n)`` before running, so a worker with one thread per core
    never oversubscribes. The threaded scheduler in this process is left alone (the
    process-wide ``normkit.set_num_threads`` applies there).
    """
    global _task_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_task_threads expects a positive int, got {n!r}")
    _task_threads = n


def get_task_threads() -> int:
    return _task_threads


def layer_forward(layer, x):
    """Called by ``Norm.forward`` for a Dask ``x``."""
    from ._layers import layer_forward as impl
    return impl(layer, x)


def _holds_dask(batch):
    if is_dask(batch):
        return True
    if isinstance(batch, dict):
        return any(is_dask(v) for v in batch.values())
    return isinstance(batch, (list, tuple)) and any(is_dask(v) for v in batch)


def wants_dask(layers_or_callable, batches) -> bool:
    """For ``normkit.recalibrate``: layers (not a callable) and Dask batches -- a Dask
    array, or a list/tuple of batches holding one (an iterator is not looked into)."""
    if _array_type is None and _dask_array_type() is None:
        return False
    if callable(layers_or_callable) and not hasattr(layers_or_callable, "track_running_stats"):
        return False
    return is_dask(batches) or (isinstance(batches, (list, tuple))
                                and any(_holds_dask(b) for b in batches))


def recalibrate(*args, **kwargs):
    from ._layers import recalibrate as impl
    return impl(*args, **kwargs)
