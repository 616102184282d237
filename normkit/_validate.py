"""Every check of user input, and every message it raises, lives here.

The error contract (``docs/api.md``): a wrong dtype is a TypeError naming the
dtype; a wrong shape is a ValueError naming the expected and the actual shape; a bad
argument names the argument. Messages share one shape,
``"<argument>: expected <what>, got <what was given>"`` (prefixed with the function
when that helps), e.g. ``"weight: expected shape (16,), got shape (8,)"``.
Nothing here modifies its arguments.
"""
from __future__ import annotations

import numbers
import operator

import ml_dtypes
import numpy as np

_FLOAT_SIZES = (2, 4, 8)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
# ml_dtypes' bfloat16 (NumPy kind "V", its type number assigned at import): recognised
# by dtype identity, here and nowhere else, never by its name
BF16 = np.dtype(ml_dtypes.bfloat16)
HALF_DTYPES = (F16, BF16)


# ---------------------------------------------------------------- describing values
def given(value) -> str:
    """How a message shows what the caller passed: its type and a short repr."""
    if isinstance(value, np.ndarray):
        return f"{type(value).__name__} of dtype {value.dtype} and shape {value.shape}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _prefix(what) -> str:
    return f"{what}: " if what else ""


# ---------------------------------------------------------------- scalar arguments
def int_arg(value, name: str, what: str = "", minimum=None) -> int:
    """An integral number (int, np.integer, anything with __index__; not bool, not float)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{_prefix(what)}{name}: expected an int, got {given(value)}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{_prefix(what)}{name}: expected an int, got {given(value)}") \
            from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{_prefix(what)}{name}: expected an int >= {minimum}, got {value}")
    return value


def real_arg(value, name: str, what: str = "") -> float:
    """A real number as a float (int, float, NumPy scalars; not bool, str or None).

    Strings are not parsed (``eps='1e-5'`` is a TypeError, as in torch).
    """
    if type(value) is float:       # the common case, before the slower ABC check
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{_prefix(what)}{name}: expected a real number, got "
                        f"{given(value)}")
    return float(value)


def check_eps(eps, what: str) -> float:
    """eps as a float. Only its type is checked here, and batch_norm's sign.

    As torch: ``batch_norm`` needs ``eps >= 0`` (and, training, ``eps > 0``, checked by
    the engine); ``layer_norm``, ``group_norm``, ``instance_norm`` and ``rms_norm``
    accept any real eps, negative included (NaN where var + eps < 0: the caller's eps).
    """
    eps = real_arg(eps, "eps", what)
    if what == "batch_norm" and eps < 0.0:          # NaN passes, as in torch
        raise ValueError(f"batch_norm: eps: expected a number >= 0, got {eps}")
    return eps


def check_momentum(momentum, what: str) -> float:
    if momentum is None:
        raise ValueError(f"{what}: the functional form needs a float momentum; "
                         "momentum=None (cumulative average) is a layer option")
    return real_arg(momentum, "momentum", what)


# ---------------------------------------------------------------- arrays
def is_dask(x) -> bool:
    """A Dask collection (checked without importing dask)."""
    return hasattr(x, "__dask_graph__")


def reject_masked(x, name: str = "x"):
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name}: expected a plain array, got a numpy.ma.MaskedArray; its "
                        "mask would be ignored. Pass x.filled(value) to choose what the "
                        "masked elements are, or x.data to use the values under the mask")


def as_input(x, name: str = "x", min_ndim: int = 1) -> np.ndarray:
    """x as an ndarray of a supported float dtype (no copy for ndarrays).

    Array-likes (lists, tuples, NumPy scalars, anything with ``__array__``) are
    converted here, once; masked arrays are refused (their mask would be ignored).
    """
    if type(x) is not np.ndarray:
        reject_masked(x, name)
        if not hasattr(x, "__array__") and not isinstance(x, (list, tuple, np.generic)):
            raise TypeError(f"{name}: expected a NumPy array, got {given(x)}")
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as exc:   # ragged lists and the like
            raise TypeError(f"{name}: expected an array-like of floats, got "
                            f"{type(x).__name__} that NumPy cannot convert ({exc})") from None
    dt = x.dtype
    if not is_float(dt):
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 array, "
                        f"got dtype {dt}")
    if x.ndim < min_ndim:
        layout = " (N, C, ...)" if min_ndim >= 2 else ""
        plural = "s" * (min_ndim > 1)
        raise ValueError(f"{name} must have at least {min_ndim} dimension{plural}: expected "
                         f"shape{layout} with ndim >= {min_ndim}, got shape {x.shape}")
    return x


def is_float(dt: np.dtype) -> bool:
    """float16/32/64 in either byte order, or bfloat16: the dtypes normkit takes."""
    return (dt.kind == "f" and dt.itemsize in _FLOAT_SIZES) or dt == BF16


def is_half(dt: np.dtype) -> bool:
    """float16 (either byte order) or bfloat16."""
    return dt.itemsize == 2 and is_float(dt)


def storage_dtype(dt: np.dtype) -> np.dtype:
    """The dtype kernels read and write for data of dtype ``dt``: itself, native order."""
    return dt if dt.isnative else dt.newbyteorder("=")


def param_dtype(dt: np.dtype) -> np.dtype:
    """The kernels' parameter dtype (and that of returned statistics) for data of dtype
    ``dt``: float64 for float64 data, float32 for float32, float16 and bfloat16."""
    return F64 if dt.itemsize == 8 else F32


def default_rms_eps(dt: np.dtype) -> float:
    """rms_norm's ``eps=None``, as torch 2.13: the epsilon of the dtype the statistics
    are computed in -- the input's own for float32/float64, float32's for 16-bit input
    (torch takes its opmath type's epsilon there, not float16's or bfloat16's)."""
    return float(np.finfo(param_dtype(dt)).eps)


def channel_axis(x: np.ndarray, axis, what: str, allow_batch_axis: bool = True) -> int:
    axis = int_arg(axis, "axis", what)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{what}: axis {axis} is out of range for input of shape {x.shape} "
                         f"(expected -{x.ndim} <= axis < {x.ndim})")
    axis %= x.ndim
    if axis == 0 and not allow_batch_axis:
        raise ValueError(f"{what}: the channel axis cannot be the batch axis 0 "
                         f"(input shape {x.shape})")
    return axis


def axis_hint(x_shape: tuple, ax: int, channels: int, how: str = "pass") -> str:
    """``"; its last axis has 16: for channels-last input pass axis=-1"`` or ``""``."""
    last = len(x_shape) - 1
    if ax != last and x_shape[last] == channels:
        return f"; its last axis has {channels}: for channels-last input {how} axis=-1"
    if ax != 1 and len(x_shape) > 2 and x_shape[1] == channels:
        return f"; its axis 1 has {channels}: for channels-first input {how} axis=1"
    return ""


def wrong_channels(x_shape: tuple, ax: int, channels: int, what: str,
                   how: str = "pass") -> str:
    """An input without ``channels`` channels on its channel axis ``ax`` (layers)."""
    return (f"{what}: expected {channels} channels on axis {ax}, got input of shape "
            f"{tuple(x_shape)} with {x_shape[ax]} on axis {ax}"
            + axis_hint(x_shape, ax, channels, how))


def check_channels(x: np.ndarray, ax: int, what: str, **params):
    """Each 1-D per-channel parameter given must have x.shape[ax] entries.

    Run before the parameters' own checks, so that the message names the channel
    axis and the input's shape, and suggests the axis that would match.
    """
    expected = (x.shape[ax],)
    for name, p in params.items():
        if p is None or (type(p) is np.ndarray and p.shape == expected):
            continue               # the common case in a few hundred nanoseconds
        shape: tuple[int, ...] = () if isinstance(p, (str, bytes)) else np.shape(p)
        if len(shape) == 1 and shape != expected:
            c = expected[0]
            raise ValueError(f"{what}: {name}: expected shape ({c},) for the {c} channels "
                             f"on axis {ax} of the input of shape {x.shape}, got shape "
                             f"{shape}" + axis_hint(x.shape, ax, shape[0]))


def as_param(p, shape: tuple, name: str, dtype=F64):
    """A weight/bias/statistic of exactly ``shape``, as a contiguous array of ``dtype``."""
    if p is None:
        return None
    if type(p) is not np.ndarray:
        reject_masked(p, name)
        p = np.asarray(p)
    if p.dtype.kind != "f" and p.dtype != BF16:     # any float dtype, bfloat16 included
        raise TypeError(f"{name} must be a float array, got dtype {p.dtype}")
    if p.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got shape {p.shape}")
    return np.ascontiguousarray(p, dtype=dtype)


def running_stat(p, shape: tuple, name: str):
    """A running statistic updated in place: must be a writable float ndarray of ``shape``."""
    if p is None:
        return None
    if not isinstance(p, np.ndarray) or isinstance(p, np.ma.MaskedArray):
        raise TypeError(f"{name} must be a NumPy array (it is updated in place), "
                        f"got {type(p).__name__}")
    if p.dtype.kind != "f" and p.dtype != BF16:     # any float dtype, bfloat16 included
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
    if not isinstance(out, np.ndarray) or isinstance(out, np.ma.MaskedArray):
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


# ---------------------------------------------------------------- shapes and groups
def shape_arg(ns, what: str = "", name: str = "normalized_shape") -> tuple:
    """An int or a sequence of ints (each >= 0) as a non-empty tuple; floats refused.

    One rule for the functional fast and general paths and for the layers.
    """
    expected = "an int or a tuple of ints"
    if isinstance(ns, (bool, np.bool_, str, bytes)) or ns is None:
        raise TypeError(f"{_prefix(what)}{name}: expected {expected}, got {given(ns)}")
    try:
        dims = (operator.index(ns),)
    except TypeError:
        try:
            dims = tuple(ns)
        except TypeError:
            raise TypeError(f"{_prefix(what)}{name}: expected {expected}, got "
                            f"{given(ns)}") from None
    out = []
    for i, d in enumerate(dims):
        if isinstance(d, (bool, np.bool_)) or not hasattr(d, "__index__"):
            raise TypeError(f"{_prefix(what)}{name}: expected {expected}, got {given(ns)} "
                            f"(element {i} is {given(d)})")
        out.append(operator.index(d))
    if not out:
        raise ValueError(f"{_prefix(what)}{name}: expected at least one dimension, got ()")
    if min(out) < 0:
        raise ValueError(f"{_prefix(what)}{name}: expected non-negative dimensions, got "
                         f"{tuple(out)}")
    return tuple(out)


def normalized_shape(ns, x: np.ndarray, what: str) -> tuple:
    ns = shape_arg(ns, what)
    if len(ns) > x.ndim or x.shape[x.ndim - len(ns):] != ns:
        raise ValueError(f"{what}: normalized_shape {ns} must be a suffix of the input "
                         f"shape: expected input of shape (*, {', '.join(map(str, ns))}), "
                         f"got input of shape {x.shape}")
    return ns


def num_groups(g, channels: int, x: np.ndarray) -> int:
    g = int_arg(g, "num_groups", "group_norm")
    if g < 1 or channels % g:
        raise ValueError(f"group_norm: expected the number of channels ({channels}) to be "
                         f"divisible by num_groups, got num_groups={g} for input of shape "
                         f"{x.shape}")
    return g


def same_shape(grad_out, x: np.ndarray, what: str) -> np.ndarray:
    grad_out = as_input(grad_out, "grad_out")
    if grad_out.shape != x.shape:
        raise ValueError(f"{what}: grad_out must have the shape of x: expected {x.shape}, "
                         f"got {grad_out.shape}")
    return grad_out
