"""The five normalizations and their backward forms, on NumPy arrays.

Every function follows the same steps: validate (``_validate``), view the input in a
canonical shape (``_canonical``), compute float64 statistics with the backend's
kernels, fold weight/bias/statistics into per-channel coefficients, and run one
elementwise kernel. Which backend runs is decided once, by ``backends.resolve``.

Semantics (statistics, momentum, biased/unbiased variance, eps placement) follow
``torch.nn.functional``; see ``../shared/API.md``.
"""
from __future__ import annotations

import math
import threading

import numpy as np

from . import _validate as V
from ._canonical import batch_view, finish, rows_view, sample_view
from .backends import resolve

__all__ = [
    "batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
    "batch_norm_backward", "layer_norm_backward", "group_norm_backward",
    "instance_norm_backward", "rms_norm_backward",
]


# ====================================================================== helpers
def _rstd(var, eps):
    # No errstate here (it costs ~1.5 us a call): NaN variances pass silently, and
    # NumPy's warning for a negative running_var or var + eps == 0 is worth seeing.
    return 1.0 / np.sqrt(var + eps)


# ---------------------------------------------------------------- fast paths
# The common inference call (contiguous float32/float64 input, parameters of the same
# dtype, no out=, no stats) skips the general validation and view machinery: per-call
# overhead dominates on small inputs. Anything else takes the general path, which
# validates fully; so must the fast path never accept what the general path rejects.
_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _fast_param(p, dtype, n):
    """None, or a contiguous 1-D array of exactly ``dtype`` and length n."""
    return p is None or (type(p) is np.ndarray and p.dtype == dtype and p.shape == (n,)
                         and p.flags.c_contiguous)


def _fast_input(x):
    return (type(x) is np.ndarray and x.dtype in _FAST_DTYPES and x.flags.c_contiguous
            and x.size > 0)


def _fast_rows(x, ns, weight, bias, eps, backend, rms):
    """LayerNorm/RMSNorm over the last axis, or None when the general path is needed."""
    if not _fast_input(x) or x.ndim == 0:
        return None
    k = x.shape[-1]
    if not ((type(ns) is int and ns == k)
            or (type(ns) is tuple and len(ns) == 1 and type(ns[0]) is int and ns[0] == k)) \
            or type(eps) is not float or not eps >= 0.0:
        return None
    dt = x.dtype
    if not (_fast_param(weight, dt, k) and _fast_param(bias, dt, k)):
        return None
    be = resolve(backend)
    out = np.empty_like(x)
    be.rows_forward(x.reshape(-1, k), _ones(k, dt) if weight is None else weight,
                    _zeros(k, dt) if bias is None else bias, eps, rms, out.reshape(-1, k))
    return out


def _fast_batch_norm_eval(x, running_mean, running_var, weight, bias, eps, axis, backend):
    """Eval-mode BatchNorm on channels-first (axis=1) or channels-last (axis=-1) input."""
    if not _fast_input(x) or x.ndim < 2 or type(eps) is not float or not eps >= 0.0:
        return None
    if type(axis) is not int or not (axis == -1 or axis == 1):
        return None
    dt = x.dtype
    shape = x.shape
    c = shape[axis]
    if not (running_mean is not None and running_var is not None
            and _fast_param(running_mean, dt, c) and _fast_param(running_var, dt, c)
            and _fast_param(weight, dt, c) and _fast_param(bias, dt, c)):
        return None
    be = resolve(backend)
    # float64 for the coefficients, then one cast, in the general path's order of
    # operations (so both paths give bit-identical results), in as few ufunc calls as
    # possible: each costs ~0.3 us at this size
    rstd = np.add(running_var, eps, dtype=np.float64)
    np.sqrt(rstd, out=rstd)
    np.divide(1.0, rstd, out=rstd)
    if weight is not None:
        np.multiply(rstd, weight, out=rstd)
    scale = rstd.astype(dt)
    out = np.empty_like(x)
    scale = scale.reshape(1, c)
    offset = _zeros(c, dt) if bias is None else bias
    if axis == 1 and x.ndim > 2:
        view = (shape[0], c, x.size // (shape[0] * c))
        be.channels_first_affine(x.reshape(view), running_mean.reshape(1, c), scale,
                                 offset.reshape(1, c), out.reshape(view))
    else:
        view = (1, x.size // c, c)
        be.channels_last_affine(x.reshape(view), running_mean.reshape(1, c), scale,
                                offset.reshape(1, c), out.reshape(view))
    return out


_constants: dict = {}


def _constant(value, k, dtype):
    """A read-only cached vector of ``value`` (kernels never write their parameters)."""
    key = (value, k, dtype)
    a = _constants.get(key)
    if a is None:
        a = np.full(k, value, dtype)
        a.setflags(write=False)
        if len(_constants) < 256:
            _constants[key] = a
    return a


def _ones(k, dtype):
    return _constant(1.0, k, dtype)


def _zeros(k, dtype):
    return _constant(0.0, k, dtype)


def _stat_out(a, dtype, shape=None):
    """Statistics handed back to users: the compute dtype (float32 for float16 input)."""
    a = np.array(a, dtype=dtype)   # a copy: never hand out a live running statistic
    return a if shape is None else a.reshape(shape)


def _coefs(dtype, n_rows, *arrays):
    """(N', C) contiguous arrays of the compute dtype, all with the same N'."""
    result = []
    for a in arrays:
        if a.ndim == 1:
            a = a.reshape(1, -1)
        if a.shape[0] != n_rows:
            a = np.broadcast_to(a, (n_rows, a.shape[1]))
        result.append(np.ascontiguousarray(a, dtype=dtype))
    return result


def _split_shift(mean, dtype):
    """The mean as a compute-dtype shift plus the float64 residual it rounded away.

    Kernels compute (x - shift) in the compute dtype; with x close to shift that
    difference is exact, so adding the residual's effect back in float64 (folded into
    an offset) keeps float32 outputs accurate even at |mean| >> std, at no extra pass.
    """
    if mean.dtype == dtype:             # already exact in the compute dtype
        return mean, None
    shift = mean.astype(dtype)
    with np.errstate(invalid="ignore"):     # inf - inf where a channel holds an Inf
        return shift, mean - shift.astype(np.float64)


def _offset(bias, resid, scale):
    """The affine offset, corrected for the part of the mean the shift rounded away."""
    if resid is None:
        return np.zeros(scale.shape[-1]) if bias is None else bias
    return -resid * scale if bias is None else bias - resid * scale


def _update_running(running, batch_value, momentum):
    """running <- (1 - momentum) * running + momentum * batch, in place, in its own dtype."""
    running[...] = (1.0 - momentum) * running.astype(np.float64) + momentum * batch_value


def _merge_groups(mean, m2, count):
    """Chan's exact merge of equal-count partial moments along the last axis."""
    gmean = mean.mean(axis=-1)
    with np.errstate(invalid="ignore", over="ignore"):
        gm2 = m2.sum(axis=-1) + count * ((mean - gmean[..., None]) ** 2).sum(axis=-1)
    return gmean, gm2


# Private hook for normkit.diagnostics: while ``_capture.on`` is true in this thread,
# _batch_moments leaves the unmerged per-plane moments it computed anyway (and the
# view and backend) in ``_capture.value``. Off: one attribute test, nothing else.
_capture = threading.local()


def _batch_moments(be, view):
    """BatchNorm statistics per channel: (mean, M2) over N and S, float64 (C,)."""
    if view.layout == "first":
        mean, m2 = be.plane_moments(view.data.reshape(view.n * view.c, view.s))
        mean, m2 = mean.reshape(view.n, view.c), m2.reshape(view.n, view.c)
        if getattr(_capture, "on", False):
            _capture.value = (be, view, mean, m2)
        # merge the N planes of each channel: swap so the merged axis is last
        return _merge_groups(mean.T, m2.T, view.s)
    mean, m2 = be.channels_last_moments(view.data)
    if getattr(_capture, "on", False):
        _capture.value = (be, view, None, None)
    return mean[0], m2[0]


def _group_moments(be, view, groups):
    """GroupNorm/InstanceNorm statistics per (sample, group): (mean, M2), float64 (N, G)."""
    n, c, s = view.n, view.c, view.s
    if view.layout == "first":   # one group of one sample is one contiguous row
        mean, m2 = be.plane_moments(view.data.reshape(n * groups, (c // groups) * s))
        return mean.reshape(n, groups), m2.reshape(n, groups)
    mean, m2 = be.channels_last_moments(view.data)
    if groups == c:
        return mean, m2
    return _merge_groups(mean.reshape(n, groups, c // groups),
                         m2.reshape(n, groups, c // groups), s)


def _empty_result(x, out, stats_shape, dtype, return_stats, with_mean=True):
    y = finish(np.empty(x.shape, x.dtype), out, x.dtype)
    if not return_stats:
        return y
    nan = np.full(stats_shape, np.nan, dtype)
    return y, (nan if with_mean else None), nan.copy()


# ====================================================================== BatchNorm
def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, *, axis=1, out=None, backend=None,
               return_stats=False, activation=None, residual=None):
    """Batch normalization over every axis but the channel axis.

    Parameters
    ----------
    x : ndarray
        Input of float16/32/64 dtype and ndim >= 2, channels on ``axis``.
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
        Added to the variance inside the square root.
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
    """
    if not training and out is None and not return_stats and activation is None \
            and residual is None:
        y = _fast_batch_norm_eval(x, running_mean, running_var, weight, bias, eps, axis,
                                  backend)
        if y is not None:
            return y
    x = V.as_input(x, min_ndim=2)
    ax = V.channel_axis(x, axis, "batch_norm")
    V.check_channels(x, ax, "batch_norm", running_mean=running_mean,
                     running_var=running_var, weight=weight, bias=bias)
    c = x.shape[ax]
    shape = (c,)
    running_mean = V.running_stat(running_mean, shape, "running_mean")
    running_var = V.running_stat(running_var, shape, "running_var")
    w = V.as_param(weight, shape, "weight")
    b = V.as_param(bias, shape, "bias")
    eps = V.check_eps(eps, "batch_norm")
    out = V.check_out(out, x)
    relu, residual = _check_activation(activation, residual, x)
    dt = V.compute_dtype(x)
    count = x.size // c if c else 0
    if training:
        momentum = V.check_momentum(momentum, "batch_norm")
        if count <= 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {x.shape}")
        V.check_writable(running_mean, "running_mean")
        V.check_writable(running_var, "running_var")
    elif running_mean is None or running_var is None:
        raise ValueError("batch_norm: eval mode (training=False) needs running_mean and "
                         "running_var; pass them or use training=True")
    be = resolve(backend)
    if x.size == 0:
        return _empty_result(x, out, shape, dt, return_stats)
    view = batch_view(x, ax, dt)
    if training:
        mean, m2 = _batch_moments(be, view)
        var = m2 / count
        if running_mean is not None:
            _update_running(running_mean, mean, momentum)
        if running_var is not None:
            _update_running(running_var, m2 / (count - 1), momentum)
    else:
        mean = running_mean          # its own dtype: exact as a shift when it is dt's
        var = running_var.astype(np.float64)
    rstd = _rstd(var, eps)
    scale = rstd if w is None else w * rstd
    shift, resid = _split_shift(mean, dt)
    offset = _offset(b, resid, scale)
    res = view.empty(out)
    _affine(be, view, _coefs(dt, 1, shift, scale, offset), res, residual, relu)
    y = view.to_user(res, out, x.dtype)
    if return_stats:
        return y, _stat_out(mean, dt), _stat_out(rstd, dt)
    return y


def _check_activation(activation, residual, x):
    """(relu: bool, residual or None) for the fused eval-time epilogue."""
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    if residual is not None:
        residual = V.as_input(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected shape {x.shape}, got shape "
                             f"{residual.shape}")
    return activation == "relu", residual


def _affine(be, view, coefs, res, residual, relu):
    """res = (x - shift) * scale + offset [+ residual] [then ReLU], one pass over x."""
    if residual is None and not relu:
        view.call(be, "affine", view.data, *coefs, res)
    else:
        r = None if residual is None else view.like(residual, view.data.dtype)
        view.call(be, "affine_act", view.data, *coefs, r, relu, res)


# ====================================================================== Group / Instance
def _per_sample_forward(x, ax, groups, w, b, eps, out, be, dt, return_stats,
                        fixed_stats=None, residual=None, relu=False):
    """GroupNorm (groups < C) and InstanceNorm (groups == C) forward.

    ``fixed_stats=(mean, var)`` of shape (C,) normalizes with given statistics
    (InstanceNorm with use_input_stats=False) instead of the sample's own.
    Returns (y, mean (N, G), rstd (N, G), M2 or None).
    """
    n, c = x.shape[0], x.shape[ax]
    view = sample_view(x, ax, dt)
    if fixed_stats is None and view.layout == "first" and residual is None and not relu:
        # one kernel: each (sample, group) block is normalized while still in cache
        res = view.empty(out)
        mean, rstd = be.channels_first_group_forward(
            view.data, groups, np.ones(c, dt) if w is None else w.astype(dt),
            np.zeros(c, dt) if b is None else b.astype(dt), eps, res)
        m2 = (1.0 / (rstd * rstd) - eps) * ((c // groups) * view.s)   # for running_var
        return view.to_user(res, out, x.dtype), mean, rstd, m2
    if fixed_stats is None:
        mean, m2 = _group_moments(be, view, groups)
        var = m2 / ((c // groups) * view.s)
    else:
        mean = np.broadcast_to(fixed_stats[0], (n, c))
        var = np.broadcast_to(fixed_stats[1], (n, c))
        m2 = None
    rstd = _rstd(var, eps)
    per_channel = c // groups
    mean_c = np.repeat(mean, per_channel, axis=1)
    rstd_c = np.repeat(rstd, per_channel, axis=1)
    scale = rstd_c if w is None else rstd_c * w
    shift, resid = _split_shift(mean_c, dt)
    offset = _offset(b, resid, scale)
    res = view.empty(out)
    _affine(be, view, _coefs(dt, n, shift, scale, offset), res, residual, relu)
    return view.to_user(res, out, x.dtype), mean, rstd, m2


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
               backend=None, return_stats=False, activation=None, residual=None):
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
        Added to the variance inside the square root.
    axis : int, keyword-only
        The channel axis (not 0, the batch axis).
    out, backend, return_stats, activation, residual
        As in :func:`batch_norm`; statistics have shape (N, num_groups).
    """
    x = V.as_input(x, min_ndim=2)
    ax = V.channel_axis(x, axis, "group_norm", allow_batch_axis=False)
    V.check_channels(x, ax, "group_norm", weight=weight, bias=bias)
    c = x.shape[ax]
    groups = V.num_groups(num_groups, c, x)
    w = V.as_param(weight, (c,), "weight")
    b = V.as_param(bias, (c,), "bias")
    eps = V.check_eps(eps, "group_norm")
    out = V.check_out(out, x)
    relu, residual = _check_activation(activation, residual, x)
    dt = V.compute_dtype(x)
    be = resolve(backend)
    if x.size == 0:
        return _empty_result(x, out, (x.shape[0], groups), dt, return_stats)
    y, mean, rstd, _ = _per_sample_forward(x, ax, groups, w, b, eps, out, be, dt,
                                           return_stats, residual=residual, relu=relu)
    if return_stats:
        return y, _stat_out(mean, dt), _stat_out(rstd, dt)
    return y


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, out=None,
                  backend=None, return_stats=False):
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
        As in :func:`batch_norm`; statistics have shape (N, C).
    """
    x = V.as_input(x, min_ndim=2)
    ax = V.channel_axis(x, axis, "instance_norm", allow_batch_axis=False)
    V.check_channels(x, ax, "instance_norm", running_mean=running_mean,
                     running_var=running_var, weight=weight, bias=bias)
    n, c = x.shape[0], x.shape[ax]
    running_mean = V.running_stat(running_mean, (c,), "running_mean")
    running_var = V.running_stat(running_var, (c,), "running_var")
    w = V.as_param(weight, (c,), "weight")
    b = V.as_param(bias, (c,), "bias")
    eps = V.check_eps(eps, "instance_norm")
    out = V.check_out(out, x)
    dt = V.compute_dtype(x)
    spatial = x.size // (n * c) if n * c else 0
    if use_input_stats:
        momentum = V.check_momentum(momentum, "instance_norm")
        if spatial <= 1 and x.size:
            raise ValueError("Expected more than 1 spatial element when training, "
                             f"got input size {x.shape}")
        V.check_writable(running_mean, "running_mean")
        V.check_writable(running_var, "running_var")
        fixed = None
    else:
        if running_mean is None or running_var is None:
            raise ValueError("instance_norm: use_input_stats=False needs running_mean and "
                             "running_var")
        fixed = (running_mean.astype(np.float64), running_var.astype(np.float64))
    be = resolve(backend)
    if x.size == 0:
        return _empty_result(x, out, (n, c), dt, return_stats)
    y, mean, rstd, m2 = _per_sample_forward(x, ax, c, w, b, eps, out, be, dt,
                                            return_stats, fixed_stats=fixed)
    if use_input_stats:
        if running_mean is not None:
            _update_running(running_mean, mean.mean(axis=0), momentum)
        if running_var is not None:
            _update_running(running_var, (m2 / (spatial - 1)).mean(axis=0), momentum)
    if return_stats:
        return y, _stat_out(mean, dt), _stat_out(rstd, dt)
    return y


# ====================================================================== Layer / RMS
def _rows_forward(x, ns, weight, bias, eps, out, backend, return_stats, rms, what):
    k = math.prod(ns)
    stats_shape = x.shape[:x.ndim - len(ns)]
    dt = V.compute_dtype(x)
    w = V.as_param(weight, ns, "weight", dt)
    b = V.as_param(bias, ns, "bias", dt)
    out = V.check_out(out, x)
    be = resolve(backend)
    if x.size == 0:
        return _empty_result(x, out, stats_shape, dt, return_stats, with_mean=not rms)
    xr = rows_view(x, k, dt)
    w = np.ones(k, dt) if w is None else w.reshape(k)
    b = np.zeros(k, dt) if b is None else b.reshape(k)
    res = out.reshape(xr.shape) if (out is not None and out.dtype == dt
                                    and out.flags.c_contiguous) else np.empty_like(xr)
    mean, rstd = be.rows_forward(xr, w, b, eps, rms, res)
    y = finish(res.reshape(x.shape), out, x.dtype)
    if return_stats:
        return (y, None if rms else _stat_out(mean, dt, stats_shape),
                _stat_out(rstd, dt, stats_shape))
    return y


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
               backend=None, return_stats=False):
    """Layer normalization over the trailing ``normalized_shape`` axes.

    Parameters
    ----------
    x : ndarray
        Input whose shape ends with ``normalized_shape``.
    normalized_shape : int or tuple of int
    weight, bias : ndarray of shape ``normalized_shape``, optional
    eps : float
    out, backend, return_stats
        As in :func:`batch_norm`; statistics have shape ``x.shape[:-len(normalized_shape)]``.
    """
    if out is None and not return_stats:
        y = _fast_rows(x, normalized_shape, weight, bias, eps, backend, False)
        if y is not None:
            return y
    x = V.as_input(x)
    ns = V.normalized_shape(normalized_shape, x, "layer_norm")
    eps = V.check_eps(eps, "layer_norm")
    return _rows_forward(x, ns, weight, bias, eps, out, backend, return_stats, False,
                         "layer_norm")


def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None, backend=None,
             return_stats=False):
    """Root-mean-square normalization over the trailing ``normalized_shape`` axes.

    ``eps=None`` uses ``np.finfo(x.dtype).eps`` of the input's dtype, as torch.
    With ``return_stats=True`` returns ``(y, None, rstd)``.
    """
    if out is None and not return_stats and type(x) is np.ndarray and x.dtype in _FAST_DTYPES:
        y = _fast_rows(x, normalized_shape, weight, None,
                       float(np.finfo(x.dtype).eps) if eps is None else eps, backend, True)
        if y is not None:
            return y
    x = V.as_input(x)
    ns = V.normalized_shape(normalized_shape, x, "rms_norm")
    eps = float(np.finfo(x.dtype).eps) if eps is None else V.check_eps(eps, "rms_norm")
    return _rows_forward(x, ns, weight, None, eps, out, backend, return_stats, True,
                         "rms_norm")


# ====================================================================== backward
def _grads_out(gw, gb, weight, dt):
    dtype = weight.dtype if isinstance(weight, np.ndarray) else dt
    return np.asarray(gw, dtype=dtype), np.asarray(gb, dtype=dtype)


def _channel_backward(be, view, dy, shift, rstd_nc, w, pool, count, batch_stats):
    """dx and the per-channel (N, C) gradient sums for BN/GN/IN.

    ``shift`` and ``rstd_nc`` are (N', C); ``pool`` sums (N, C) partial sums over what
    shares one statistic and broadcasts back to (N', C); ``count`` is how many values
    share one statistic. With fixed statistics (eval) dx is just weight * rstd * dy.
    """
    dt = view.data.dtype
    shift, resid = _split_shift(shift, dt)
    sum_dy, sum_dyx = view.call(be, "grad_sums", dy, view.data,
                                *_coefs(dt, shift.shape[0], shift))
    if resid is not None:                   # sums of dy * (x - mean), exactly centered
        sum_dyx = sum_dyx - resid * sum_dy
    a = rstd_nc if w is None else rstd_nc * w
    if batch_stats:
        coef_x = -rstd_nc ** 3 * pool(sum_dyx if w is None else sum_dyx * w) / count
        coef_1 = -rstd_nc * pool(sum_dy if w is None else sum_dy * w) / count
    else:
        coef_x = np.zeros_like(a)
        coef_1 = np.zeros_like(a)
    if resid is not None:
        coef_1 = coef_1 - coef_x * resid
    dx = np.empty_like(view.data)
    view.call(be, "grad_apply", dy, view.data, *_coefs(dt, shift.shape[0], shift, a,
                                                        coef_x, coef_1), dx)
    return dx, sum_dy, sum_dyx


def batch_norm_backward(grad_out, x, mean, rstd, weight=None, *, training=True, axis=1,
                        backend=None):
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
        ``grad_weight`` and ``grad_bias`` have shape (C,) (computed even without affine).
    """
    x = V.as_input(x, min_ndim=2)
    dy = V.same_shape(grad_out, x, "batch_norm_backward")
    ax = V.channel_axis(x, axis, "batch_norm_backward")
    c = x.shape[ax]
    mean = V.as_param(mean, (c,), "mean")
    rstd = V.as_param(rstd, (c,), "rstd")
    w = V.as_param(weight, (c,), "weight")
    dt = V.compute_dtype(x)
    be = resolve(backend)
    if x.size == 0:
        return np.zeros_like(x), *_grads_out(np.zeros(c), np.zeros(c), weight, dt)
    view = batch_view(x, ax, dt)
    dyc = view.like(dy, dt)
    dx, sum_dy, sum_dyx = _channel_backward(
        be, view, dyc, mean[None], rstd[None], w,
        lambda s: s.sum(axis=0, keepdims=True), x.size // c, training)
    sum_dy, sum_dyx = sum_dy.sum(axis=0), sum_dyx.sum(axis=0)
    return (view.to_user(dx, None, x.dtype), *_grads_out(sum_dyx * rstd, sum_dy, weight, dt))


def _per_sample_backward(what, grad_out, x, groups_arg, mean, rstd, weight, axis, backend,
                         batch_stats, instance):
    x = V.as_input(x, min_ndim=2)
    dy = V.same_shape(grad_out, x, what)
    ax = V.channel_axis(x, axis, what, allow_batch_axis=False)
    n, c = x.shape[0], x.shape[ax]
    groups = c if instance else V.num_groups(groups_arg, c, x)
    mean = V.as_param(mean, (n, groups), "mean")
    rstd = V.as_param(rstd, (n, groups), "rstd")
    w = V.as_param(weight, (c,), "weight")
    dt = V.compute_dtype(x)
    be = resolve(backend)
    if x.size == 0:
        return np.zeros_like(x), *_grads_out(np.zeros(c), np.zeros(c), weight, dt)
    per = c // groups
    view = sample_view(x, ax, dt)
    rstd_nc = np.repeat(rstd, per, axis=1)

    def pool(s):  # sum the channels of each group, then give each channel its group's sum
        return np.repeat(s.reshape(n, groups, per).sum(axis=-1), per, axis=1)

    dx, sum_dy, sum_dyx = _channel_backward(
        be, view, view.like(dy, dt), np.repeat(mean, per, axis=1), rstd_nc, w, pool,
        per * view.s, batch_stats)
    grad_w = (sum_dyx * rstd_nc).sum(axis=0)
    return (view.to_user(dx, None, x.dtype), *_grads_out(grad_w, sum_dy.sum(axis=0),
                                                         weight, dt))


def group_norm_backward(grad_out, x, num_groups, mean, rstd, weight=None, *, axis=1,
                        backend=None):
    """Gradients of :func:`group_norm`; ``mean``/``rstd`` of shape (N, num_groups).

    Returns ``(grad_x, grad_weight, grad_bias)``, the last two of shape (C,).
    """
    return _per_sample_backward("group_norm_backward", grad_out, x, num_groups, mean,
                                rstd, weight, axis, backend, True, False)


def instance_norm_backward(grad_out, x, mean, rstd, weight=None, *, use_input_stats=True,
                           axis=1, backend=None):
    """Gradients of :func:`instance_norm`; ``mean``/``rstd`` of shape (N, C).

    With ``use_input_stats=False`` the statistics were fixed (running), so no gradient
    flows through them. Returns ``(grad_x, grad_weight, grad_bias)``.
    """
    return _per_sample_backward("instance_norm_backward", grad_out, x, None, mean, rstd,
                                weight, axis, backend, use_input_stats, True)


def _rows_backward(what, grad_out, x, normalized_shape, mean, rstd, weight, backend, rms):
    x = V.as_input(x)
    dy = V.same_shape(grad_out, x, what)
    ns = V.normalized_shape(normalized_shape, x, what)
    k = math.prod(ns)
    stats_shape = x.shape[:x.ndim - len(ns)]
    dt = V.compute_dtype(x)
    rows = math.prod(stats_shape)
    mean = np.zeros(rows) if rms else V.as_param(mean, stats_shape, "mean").reshape(rows)
    rstd = V.as_param(rstd, stats_shape, "rstd").reshape(rows)
    w = V.as_param(weight, ns, "weight", dt)
    be = resolve(backend)
    if x.size == 0:
        return np.zeros_like(x), *_grads_out(np.zeros(ns), np.zeros(ns), weight, dt)
    w = np.ones(k, dt) if w is None else w.reshape(k)
    dx = np.empty((rows, k), dt)
    gw, gb = be.rows_backward(rows_view(dy, k, dt), rows_view(x, k, dt), mean, rstd, w,
                              rms, dx)
    gw, gb = _grads_out(gw.reshape(ns), gb.reshape(ns), weight, dt)
    return dx.reshape(x.shape).astype(x.dtype, copy=False), gw, gb


def layer_norm_backward(grad_out, x, normalized_shape, mean, rstd, weight=None, *,
                        backend=None):
    """Gradients of :func:`layer_norm`; ``mean``/``rstd`` as ``return_stats`` gave them.

    Returns ``(grad_x, grad_weight, grad_bias)``, the last two shaped ``normalized_shape``.
    """
    return _rows_backward("layer_norm_backward", grad_out, x, normalized_shape, mean, rstd,
                          weight, backend, False)


def rms_norm_backward(grad_out, x, normalized_shape, mean, rstd, weight=None, *,
                      backend=None):
    """Gradients of :func:`rms_norm`; ``mean`` is ignored (``None`` from return_stats).

    Returns ``(grad_x, grad_weight, grad_bias)``; ``grad_bias`` is sum(grad_out), which
    RMSNorm (no bias) does not use.
    """
    return _rows_backward("rms_norm_backward", grad_out, x, normalized_shape, mean, rstd,
                          weight, backend, True)
