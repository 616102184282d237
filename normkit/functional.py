"""The five normalizations and their backward forms, on NumPy arrays.

Every function follows the same steps: validate (``_validate``), view the input in a
canonical shape (``_canonical``), and hand both to the engine (``_engine``), which
computes float64 statistics with the backend's kernels, folds weight/bias/statistics
into per-channel coefficients and runs one elementwise kernel. Which backend runs is
decided once, by ``backends.resolve``.

Semantics (statistics, momentum, biased/unbiased variance, eps placement, empty
inputs) follow ``torch.nn.functional``; see ``docs/api.md``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
from numpy.typing import ArrayLike

from . import _engine as E
from . import _validate as V
from ._canonical import batch_view, kernel_array, sample_view
from .backends import resolve
from .backends.numpy_ref import narrow
from .dask._hook import dask_aware

# What the functions return: y, or (y, mean, rstd) with return_stats=True (mean is None
# for rms_norm); Dask input gives Dask arrays (docs/dask.md). The backward functions:
# (grad_x, grad_weight, grad_bias), the last two None where there is no weight / bias.
Result: TypeAlias = "np.ndarray | tuple[np.ndarray, np.ndarray | None, np.ndarray]"
Grads: TypeAlias = "tuple[np.ndarray, np.ndarray | None, np.ndarray | None]"

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "rms_norm",
    "rms_norm_backward",
]


# ---------------------------------------------------------------- fast paths
# The common inference call (contiguous aligned native float16/bfloat16/float32/float64
# input, parameters of its parameter dtype -- float32 for 16-bit data, as torch's
# autocast layout -- or of x's 16-bit dtype, no out=, return_stats or not) skips the
# general validation and view machinery: per-call overhead dominates on small inputs.
# Anything else takes the general path, which validates fully; so must the fast path
# never accept what the general path rejects, and it gives the same bits
# (tests/test_call_overhead_paths.py).
_FAST_DTYPES = (V.F32, V.F64, V.F16, V.BF16)
# data dtype -> the parameter dtypes its fast path takes: the parameter dtype, or the
# data's own 16-bit dtype (widened exactly by the engine)
_FAST_PARAMS = {V.F32: (V.F32,), V.F64: (V.F64,), V.F16: (V.F32, V.F16),
                V.BF16: (V.F32, V.BF16)}


def _fast_input(x, eps):
    """The parameter dtypes the fast path takes for x, or None when x (contiguous,
    aligned, native, not empty) or eps (a float >= 0) does not suit it."""
    if type(x) is not np.ndarray or type(eps) is not float or not eps >= 0.0:
        return None
    dtypes = _FAST_PARAMS.get(x.dtype)
    if dtypes is None or x.size == 0:
        return None
    flags = x.flags
    return dtypes if flags.c_contiguous and flags.aligned else None


def _fast_param(p, n, dtypes, as_is=True):
    """None, or a 1-D ndarray of length n and one of ``dtypes``; contiguous and aligned
    too when the kernels get it ``as_is`` (BatchNorm's are always folded into copies)."""
    if p is None:
        return True
    if type(p) is not np.ndarray or p.shape != (n,) or p.dtype not in dtypes:
        return False
    return not as_is or (p.flags.c_contiguous and p.flags.aligned)


def _fast_rows(x, ns, weight, bias, eps, backend, rms, return_stats):
    """LayerNorm/RMSNorm over the last axis, or None when the general path is needed."""
    dtypes = _fast_input(x, eps)
    if dtypes is None or x.ndim == 0:
        return None
    k = x.shape[-1]
    if not ((type(ns) is int and ns == k)
            or (type(ns) is tuple and len(ns) == 1 and type(ns[0]) is int and ns[0] == k)):
        return None
    if not (_fast_param(weight, k, dtypes) and _fast_param(bias, k, dtypes)):
        return None
    return E.fast_rows(resolve(backend), x, weight, bias, eps, rms, return_stats)


def _fast_channels(x, eps, axis, weight, bias):
    """BatchNorm's fast-path guard shared by eval and training: x contiguous with its
    channels on axis 1 or -1, weight/bias of length C (or None). Returns (the accepted
    parameter dtypes, C), or None for the general path."""
    dtypes = _fast_input(x, eps)
    if dtypes is None or x.ndim < 2 or type(axis) is not int or not (axis == 1 or axis == -1):
        return None
    c = x.shape[axis]
    if not (_fast_param(weight, c, dtypes, False) and _fast_param(bias, c, dtypes, False)):
        return None
    return dtypes, c


def _fast_batch_norm_eval(x, running_mean, running_var, weight, bias, eps, axis, backend,
                          return_stats):
    """Eval-mode BatchNorm on channels-first (axis=1) or channels-last (axis=-1) input."""
    ok = _fast_channels(x, eps, axis, weight, bias)
    if ok is None:
        return None
    dtypes, c = ok
    if not (running_mean is not None and running_var is not None
            and _fast_param(running_mean, c, dtypes, False)
            and _fast_param(running_var, c, dtypes, False)):
        return None
    return E.fast_batch_norm_eval(resolve(backend), x, axis % x.ndim, running_mean,
                                  running_var, weight, bias, eps, return_stats)


def _fast_batch_norm_train(x, running_mean, running_var, weight, bias, momentum, eps, axis,
                           backend, return_stats):
    """Training-mode BatchNorm (axis=1 or -1) with writable running statistics, or None.

    The general path's own tail, without its per-argument checks: a small training
    call spent ~40% of its Python time validating arguments this guard accepts in a
    few attribute tests."""
    if type(momentum) is not float or not (type(eps) is float and eps > 0.0):
        return None
    ok = _fast_channels(x, eps, axis, weight, bias)
    if ok is None or x.size == ok[1]:   # one value per channel: the general path's error
        return None
    dtypes, c = ok
    for p in (running_mean, running_var):
        if p is not None and not (_fast_param(p, c, dtypes, False) and p.flags.writeable):
            return None
    w = None if weight is None else weight.astype(np.float64)     # as V.as_param does
    b = None if bias is None else bias.astype(np.float64)
    return _batch_norm_run(x, axis % x.ndim, (running_mean, running_var), w, b, True,
                           momentum, eps, None, backend, return_stats, (None, False))


def _fast_group_norm(x, groups, weight, bias, eps, axis, backend, return_stats):
    """GroupNorm (InstanceNorm: groups == C) on channels-first input (axis=1)."""
    dtypes = _fast_input(x, eps)
    if (dtypes is None or x.ndim < 2 or type(axis) is not int or axis != 1
            or type(groups) is not int):
        return None
    c = x.shape[1]
    if not (groups >= 1 and c % groups == 0 and _fast_param(weight, c, dtypes)
            and _fast_param(bias, c, dtypes)):
        return None
    return E.fast_group_norm(resolve(backend), x, groups, weight, bias, eps, return_stats)


def _eps(eps, what, negative_ok=False):
    """A validated eps; torch computes layer/group/instance/rms norm with eps < 0 too."""
    if negative_ok and isinstance(eps, numbers.Real) and eps < 0:
        return float(eps)
    return V.check_eps(eps, what)


def _count_without(shape, *axes):
    """How many values share one statistic: the product of the other axes' sizes."""
    return math.prod(d for i, d in enumerate(shape) if i not in axes)


# ====================================================================== BatchNorm
@dask_aware("batch_norm")
def batch_norm(x: ArrayLike, running_mean: np.ndarray | None = None,
               running_var: np.ndarray | None = None, weight: ArrayLike | None = None,
               bias: ArrayLike | None = None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5, *, axis: int = 1, out: np.ndarray | None = None,
               backend: str | None = None, return_stats: bool = False,
               activation: str | None = None, residual: ArrayLike | None = None) -> Result:
    """Batch normalization over every axis but the channel axis.

    Parameters
    ----------
    x : ndarray
        Input of float16/bfloat16/float32/float64 dtype and ndim >= 2, channels on
        ``axis``. 16-bit data is read and written as it is (no float32 copy);
        ``weight``, ``bias`` and the running statistics may be of any float dtype.
    running_mean, running_var : ndarray of shape (C,), optional
        Running statistics. Used in eval mode (required there); updated in place in
        training mode (``running_var`` with the unbiased batch variance), as torch.
    weight, bias : ndarray of shape (C,), optional
        Affine parameters (identity when omitted).
    training : bool
        Use batch statistics (True) or the running statistics (False).
    momentum : float
        Weight of the new batch in the running statistics.
    eps : float
        Added to the variance inside the square root; must be > 0 in training mode.
    axis : int, keyword-only
        The channel axis: 1 for NCHW (default), -1 for channels-last.
    out : ndarray, optional
        Output array of x's shape and dtype; may be ``x`` itself.
    backend : str, optional
        Backend for this call (default: the current default).
    return_stats : bool
        Also return ``(mean, rstd)`` of shape (C,) (the running statistics in eval).
    activation : {None, 'relu'}
        Apply ReLU to the result in the same pass (inference pipelines: conv-BN-ReLU).
    residual : ndarray, optional
        An array of x's shape added before the activation, in the same pass
        (``relu(bn(x) + residual)``, a ResNet block's tail). Not differentiated by
        :func:`batch_norm_backward`, which covers the normalization only.

    Returns
    -------
    y or (y, mean, rstd)
        An empty input gives an empty output (NaN statistics) and leaves the running
        statistics as they are, as torch.
    """
    if out is None and activation is None and residual is None:
        if training:
            y = _fast_batch_norm_train(x, running_mean, running_var, weight, bias, momentum,
                                       eps, axis, backend, return_stats)
        else:
            y = _fast_batch_norm_eval(x, running_mean, running_var, weight, bias, eps, axis,
                                      backend, return_stats)
        if y is not None:
            return y
    x, ax, running, w, b, eps, momentum, out, epilogue = _batch_norm_args(
        x, running_mean, running_var, weight, bias, training, momentum, eps, axis, out,
        activation, residual)
    return _batch_norm_run(x, ax, running, w, b, training, momentum, eps, out, backend,
                           return_stats, epilogue)


def _batch_norm_args(x, running_mean, running_var, weight, bias, training, momentum, eps,
                     axis, out, activation, residual):
    """batch_norm's arguments validated, and none of them sharing memory with ``out``."""
    x = V.as_input(x, min_ndim=2)
    ax = V.channel_axis(x, axis, "batch_norm")
    V.check_channels(x, ax, "batch_norm", running_mean=running_mean,
                     running_var=running_var, weight=weight, bias=bias)
    shape = (x.shape[ax],)
    running_mean = V.running_stat(running_mean, shape, "running_mean")
    running_var = V.running_stat(running_var, shape, "running_var")
    w = V.as_param(weight, shape, "weight")
    b = V.as_param(bias, shape, "bias")
    if training:
        E.check_training_eps(eps)
    eps = V.check_eps(eps, "batch_norm")
    out = V.check_out(out, x)
    residual, relu = _check_activation(activation, residual, x)
    if training:
        momentum = V.check_momentum(momentum, "batch_norm")
        if _count_without(x.shape, ax) == 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {x.shape}")
        V.check_writable(running_mean, "running_mean")
        V.check_writable(running_var, "running_var")
    elif running_mean is None or running_var is None:
        raise ValueError("batch_norm: eval mode (training=False) needs running_mean and "
                         "running_var; pass them or use training=True")
    w, b, running_mean, running_var, residual = E.apart_from_out(
        out, [("weight", w), ("bias", b), ("running_mean", running_mean),
              ("running_var", running_var), ("residual", residual)],
        updated=("running_mean", "running_var") if training else ())
    return x, ax, (running_mean, running_var), w, b, eps, momentum, out, (residual, relu)


def _batch_norm_run(x, ax, running, w, b, training, momentum, eps, out, backend,
                    return_stats, epilogue):
    dt = V.param_dtype(x.dtype)
    be = resolve(backend)
    if x.size == 0:
        return E.empty_result(x, out, (x.shape[ax],), dt, return_stats)
    view = batch_view(x, ax, V.storage_dtype(x.dtype))
    res, mean, rstd = E.batch_norm(be, view, running, w, b, training, momentum, eps, out,
                                   epilogue)
    y = view.to_user(res, out, x.dtype)
    if return_stats:
        return y, E.stat_out(mean, dt), E.stat_out(rstd, dt)
    return y


def _check_activation(activation, residual, x):
    """(residual or None, relu: bool) for the fused eval-time epilogue."""
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    if residual is not None:
        residual = V.as_input(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected shape {x.shape}, got shape "
                             f"{residual.shape}")
    return residual, activation == "relu"


# ====================================================================== Group / Instance
@dask_aware("group_norm")
def group_norm(x: ArrayLike, num_groups: int, weight: ArrayLike | None = None,
               bias: ArrayLike | None = None, eps: float = 1e-5, *, axis: int = 1,
               out: np.ndarray | None = None, backend: str | None = None,
               return_stats: bool = False, activation: str | None = None,
               residual: ArrayLike | None = None) -> Result:
    """Group normalization: statistics per sample over each group of channels.

    Parameters
    ----------
    x : ndarray
        Input (N, C, ...) for ``axis=1`` or (N, ..., C) for ``axis=-1``; ndim >= 2.
    num_groups : int
        Number of groups; must divide C.
    weight, bias : ndarray of shape (C,), optional
        Per-channel affine parameters.
    eps : float
        Added to the variance inside the square root (a negative eps is used as
        given: NaN where var + eps < 0, as torch).
    axis : int, keyword-only
        The channel axis (not 0, the batch axis).
    out, backend, return_stats, activation, residual
        As in :func:`batch_norm`; statistics have shape (N, num_groups).
    """
    if out is None and activation is None and residual is None:
        y = _fast_group_norm(x, num_groups, weight, bias, eps, axis, backend, return_stats)
        if y is not None:
            return y
    x = V.as_input(x, min_ndim=2)
    ax = V.channel_axis(x, axis, "group_norm", allow_batch_axis=False)
    V.check_channels(x, ax, "group_norm", weight=weight, bias=bias)
    c = x.shape[ax]
    groups = V.num_groups(num_groups, c, x)
    w = V.as_param(weight, (c,), "weight")
    b = V.as_param(bias, (c,), "bias")
    eps = _eps(eps, "group_norm", negative_ok=True)
    out = V.check_out(out, x)
    residual, relu = _check_activation(activation, residual, x)
    w, b, residual = E.apart_from_out(out, [("weight", w), ("bias", b),
                                            ("residual", residual)])
    dt = V.param_dtype(x.dtype)
    be = resolve(backend)
    if x.size == 0:
        return E.empty_result(x, out, (x.shape[0], groups), dt, return_stats)
    view = sample_view(x, ax, V.storage_dtype(x.dtype))
    res, mean, rstd, _ = E.per_sample_forward(be, view, groups, w, b, eps, out,
                                              epilogue=(residual, relu))
    y = view.to_user(res, out, x.dtype)
    if return_stats:
        return y, E.stat_out(mean, dt), E.stat_out(rstd, dt)
    return y


@dask_aware("instance_norm")
def instance_norm(x: ArrayLike, running_mean: np.ndarray | None = None,
                  running_var: np.ndarray | None = None, weight: ArrayLike | None = None,
                  bias: ArrayLike | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5, *, axis: int = 1,
                  out: np.ndarray | None = None, backend: str | None = None,
                  return_stats: bool = False) -> Result:
    """Instance normalization: statistics per sample and channel over the spatial axes.

    Parameters
    ----------
    x : ndarray
        Input (N, C, ...) for ``axis=1`` or (N, ..., C) for ``axis=-1``; ndim >= 2.
    running_mean, running_var : ndarray of shape (C,), optional
        Updated in place (mean over the batch of the per-instance statistics, unbiased
        variance) when ``use_input_stats``; used for normalization otherwise.
    weight, bias : ndarray of shape (C,), optional
    use_input_stats : bool
        Normalize with each instance's own statistics (True) or the running ones.
    momentum, eps, axis, out, backend, return_stats
        As in :func:`batch_norm` (eps may be negative, as in :func:`group_norm`);
        statistics have shape (N, C).
    """
    if (use_input_stats is True and running_mean is None and running_var is None
            and out is None and type(momentum) is float and type(x) is np.ndarray
            and x.ndim >= 2 and x.size > x.shape[0] * x.shape[1] > 0):
        # more than one spatial element per instance, as the general path demands
        y = _fast_group_norm(x, x.shape[1], weight, bias, eps, axis, backend, return_stats)
        if y is not None:
            return y
    x = V.as_input(x, min_ndim=2)
    ax = V.channel_axis(x, axis, "instance_norm", allow_batch_axis=False)
    V.check_channels(x, ax, "instance_norm", running_mean=running_mean,
                     running_var=running_var, weight=weight, bias=bias)
    c = x.shape[ax]
    running = (V.running_stat(running_mean, (c,), "running_mean"),
               V.running_stat(running_var, (c,), "running_var"))
    w = V.as_param(weight, (c,), "weight")
    b = V.as_param(bias, (c,), "bias")
    eps = _eps(eps, "instance_norm", negative_ok=True)
    out = V.check_out(out, x)
    if use_input_stats:
        momentum = V.check_momentum(momentum, "instance_norm")
        if _count_without(x.shape, 0, ax) == 1:
            raise ValueError("Expected more than 1 spatial element when training, "
                             f"got input size {x.shape}")
        V.check_writable(running[0], "running_mean")
        V.check_writable(running[1], "running_var")
    elif running[0] is None or running[1] is None:
        raise ValueError("instance_norm: use_input_stats=False needs running_mean and "
                         "running_var")
    *running, w, b = E.apart_from_out(
        out, [("running_mean", running[0]), ("running_var", running[1]), ("weight", w),
              ("bias", b)], updated=("running_mean", "running_var") if use_input_stats else ())
    return _instance_norm_run(x, ax, running, w, b, use_input_stats, momentum, eps, out,
                              backend, return_stats)


def _instance_norm_run(x, ax, running, w, b, use_input_stats, momentum, eps, out, backend,
                       return_stats):
    dt = V.param_dtype(x.dtype)
    be = resolve(backend)
    if x.size == 0:
        return E.empty_result(x, out, (x.shape[0], x.shape[ax]), dt, return_stats)
    view = sample_view(x, ax, V.storage_dtype(x.dtype))
    running_mean, running_var = running
    fixed = None if use_input_stats else (running_mean.astype(np.float64),
                                          running_var.astype(np.float64))
    res, mean, rstd, m2 = E.per_sample_forward(
        be, view, view.c, w, b, eps, out, fixed_stats=fixed,
        need_m2=use_input_stats and running_var is not None)
    if use_input_stats:     # after the kernel: torch's running statistics of instances
        E.update_instance_running(running_mean, running_var, mean, m2, view.s, momentum)
    y = view.to_user(res, out, x.dtype)
    if return_stats:
        return y, E.stat_out(mean, dt), E.stat_out(rstd, dt)
    return y


# ====================================================================== Layer / RMS
def _rows_forward(x, ns, weight, bias, eps, out, backend, return_stats, rms):
    k = math.prod(ns)
    stats_shape = x.shape[:x.ndim - len(ns)]
    dt = V.param_dtype(x.dtype)
    w = V.as_param(weight, ns, "weight", dt)
    b = V.as_param(bias, ns, "bias", dt)
    out = V.check_out(out, x)
    w, b = E.apart_from_out(out, [("weight", w), ("bias", b)])
    be = resolve(backend)
    if x.size == 0:
        return E.empty_result(x, out, stats_shape, dt, return_stats, with_mean=not rms)
    w = E.constant(1.0, k, dt) if w is None else kernel_array(w, dt).reshape(k)
    b = E.constant(0.0, k, dt) if b is None else kernel_array(b, dt).reshape(k)
    y, mean, rstd = E.rows_forward(be, x, k, w, b, eps, out, rms, V.storage_dtype(x.dtype))
    if return_stats:
        return (y, None if rms else E.stat_out(mean, dt, stats_shape),
                E.stat_out(rstd, dt, stats_shape))
    return y


@dask_aware("layer_norm")
def layer_norm(x: ArrayLike, normalized_shape: int | Sequence[int],
               weight: ArrayLike | None = None, bias: ArrayLike | None = None,
               eps: float = 1e-5, *, out: np.ndarray | None = None,
               backend: str | None = None, return_stats: bool = False) -> Result:
    """Layer normalization over the trailing ``normalized_shape`` axes.

    Parameters
    ----------
    x : ndarray
        Input whose shape ends with ``normalized_shape``.
    normalized_shape : int or tuple of int
    weight, bias : ndarray of shape ``normalized_shape``, optional
    eps : float
        May be negative, as in :func:`group_norm`.
    out, backend, return_stats
        As in :func:`batch_norm`; statistics have shape ``x.shape[:-len(normalized_shape)]``.
    """
    if out is None:
        y = _fast_rows(x, normalized_shape, weight, bias, eps, backend, False, return_stats)
        if y is not None:
            return y
    x = V.as_input(x)
    ns = V.normalized_shape(normalized_shape, x, "layer_norm")
    eps = _eps(eps, "layer_norm", negative_ok=True)
    return _rows_forward(x, ns, weight, bias, eps, out, backend, return_stats, False)


@dask_aware("rms_norm")
def rms_norm(x: ArrayLike, normalized_shape: int | Sequence[int],
             weight: ArrayLike | None = None, eps: float | None = None, *,
             out: np.ndarray | None = None, backend: str | None = None,
             return_stats: bool = False) -> Result:
    """Root-mean-square normalization over the trailing ``normalized_shape`` axes.

    ``eps=None`` uses the machine epsilon of the dtype the statistics are computed in,
    as torch: ``np.finfo(x.dtype).eps`` for float32 and float64 input, float32's for
    float16 and bfloat16 input (torch 2.13 takes its opmath type's epsilon there);
    a negative eps is used as given (NaN where mean(x^2) + eps < 0).
    With ``return_stats=True`` returns ``(y, None, rstd)``.
    """
    if out is None and type(x) is np.ndarray and x.dtype in _FAST_DTYPES:
        y = _fast_rows(x, normalized_shape, weight, None,
                       _default_rms_eps(x) if eps is None else eps, backend, True,
                       return_stats)
        if y is not None:
            return y
    x = V.as_input(x)
    ns = V.normalized_shape(normalized_shape, x, "rms_norm")
    eps = (_default_rms_eps(x) if eps is None
           else _eps(eps, "rms_norm", negative_ok=True))
    return _rows_forward(x, ns, weight, None, eps, out, backend, return_stats, True)


def _default_rms_eps(x):
    return V.default_rms_eps(x.dtype)


# ====================================================================== backward
def _grads_out(gw, gb, weight, dt):
    """grad_weight, grad_bias in the weight's dtype (else ``dt``), each rounded once."""
    dtype = weight.dtype if isinstance(weight, np.ndarray) else dt
    return narrow(gw, dtype), narrow(gb, dtype)


@dask_aware("batch_norm_backward")
def batch_norm_backward(grad_out: ArrayLike, x: ArrayLike, mean: ArrayLike,
                        rstd: ArrayLike, weight: ArrayLike | None = None, *,
                        training: bool = True, axis: int = 1,
                        backend: str | None = None) -> Grads:
    """Gradients of :func:`batch_norm`.

    Parameters
    ----------
    grad_out, x : ndarray
        Upstream gradient and the forward input (same shape).
    mean, rstd : ndarray of shape (C,)
        The statistics ``batch_norm(..., return_stats=True)`` returned.
    weight : ndarray of shape (C,), optional
    training : bool
        Whether the forward used batch statistics (the gradient then flows through
        them) or fixed running statistics.
    axis, backend
        As in :func:`batch_norm`.

    Returns
    -------
    (grad_x, grad_weight, grad_bias)
        ``grad_weight`` and ``grad_bias`` have shape (C,) (computed even without
        affine; zeros for an empty input).
    """
    return _channel_grads("batch_norm_backward", grad_out, x, axis, (mean, rstd), weight,
                          backend, training)


def _channel_grads(what, grad_out, x, axis, stats, weight, backend, batch_stats,
                   per_sample=False, groups_arg=None):
    """BatchNorm (per channel) or Group/InstanceNorm (per sample) backward.

    ``groups_arg`` None with ``per_sample`` is InstanceNorm (one group per channel).
    """
    x = V.as_input(x, min_ndim=2)
    dy = V.same_shape(grad_out, x, what)
    ax = V.channel_axis(x, axis, what, allow_batch_axis=not per_sample)
    n, c = x.shape[0], x.shape[ax]
    groups = c if groups_arg is None else V.num_groups(groups_arg, c, x)
    stats_shape = (n, groups) if per_sample else (c,)
    mean = V.as_param(stats[0], stats_shape, "mean")
    rstd = V.as_param(stats[1], stats_shape, "rstd")
    w = V.as_param(weight, (c,), "weight")
    dt = V.param_dtype(x.dtype)
    be = resolve(backend)
    if x.size == 0:
        return np.zeros_like(x), *_grads_out(np.zeros(c), np.zeros(c), weight, dt)
    view = (sample_view if per_sample else batch_view)(x, ax, V.storage_dtype(x.dtype))
    dyv = view.like(dy, view.data.dtype)
    if per_sample:
        dx, gw, gb = E.per_sample_backward(be, view, dyv, groups, mean, rstd, w, batch_stats)
    else:
        dx, gw, gb = E.batch_norm_backward(be, view, dyv, mean, rstd, w, batch_stats)
    return (view.to_user(dx, None, x.dtype), *_grads_out(gw, gb, weight, dt))


@dask_aware("group_norm_backward")
def group_norm_backward(grad_out: ArrayLike, x: ArrayLike, num_groups: int,
                        mean: ArrayLike, rstd: ArrayLike, weight: ArrayLike | None = None,
                        *, axis: int = 1, backend: str | None = None) -> Grads:
    """Gradients of :func:`group_norm`; ``mean``/``rstd`` of shape (N, num_groups).

    Returns ``(grad_x, grad_weight, grad_bias)``, the last two of shape (C,).
    """
    return _channel_grads("group_norm_backward", grad_out, x, axis, (mean, rstd), weight,
                          backend, True, per_sample=True, groups_arg=num_groups)


@dask_aware("instance_norm_backward")
def instance_norm_backward(grad_out: ArrayLike, x: ArrayLike, mean: ArrayLike,
                           rstd: ArrayLike, weight: ArrayLike | None = None, *,
                           use_input_stats: bool = True, axis: int = 1,
                           backend: str | None = None) -> Grads:
    """Gradients of :func:`instance_norm`; ``mean``/``rstd`` of shape (N, C).

    With ``use_input_stats=False`` the statistics were fixed (running), so no gradient
    flows through them. Returns ``(grad_x, grad_weight, grad_bias)``.
    """
    return _channel_grads("instance_norm_backward", grad_out, x, axis, (mean, rstd),
                          weight, backend, use_input_stats, per_sample=True)


def _rows_backward(what, grad_out, x, normalized_shape, mean, rstd, weight, backend, rms):
    x = V.as_input(x)
    dy = V.same_shape(grad_out, x, what)
    ns = V.normalized_shape(normalized_shape, x, what)
    k = math.prod(ns)
    stats_shape = x.shape[:x.ndim - len(ns)]
    dt = V.param_dtype(x.dtype)
    rows = math.prod(stats_shape)
    mean = np.zeros(rows) if rms else V.as_param(mean, stats_shape, "mean").reshape(rows)
    rstd = V.as_param(rstd, stats_shape, "rstd").reshape(rows)
    w = V.as_param(weight, ns, "weight", dt)
    be = resolve(backend)
    if x.size == 0:
        return np.zeros_like(x), *_grads_out(np.zeros(ns), np.zeros(ns), weight, dt)
    w = E.constant(1.0, k, dt) if w is None else kernel_array(w, dt).reshape(k)
    dx, gw, gb = E.rows_backward(be, dy, x, k, mean, rstd, w, rms, V.storage_dtype(x.dtype))
    return (dx, *_grads_out(gw.reshape(ns), gb.reshape(ns), weight, dt))


@dask_aware("layer_norm_backward")
def layer_norm_backward(grad_out: ArrayLike, x: ArrayLike,
                        normalized_shape: int | Sequence[int], mean: ArrayLike,
                        rstd: ArrayLike, weight: ArrayLike | None = None, *,
                        backend: str | None = None) -> Grads:
    """Gradients of :func:`layer_norm`; ``mean``/``rstd`` as ``return_stats`` gave them.

    Returns ``(grad_x, grad_weight, grad_bias)``, the last two shaped ``normalized_shape``.
    """
    return _rows_backward("layer_norm_backward", grad_out, x, normalized_shape, mean, rstd,
                          weight, backend, False)


@dask_aware("rms_norm_backward")
def rms_norm_backward(grad_out: ArrayLike, x: ArrayLike,
                      normalized_shape: int | Sequence[int], mean: ArrayLike | None,
                      rstd: ArrayLike, weight: ArrayLike | None = None, *,
                      backend: str | None = None) -> Grads:
    """Gradients of :func:`rms_norm`; ``mean`` is ignored (``None`` from return_stats).

    Returns ``(grad_x, grad_weight, grad_bias)``; ``grad_bias`` is sum(grad_out), which
    RMSNorm (no bias) does not use.
    """
    return _rows_backward("rms_norm_backward", grad_out, x, normalized_shape, mean, rstd,
                          weight, backend, True)
