"""Checks of the arguments of the public diagnostics entry points.

Each check names the argument, what was expected and what was given (the shape of
message normkit uses everywhere: "weight: expected shape (16,), got shape (8,)").
Array-likes are converted once, here, after the type checks; nothing is modified.
"""
from __future__ import annotations

import functools
import math
import numbers
import operator
from typing import Any

import numpy as np

from .._validate import is_float

KINDS = ("batch", "instance", "group")


def quiet_floating_point(fn):
    """Run ``fn`` with NumPy's floating-point warnings off: the diagnostics meet NaN,
    Inf, constant channels and eps = 0 by design and report them in words, so NumPy's
    "invalid value encountered" must not reach the user (nor become an error under
    ``warnings.simplefilter("error")``). ``np.errstate`` is thread- and context-local."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)
    return wrapper


def as_data(x: object, name: str = "x") -> np.ndarray:
    """``x`` as an ndarray of a real floating dtype with at least 2 dimensions, not empty.

    Accepts ndarrays and array-likes (lists, tuples, objects with ``__array__``);
    rejects masked arrays (their mask would be silently dropped), complex, object,
    integer and boolean data with a TypeError.
    """
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name}: expected an ndarray, got a masked array; its mask would "
                        f"be ignored: pass {name}.filled(value) to replace the masked "
                        f"values, or {name}.data to use them as they are")
    if not isinstance(x, np.ndarray):
        if isinstance(x, (str, bytes, dict, set)) or not (
                hasattr(x, "__array__") or isinstance(x, (list, tuple, numbers.Real))):
            raise TypeError(f"{name}: expected an array of floats (N, C, ...), got "
                            f"{type(x).__name__}")
        try:
            x = np.asarray(x)
        except ValueError as exc:          # ragged nested lists
            raise ValueError(f"{name}: expected an array of floats (N, C, ...), got an "
                             f"array-like NumPy cannot convert ({exc})") from None
    if not is_float(x.dtype):
        raise TypeError(f"{name}: expected a floating-point array (float16, bfloat16, "
                        f"float32 or float64), got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name}: expected at least 2 dimensions (N, C, ...), got shape "
                         f"{x.shape}")
    if x.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got shape {x.shape}")
    return x


def _shown(value):
    """A value as a message shows it: NumPy scalars as their Python value (1.0, not
    np.float64(1.0)), with the type where that is not obvious."""
    if isinstance(value, np.generic):
        return f"{value.item()!r} ({type(value).__name__})"
    if isinstance(value, (int, float, str, type(None))):
        return repr(value)
    return f"{value!r} ({type(value).__name__})"


def as_int(value: Any, name: str, expected: str = "an int") -> int:
    """An integral value (``operator.index``: int, np.int64, ...; not bool or float)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected {expected}, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected {expected}, got {_shown(value)}") from None


def as_axis(axis: object, shape: tuple, name: str = "axis") -> int:
    """A channel axis of an array of ``shape``, as a non-negative int."""
    ndim = len(shape)
    index = as_int(axis, name)
    if not -ndim <= index < ndim:
        raise ValueError(f"{name}: expected an int in [-{ndim}, {ndim}) for input of shape "
                         f"{shape}, got {index}")
    return index % ndim


def as_kind(kind):
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind: expected 'batch', 'instance' or 'group', got {kind!r}")
    return kind


def as_num_groups(num_groups, channels):
    """``num_groups`` for kind='group': a positive int that divides ``channels``."""
    expected = f"a positive int dividing the {channels} channels"
    if num_groups is None:
        raise ValueError(f"num_groups: kind='group' needs {expected}, got None")
    g = as_int(num_groups, "num_groups", expected)
    if g < 1 or channels % g:
        raise ValueError(f"num_groups: expected {expected}, got {g}")
    return g


def as_eps(eps: object, name: str = "eps") -> float:
    """A finite real number >= 0, as float (0 is allowed: nothing is divided by it)."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (numbers.Real, np.floating)):
        raise TypeError(f"{name}: expected a real number >= 0, got {_shown(eps)}")
    value = float(eps)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name}: expected a finite real number >= 0, got {value!r}")
    return value


def as_flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)
