"""Every check of user input, and every message it raises, lives here.

The error contract (``../shared/API.md``): a wrong dtype is a TypeError naming the
dtype; a wrong shape is a ValueError naming the expected and the actual shape.
Nothing here modifies its arguments.
"""
from __future__ import annotations

import operator

import numpy as np

_FLOAT_SIZES = (2, 4, 8)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)


def as_input(x, name: str = "x", min_ndim: int = 1) -> np.ndarray:
    """x as an ndarray of a supported float dtype (no copy for ndarrays)."""
    if type(x) is not np.ndarray:
        if not hasattr(x, "__array__") and not isinstance(x, (list, tuple, np.generic)):
            raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
        x = np.asarray(x)
    dt = x.dtype
    if dt.kind != "f" or dt.itemsize not in _FLOAT_SIZES:
        raise TypeError(f"{name} must be a float16, float32 or float64 array, got dtype {dt}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions "
                         f"(expected shape (N, C, ...)), got shape {x.shape}")
    return x


def compute_dtype(x: np.ndarray) -> np.dtype:
    """float16 (and float32) compute in float32; float64 in float64; always native order."""
    return F64 if x.dtype.itemsize == 8 else F32


def channel_axis(x: np.ndarray, axis, what: str, allow_batch_axis: bool = True) -> int:
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"{what}: axis must be an int, got {type(axis).__name__}") from None
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{what}: axis {axis} is out of range for input of shape {x.shape} "
                         f"(expected -{x.ndim} <= axis < {x.ndim})")
    axis %= x.ndim
    if axis == 0 and not allow_batch_axis:
        raise ValueError(f"{what}: the channel axis cannot be the batch axis 0 "
                         f"(input shape {x.shape})")
    return axis


def as_param(p, shape: tuple, name: str, dtype=F64):
    """A weight/bias/statistic of exactly ``shape``, as a contiguous array of ``dtype``."""
    if p is None:
        return None
    if type(p) is not np.ndarray:
        p = np.asarray(p)
    if p.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {p.dtype}")
    if p.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got shape {p.shape}")
    return np.ascontiguousarray(p, dtype=dtype)


def running_stat(p, shape: tuple, name: str):
    """A running statistic updated in place: must be a writable float ndarray of ``shape``."""
    if p is None:
        return None
    if type(p) is not np.ndarray and not isinstance(p, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array (it is updated in place), "
                        f"got {type(p).__name__}")
    if p.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {p.dtype}")
    if p.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got shape {p.shape}")
    return p


def check_writable(p, name: str):
    if p is not None and not p.flags.writeable:
        raise ValueError(f"{name} is read-only but training mode updates it in place")


def check_out(out, x: np.ndarray):
    """``out`` must match x's shape and dtype; it may be x itself but not partly overlap it."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"out: expected shape {x.shape}, got shape {out.shape}")
    if out.dtype != x.dtype:
        raise ValueError(f"out: expected dtype {x.dtype}, got dtype {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if out is not x and np.may_share_memory(out, x):
        same_view = (out.__array_interface__["data"][0] == x.__array_interface__["data"][0]
                     and out.strides == x.strides)
        if not same_view and np.shares_memory(out, x):
            raise ValueError("out partially overlaps x: pass out=x for in-place or a "
                             "separate array")
    return out


def normalized_shape(ns, x: np.ndarray, what: str) -> tuple:
    if isinstance(ns, (int, np.integer)):
        ns = (int(ns),)
    try:
        ns = tuple(operator.index(d) for d in ns)
    except TypeError:
        raise TypeError(f"{what}: normalized_shape must be an int or a tuple of ints, "
                        f"got {ns!r}") from None
    if len(ns) == 0 or len(ns) > x.ndim or x.shape[x.ndim - len(ns):] != ns:
        raise ValueError(f"{what}: normalized_shape {ns} must be a suffix of the input "
                         f"shape: expected input of shape (*, {', '.join(map(str, ns))}), "
                         f"got input of shape {x.shape}")
    return ns


def num_groups(g, channels: int, x: np.ndarray) -> int:
    try:
        g = operator.index(g)
    except TypeError:
        raise TypeError(f"group_norm: num_groups must be an int, got {type(g).__name__}") from None
    if g < 1 or channels % g:
        raise ValueError(f"group_norm: expected the number of channels ({channels}) to be "
                         f"divisible by num_groups, got num_groups={g} for input of shape "
                         f"{x.shape}")
    return g


def check_eps(eps, what: str) -> float:
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"{what}: eps must be >= 0, got {eps}")
    return eps


def check_momentum(momentum, what: str) -> float:
    if momentum is None:
        raise ValueError(f"{what}: the functional form needs a float momentum; "
                         "momentum=None (cumulative average) is a layer option")
    return float(momentum)


def same_shape(grad_out, x: np.ndarray, what: str) -> np.ndarray:
    grad_out = as_input(grad_out, "grad_out")
    if grad_out.shape != x.shape:
        raise ValueError(f"{what}: grad_out must have the shape of x: expected {x.shape}, "
                         f"got {grad_out.shape}")
    return grad_out
