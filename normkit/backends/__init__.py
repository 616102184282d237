"""Backend registry: which kernel modules exist, which load here, which one a call uses.

This module is the single dispatch point. ``resolve(name)`` (internal: used by
``normkit.functional``, the layers and ``python -m normkit info``; not part of the
public API, so not in ``__all__``) turns a user's choice
(``None``, ``'auto'`` or a backend name) into a loaded kernel module that follows
``normkit/backends/_spec.py``; the public functions never ask which one they got.

Backends load lazily (Numba and the Cython extension are imported on first use), so
``import normkit`` stays fast and a broken backend cannot break the others.
"""
from __future__ import annotations

import contextlib
import importlib
import operator
import os
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

from ._spec import MEMBERS

__all__ = [
    "BackendUnavailableError", "KNOWN_BACKENDS", "available_backends", "get_backend",
    "set_backend", "use_backend", "set_num_threads", "get_num_threads", "backend_status",
]


class BackendUnavailableError(ImportError):
    """A known backend cannot be loaded on this machine (the message says why and how to fix it)."""


# name -> (module, hint shown when it fails to load). 'auto' picks the first that loads.
_MODULES = {
    "cython": ("normkit.backends.cython_backend",
               "The Cython extension is built by setup.py: reinstall normkit from source "
               "with a C compiler available (`pip install -e .` or `pip install .`)."),
    "numba": ("normkit.backends.numba_backend",
              "Install numba (`pip install numba`), a required dependency of normkit."),
    "numpy": ("normkit.backends.numpy_ref", ""),
}
KNOWN_BACKENDS = tuple(_MODULES)          # also the order 'auto' tries them in
_CHOICES = ("auto",) + KNOWN_BACKENDS

_lock = threading.RLock()
_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}


class _Local(threading.local):
    # a class default, not getattr(..., None): a missing thread-local attribute costs
    # ~0.4 us (the AttributeError behind the default) on every call
    override: str | None = None


_local = _Local()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(
            f"Expected backend to be one of {list(_CHOICES)}. Received {name!r} instead.")
    return name


def _default_threads() -> int:
    env = os.environ.get("NORMKIT_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(
                f"NORMKIT_NUM_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"NORMKIT_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_default = _check_name(os.environ.get("NORMKIT_BACKEND", "auto") or "auto")
_num_threads = _default_threads()


def _load(name: str):
    """Import a backend module once; remember why it failed if it did.

    An import interrupted by ``KeyboardInterrupt`` (or any other BaseException that is
    not an Exception) is undone -- every module that appeared in ``sys.modules`` during
    the attempt (the half-imported backend, and half-imported numba submodules) is
    removed -- and recorded neither as loaded nor as failed, so the next call imports
    it again from scratch instead of finding a half-initialized module.
    """
    with _lock:
        if name in _loaded:
            return _loaded[name]
        if name in _failed:
            return None
        module_name, hint = _MODULES[name]
        before = set(sys.modules)
        try:
            module = importlib.import_module(module_name)
            missing = [m for m in MEMBERS if not hasattr(module, m)]
            if missing:
                raise ImportError(f"{module_name} lacks {missing}")
            module.set_num_threads(_num_threads)
        except Exception as exc:  # noqa: BLE001 - any failure makes the backend unavailable
            _failed[name] = f"{type(exc).__name__}: {exc}" + (f" {hint}" if hint else "")
            return None
        except BaseException:
            for added in set(sys.modules) - before:
                sys.modules.pop(added, None)
            raise
        _loaded[name] = module
        return module


def resolve(name: str | None = None) -> ModuleType:
    """Internal: the kernel module a call should use (explicit name, else thread-local,
    else global). Public code selects backends with set_backend / use_backend /
    ``backend=``; this stays importable for normkit's own modules."""
    if name is None:
        name = _local.override or _default
    elif not isinstance(name, str) or name not in _loaded:
        _check_name(name)
    module = _loaded.get(name)
    if module is not None:
        return module
    if name == "auto":
        for candidate in KNOWN_BACKENDS:
            module = _load(candidate)
            if module is not None:
                _loaded["auto"] = module
                return module
        raise BackendUnavailableError("no normkit backend could be loaded")  # numpy always loads
    module = _load(name)
    if module is None:
        raise BackendUnavailableError(f"normkit backend {name!r} is not available: {_failed[name]}")
    return module


def available_backends() -> list[str]:
    """Names of the backends that load and work on this machine."""
    return [name for name in KNOWN_BACKENDS if _load(name) is not None]


def backend_status() -> dict[str, str]:
    """name -> 'available' or the reason it is not (used by ``python -m normkit info``)."""
    return {name: "available" if _load(name) is not None else _failed[name]
            for name in KNOWN_BACKENDS}


def get_backend() -> str:
    """The current default setting: 'auto' unless changed (thread-local override first)."""
    return _local.override or _default


def set_backend(name: str) -> None:
    """Set the process-wide default backend ('auto', 'cython', 'numba' or 'numpy')."""
    global _default
    _check_name(name)
    if name != "auto":
        resolve(name)  # fail now, not at the first call, if it cannot load
    _default = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily use ``name`` as the default in this thread only."""
    _check_name(name)
    if name != "auto":
        resolve(name)
    previous = _local.override
    _local.override = name
    try:
        yield
    finally:
        _local.override = previous


def set_num_threads(n: int) -> None:
    """Threads the parallel backends may use (all of them, from every Python thread).

    ``n`` is any integral number (``int``, ``numpy.int64``: ``operator.index``), >= 1.
    """
    global _num_threads
    if isinstance(n, bool):
        raise TypeError(f"set_num_threads: n must be an integer, got bool {n!r}")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"set_num_threads: n must be an integer, got "
                        f"{type(n).__name__} {n!r}") from None
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    with _lock:
        _num_threads = n
        for module in set(_loaded.values()):
            module.set_num_threads(n)


def get_num_threads() -> int:
    return _num_threads
