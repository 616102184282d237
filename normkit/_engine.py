"""The Python side of every norm: statistics, merges, coefficients and backward sums.

``normkit.functional`` validates the user's arguments and hands them here; this
module turns them into kernel calls. The layout of the data (channels first or last,
the degenerate S == 1 / C == 1 shapes) is read from the ``_canonical`` view, never
decided here; partial moments are merged by ``_moments`` (Chan's merge); kernels are
the backend's (``backends/_spec.py``).

Shared steps, each in one function:

* statistics: ``batch_moments`` (BatchNorm, per channel), ``group_moments``
  (GroupNorm / InstanceNorm, per sample and group);
* shift/offset folding: ``split_shift`` and ``offset`` keep float32 outputs accurate
  when |mean| >> std;
* coefficients: ``rstd``, ``coefs``; running statistics: ``update_running``;
* the channel backward: ``channel_backward``;
* the capture hook ``capture`` read by ``normkit.diagnostics``;
* the fast paths (``fast_*``) of the common inference call, with ``derived``: per-channel
  and per-row arrays reused while the parameters they come from are unchanged.

dtypes (``backends/_spec.py``): the data (x, dy, out, dx, residual) stays in its
*storage dtype* -- float16 and bfloat16 included, never copied to float32 -- and the
per-channel parameters handed to kernels are in the *parameter dtype*
(``_validate.param_dtype``: float64 for float64 data, float32 otherwise).

NumPy floating-point warnings never leave this module: NaN/Inf in the data, a negative
running variance or eps == 0 on constant data are results (NaN/Inf), not warnings.
"""
from __future__ import annotations

import math
import numbers
import threading

import numpy as np

from . import _moments
from ._canonical import (
    batch_layout,
    elementwise_twin,
    finish,
    kernel_array,
    rows_result,
    rows_view,
)
from ._validate import BF16, F16, param_dtype
from .backends.numpy_ref import narrow

# Private hook for normkit.diagnostics: while ``capture.on`` is true in this thread,
# batch_moments leaves the unmerged per-plane moments it computed anyway (and the
# view and backend) in ``capture.value``. Off: one attribute test, nothing else.
capture = threading.local()


def _quiet(fn):
    """Run ``fn`` with NumPy's floating-point warnings off: NaN/Inf are results here.

    One errstate per entry point (each costs ~3 us), not one per helper: the helpers
    below are only called from inside these entry points (or under the caller's own
    errstate, as ``_renorm`` does).
    """
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


# ---------------------------------------------------------------- small helpers
_constants: dict = {}


def constant(value, k, dtype):
    """A read-only cached vector of ``value`` (kernels never write their parameters)."""
    key = (value, k, dtype)
    a = _constants.get(key)
    if a is None:
        a = np.full(k, value, dtype)
        a.setflags(write=False)
        if len(_constants) < 256:
            _constants[key] = a
    return a


def rstd(var, eps):
    """1 / sqrt(var + eps); NaN where var + eps < 0, Inf where it is 0 (as torch)."""
    return 1.0 / np.sqrt(var + eps)


def stat_out(a, dtype, shape=None):
    """Statistics handed back to users: the parameter dtype (float32 for 16-bit input)."""
    # a copy: never hand out a live running statistic
    a = a.astype(dtype) if isinstance(a, np.ndarray) else np.array(a, dtype=dtype)
    return a if shape is None else a.reshape(shape)


def coefs(dtype, n_rows, *arrays):
    """(N', C) contiguous aligned arrays of the parameter dtype, all with the same N'."""
    result = []
    for a in arrays:
        if a.ndim == 1:
            a = a.reshape(1, -1)
        if a.shape[0] != n_rows:
            a = np.broadcast_to(a, (n_rows, a.shape[1]))
        result.append(kernel_array(a, dtype))
    return result


def split_shift(mean, dtype):
    """The mean as a parameter-dtype shift plus the float64 residual it rounded away.

    Kernels compute (x - shift) in the parameter dtype (float32 for 16-bit data); with
    x close to shift that difference is exact, so adding the residual's effect back in
    float64 (folded into an offset) keeps float32 and 16-bit outputs accurate even at
    |mean| >> std, at no extra pass.
    """
    if mean.dtype == dtype:             # already exact in the parameter dtype
        return mean, None
    shift = mean.astype(dtype)          # inf - inf below where a channel holds an Inf
    return shift, mean - shift.astype(np.float64)


def offset(bias, resid, scale):
    """The affine offset, corrected for the part of the mean the shift rounded away."""
    if resid is None:
        return np.zeros(scale.shape[-1]) if bias is None else bias
    return -resid * scale if bias is None else bias - resid * scale


def update_running(running, batch_value, momentum):
    """running <- (1 - momentum) * running + momentum * batch, in place, in its own dtype
    (computed in float64, rounded once: bfloat16 too, see ``numpy_ref.narrow``).

    In place on one float64 copy, and float32/float16 rounded by the assignment's cast
    (the same single rounding as ``narrow``): after a kernel has swept the caches each
    small NumPy call costs several microseconds, and the two statistics of a training
    step took ~51 us (now ~30). Under the caller's errstate, as every helper here."""
    r64 = running.astype(np.float64)
    r64 *= 1.0 - momentum
    r64 += momentum * batch_value
    running[...] = narrow(r64, BF16) if running.dtype == BF16 else r64


def update_running_stats(running_mean, running_var, mean, var, momentum):
    """Both running statistics of a training step, each by ``update_running`` (either may
    be None; the variance second, so an aliased one sees the new mean)."""
    if running_mean is not None:
        update_running(running_mean, mean, momentum)
    if running_var is not None:
        update_running(running_var, var, momentum)


def empty_result(x, out, stats_shape, dtype, return_stats, with_mean=True):
    """What a forward returns for an input with no elements (statistics are NaN)."""
    y = finish(np.empty(x.shape, x.dtype), out, x.dtype)
    if not return_stats:
        return y
    nan = np.full(stats_shape, np.nan, dtype)
    return y, (nan if with_mean else None), nan.copy()


def check_training_eps(eps):
    """torch's rule: batch statistics need eps > 0 (a constant channel would give 1/0)."""
    if isinstance(eps, numbers.Real) and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got "
                         f"{float(eps)}")


def apart_from_out(out, inputs, updated=()):
    """The arrays of ``inputs`` ((name, array or None) pairs), none sharing ``out``'s memory.

    Kernels write ``out`` while they read their parameters, so a parameter inside
    ``out`` is copied first (parameters are small). A ``residual`` that is exactly
    ``out`` is fine (kernels read each element before writing it). The arrays named in
    ``updated`` are written in place too (running statistics in training): sharing
    memory with ``out`` is then an error, as no order of the two writes is right.
    """
    result = []
    for name, a in inputs:
        if a is not None and out is not None and np.may_share_memory(out, a):
            if name in updated:
                raise ValueError(f"out and {name} share memory, but both are written by "
                                 f"this call: pass separate arrays")
            same = (a.__array_interface__["data"][0] == out.__array_interface__["data"][0]
                    and a.strides == out.strides and a.shape == out.shape)
            if not (name == "residual" and same):
                a = a.copy()
        result.append(a)
    return result


# ---------------------------------------------------------------- statistics
def batch_moments(be, view):
    """BatchNorm statistics per channel: (mean, M2) over N and S, float64 (C,)."""
    mean, m2 = view.moments(be)
    if getattr(capture, "on", False):
        capture.value = (be, view, *((mean, m2) if view.layout == "first" else (None, None)))
    if view.n == 1:
        return mean[0], m2[0]
    return _moments.merge_equal(mean, m2, view.s, axis=0)   # merge the N planes


def group_moments(be, view, groups):
    """GroupNorm/InstanceNorm statistics per (sample, group): (mean, M2), float64 (N, G)."""
    n, c, s = view.n, view.c, view.s
    if view.layout == "first":   # one group of one sample is one contiguous row
        mean, m2 = be.plane_moments(view.data.reshape(n * groups, (c // groups) * s))
        return mean.reshape(n, groups), m2.reshape(n, groups)
    mean, m2 = view.moments(be)
    if groups == c:
        return mean, m2
    return _moments.merge_equal(mean.reshape(n, groups, c // groups),
                                m2.reshape(n, groups, c // groups), s)


# ---------------------------------------------------------------- forward
def affine(be, view, coef, res, residual, relu):
    """res = (x - shift) * scale + offset [+ residual] [then ReLU], one pass over x."""
    if residual is None and not relu:
        view.call(be, "affine", view.data, *coef, res)
    else:
        r = None if residual is None else view.like(residual, view.data.dtype)
        view.call(be, "affine_act", view.data, *coef, r, relu, res)


def normalize(be, view, mean, rstd_, w, b, n_rows, out, epilogue=(None, False)):
    """Write (x - mean) * rstd * w + b [+ residual] [ReLU] for (N', C) statistics."""
    dt = param_dtype(view.data.dtype)
    scale = rstd_ if w is None else w * rstd_
    shift, resid = split_shift(mean, dt)
    res = view.empty(out)
    affine(be, view, coefs(dt, n_rows, shift, scale, offset(b, resid, scale)), res,
           *epilogue)
    return res


# ---------------------------------------------------------------- one-kernel paths
# Channels-first training BatchNorm (forward and backward) runs as one kernel, a task per
# channel, when it has at least this many channels (fewer would leave threads idle: the
# two-kernel path splits long planes across threads instead) and planes of at least
# this many values (below, the per-plane calls cost more than the second read saves:
# (8, 1024, 14x14) took 1.05-1.12x the time of the two kernels, (8, 256, 28x28)
# 0.84-0.96x). GroupNorm / InstanceNorm backward with batch statistics does so, a task
# per (sample, group) block, from this many blocks and planes of at least 16 values.
FUSED_BATCH_MIN_CHANNELS = 16
FUSED_BATCH_MIN_PLANE = 256
FUSED_GROUP_MIN_BLOCKS = 16
FUSED_GROUP_MIN_PLANE = 16


def _fused_batch(view):
    return (view.layout == "first" and view.c >= FUSED_BATCH_MIN_CHANNELS
            and view.s >= FUSED_BATCH_MIN_PLANE)


def _fused_group(view, blocks):
    return (view.layout == "first" and blocks >= FUSED_GROUP_MIN_BLOCKS
            and view.s >= FUSED_GROUP_MIN_PLANE)


def _param_vec(p, fill, c, dt):
    """A weight/bias of the kernels' parameter dtype ``dt`` (constant ``fill``: None)."""
    return constant(fill, c, dt) if p is None else p.astype(dt)


@_quiet
def batch_norm(be, view, running, w, b, training, momentum, eps, out, epilogue):
    """BatchNorm on a view: returns (result in the view's layout, mean, rstd), (C,)."""
    running_mean, running_var = running
    if (training and _fused_batch(view) and epilogue[0] is None and not epilogue[1]
            and not getattr(capture, "on", False)):
        # one kernel: statistics and normalization of each channel while it is in cache;
        # a single read of x, and no (N, C) moments to merge in Python (after a kernel
        # that swept the caches, each small NumPy operation costs ~5 us, not ~1)
        c, dt = view.c, param_dtype(view.data.dtype)
        res = view.empty(out)
        mean, m2 = be.channels_first_batch_forward(
            view.data, _param_vec(w, 1.0, c, dt), _param_vec(b, 0.0, c, dt), eps, res)
        count = view.n * view.s
        update_running_stats(running_mean, running_var, mean, m2 / (count - 1), momentum)
        return res, mean, rstd(m2 / count, eps)
    if training:
        mean, m2 = batch_moments(be, view)
        count = view.n * view.s
        var = m2 / count
    else:       # the running mean as it is when it is a parameter-dtype shift already
        pdt = param_dtype(view.data.dtype)
        mean = running_mean if running_mean.dtype == pdt else running_mean.astype(np.float64)
        var = running_var.astype(np.float64)
    r = rstd(var, eps)
    res = normalize(be, view, mean, r, w, b, 1, out, epilogue)
    if training:        # after the kernel: a running statistic inside x stays read first
        update_running_stats(running_mean, running_var, mean, m2 / (count - 1), momentum)
    return res, mean, r


@_quiet
def per_sample_forward(be, view, groups, w, b, eps, out, fixed_stats=None,
                       epilogue=(None, False), need_m2=False):
    """GroupNorm (groups < C) and InstanceNorm (groups == C) forward.

    ``fixed_stats=(mean, var)`` of shape (C,) normalizes with given statistics
    (InstanceNorm with use_input_stats=False) instead of the sample's own.
    Returns (result in the view's layout, mean (N, G), rstd (N, G), M2 or None);
    M2 is the centred sum from the moments (``need_m2`` asks for it).
    """
    n, c, dt = view.n, view.c, param_dtype(view.data.dtype)
    if (fixed_stats is None and not need_m2 and view.layout == "first"
            and epilogue[0] is None and not epilogue[1]):
        # one kernel: each (sample, group) block is normalized while still in cache
        res = view.empty(out)
        mean, r = be.channels_first_group_forward(
            view.data, groups, constant(1.0, c, dt) if w is None else w.astype(dt),
            constant(0.0, c, dt) if b is None else b.astype(dt), eps, res)
        return res, mean, r, None
    if fixed_stats is None:
        mean, m2 = group_moments(be, view, groups)
        r = rstd(m2 / ((c // groups) * view.s), eps)
    else:
        mean = np.broadcast_to(fixed_stats[0], (n, c))
        r = rstd(np.broadcast_to(fixed_stats[1], (n, c)), eps)
        m2 = None
    per_channel = c // groups
    res = normalize(be, view, np.repeat(mean, per_channel, axis=1),
                    np.repeat(r, per_channel, axis=1), w, b, n, out, epilogue)
    return res, mean, r, m2


def rows_forward(be, x, k, w, b, eps, out, rms, dt):
    """LayerNorm / RMSNorm: returns (y in x's shape into ``out``, mean, rstd) per row.

    ``dt`` is the storage dtype of x (its dtype in native order); w and b are of the
    parameter dtype."""
    xr = rows_view(x, k, dt)
    res = rows_result(out, xr)
    mean, r = be.rows_forward(xr, w, b, eps, rms, res)
    return finish(res.reshape(x.shape), out, x.dtype), mean, r


# ---------------------------------------------------------------- fast paths
# Per-channel / per-row arrays derived from the user's parameters (widened to the
# parameter dtype, folded into BatchNorm's scale) cost several small NumPy calls each,
# which dominates a tiny call. ``_derived`` remembers them per parameter *object*,
# and hands them back only while those objects still hold the same bytes, dtype and
# shape (a parameter updated in place is a miss): the result is a function of exactly
# those, so reusing it gives the same bits as computing it again.
# Bounded by entries and by bytes (snapshots plus values); the least recently used entry
# goes first. Big enough for a network's layers used in turn (ResNet-50: 53 BatchNorms;
# with 32 FIFO entries every call of such a sequence missed, 40-60 us each in float16).
_DERIVED_ENTRIES = 1024
_DERIVED_BUDGET = 16 << 20       # bytes
_DERIVED_MAX_BYTES = 1 << 15     # larger parameters are recomputed (cheap next to x)
_derived: dict = {}
_derived_size = [0]              # bytes held by _derived
_derived_lock = threading.Lock()


def _held_bytes(obj):
    """Bytes of the arrays and byte strings in a (nested) snapshot or value."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, bytes):
        return len(obj)
    if isinstance(obj, (tuple, list)):
        return sum(_held_bytes(o) for o in obj)
    return 0


def derived(what, arrays, compute):
    """``compute(*arrays)``, or what it returned for these very arrays with the same
    contents; ``what`` names the computation and its other inputs (dtype, eps)."""
    snapshot = []        # (dtype, shape, bytes) per array, taken in the loop that checks
    for a in arrays:     # the sizes (a generator and a second loop cost ~0.5 us more)
        if a is None:
            snapshot.append(None)
        elif a.nbytes > _DERIVED_MAX_BYTES:
            return compute(*arrays)      # not kept: no snapshot to take or compare
        else:
            snapshot.append((a.dtype, a.shape, a.tobytes()))
    key = (what, *map(id, arrays))
    hit = _derived.get(key)
    if hit is not None and hit[0] == snapshot:
        if next(reversed(_derived), None) != key:     # a loop on one layer skips this
            with _derived_lock:          # most recently used: last in the dict's order
                if _derived.get(key) is hit:
                    _derived[key] = _derived.pop(key)
        return hit[1]
    value = compute(*arrays)
    size = _held_bytes(snapshot) + _held_bytes(value)
    # a lock: Dask's or the user's threads call in at once, and iterating the dict
    # while another thread inserts would raise
    with _derived_lock:
        old = _derived.pop(key, None)
        if old is not None:
            _derived_size[0] -= old[2]
        while _derived and (len(_derived) >= _DERIVED_ENTRIES
                            or _derived_size[0] + size > _DERIVED_BUDGET):
            _derived_size[0] -= _derived.pop(next(iter(_derived)))[2]
        _derived[key] = (snapshot, value, size)
        _derived_size[0] += size
    return value


def _read_only(a):
    a.setflags(write=False)          # shared between calls: kernels never write them
    return a


def _affine_params(w, b, k, dt):
    """weight and bias (rows: length K, per channel: length C) as arrays of the
    parameter dtype ``dt``."""
    return (constant(1.0, k, dt) if w is None else w if w.dtype == dt else w.astype(dt),
            constant(0.0, k, dt) if b is None else b if b.dtype == dt else b.astype(dt))


def _affine_copies(w, b, k, dt):
    """_affine_params, always new (or shared constant) arrays: safe to keep between calls."""
    return (constant(1.0, k, dt) if w is None else _read_only(w.astype(dt)),
            constant(0.0, k, dt) if b is None else _read_only(b.astype(dt)))


# From how many elements widening a 16-bit parameter costs more than ``derived``'s
# content check (~1 us for two arrays here): NumPy widens float16 one element at a
# time (~1.4 ns each), ml_dtypes' bfloat16 cast is ~10x faster.
_WIDEN_ONCE_FROM = {F16: 256, BF16: 4096}


def _widen_once(p):
    return p is not None and p.size >= _WIDEN_ONCE_FROM.get(p.dtype, 1 << 62)


def fast_affine_params(w, b, k, dt):
    """_affine_params for the fast paths: long 16-bit ones widened once per contents."""
    if _widen_once(w) or _widen_once(b):
        return derived(("affine", dt), (w, b), lambda w_, b_: _affine_copies(w_, b_, k, dt))
    return _affine_params(w, b, k, dt)


def fast_rows(be, x, w, b, eps, rms, return_stats=False):
    """rows_forward on a validated contiguous native x, parameters of its parameter dtype
    (or of x's 16-bit dtype), without ``out``: y, or (y, mean, rstd) as the general path
    returns them (mean None for RMSNorm)."""
    k = x.shape[-1]
    dt = param_dtype(x.dtype)
    w, b = fast_affine_params(w, b, k, dt)
    out = np.empty_like(x)
    mean, r = be.rows_forward(x.reshape(-1, k), w, b, eps, rms, out.reshape(-1, k))
    if not return_stats:
        return out
    shape = x.shape[:-1]
    return out, None if rms else stat_out(mean, dt, shape), stat_out(r, dt, shape)


def fast_group_norm(be, x, groups, w, b, eps, return_stats=False):
    """GroupNorm (InstanceNorm: groups == C) on validated contiguous native channels-first
    x in the one fused kernel the general path uses there: y or (y, mean, rstd)."""
    n, c = x.shape[0], x.shape[1]
    dt = param_dtype(x.dtype)
    w, b = fast_affine_params(w, b, c, dt)
    shape = (n, c, x.size // (n * c))
    out = np.empty_like(x)
    mean, r = be.channels_first_group_forward(x.reshape(shape), groups, w, b, eps,
                                              out.reshape(shape))
    if not return_stats:
        return out
    return out, stat_out(mean, dt), stat_out(r, dt)


def _bn_eval_coefs(dt, eps, running_mean, running_var, weight, bias):
    """((shift, scale, offset) as (1, C) arrays, (mean, rstd) as return_stats gives
    them), all of the parameter dtype ``dt``; or None when var + eps <= 0 somewhere (NaN
    included)."""
    c = running_var.shape[0]
    # float64 for the coefficients, then one cast, in the general path's order of
    # operations (so both paths give bit-identical results)
    r = running_var.astype(np.float64)
    r += eps
    if not np.minimum.reduce(r) > 0.0:
        return None
    np.sqrt(r, out=r)
    np.divide(1.0, r, out=r)
    rstd_ = _read_only(r.astype(dt))
    mean = _read_only(stat_out(running_mean if running_mean.dtype == dt
                               else running_mean.astype(np.float64), dt))
    if weight is not None:
        np.multiply(r, weight, out=r)
    offs = np.zeros(c, dt) if bias is None else bias.astype(dt)
    coefs_ = tuple(_read_only(a.astype(dt).reshape(1, c)) for a in (running_mean, r, offs))
    return coefs_, (mean, rstd_)


def _bn_kernel(shape, axis):
    """The affine kernel's name and the 3-D shape it sees for BatchNorm data of ``shape``."""
    key = (shape, axis)
    hit = _bn_layouts.get(key)
    if hit is None:
        layout, shape3 = elementwise_twin(*batch_layout(shape, axis))
        hit = _bn_layouts[key] = (f"channels_{layout}_affine", shape3)
        if len(_bn_layouts) > 256:
            _bn_layouts.clear()
    return hit


_bn_layouts: dict = {}


def fast_batch_norm_eval(be, x, axis, running_mean, running_var, weight, bias, eps,
                         return_stats=False):
    """Eval BatchNorm on validated contiguous, aligned native x and per-channel
    parameters of its parameter dtype (or of x's 16-bit dtype): y or (y, mean, rstd).

    Returns None (the caller takes the general path) when var + eps <= 0 somewhere,
    so the NaN/Inf that follows is produced under the general path's errstate.
    """
    dt = param_dtype(x.dtype)
    folded = derived(("bn_eval", dt, eps), (running_mean, running_var, weight, bias),
                     lambda *p: _bn_eval_coefs(dt, eps, *p))
    if folded is None:
        return None
    name, shape = _bn_kernel(x.shape, axis)
    out = np.empty_like(x)
    getattr(be, name)(x.reshape(shape), *folded[0], out.reshape(shape))
    if not return_stats:
        return out
    mean, rstd_ = folded[1]
    return out, mean.copy(), rstd_.copy()     # copies: the user may write them


# ---------------------------------------------------------------- backward
def channel_backward(be, view, dy, shift, r, w, pool, expand, count, batch_stats):
    """dx and the per-channel (N, C) gradient sums for BN/GN/IN.

    ``r`` is rstd per statistic ((1, C) for BatchNorm, (N, G) for GroupNorm);
    ``pool`` sums (N, C) partial sums over what shares one statistic (to r's shape)
    and ``expand`` gives each channel its statistic's value ((N', C), as ``shift``);
    ``count`` is how many values share one statistic. With fixed statistics (eval) dx
    is just weight * rstd * dy. Returns (dx, sum_dy, sum_dyx, rstd per channel).
    """
    # The coefficients are computed per statistic and expanded once: a (2, 64, 2, 2)
    # GroupNorm backward spent ~60 us of its ~120 here on (N, C) arrays (r ** 3 is a
    # generic pow in NumPy; r * r * r is not).
    dt = param_dtype(view.data.dtype)
    shift, resid = split_shift(shift, dt)
    sum_dy, sum_dyx = view.call(be, "grad_sums", dy, view.data,
                                *coefs(dt, shift.shape[0], shift))
    if resid is not None:               # sums of dy * (x - mean), exactly centered
        sum_dyx = sum_dyx - resid * sum_dy
    r_c = expand(r)
    a = r_c if w is None else r_c * w
    dx = np.empty_like(view.data)
    if not batch_stats:     # dx = a * dy, x not read: an Inf in x gives no 0 * Inf (torch)
        zero = np.zeros_like(a)
        view.call(be, "affine", dy, *coefs(dt, a.shape[0], zero, a, zero), dx)
        return dx, sum_dy, sum_dyx, r_c
    r_n = r / -count
    coef_x = expand(r_n * r * r * pool(sum_dyx if w is None else sum_dyx * w))
    coef_1 = expand(r_n * pool(sum_dy if w is None else sum_dy * w))
    if resid is not None:
        coef_1 = coef_1 - coef_x * resid
    view.call(be, "grad_apply", dy, view.data,
              *coefs(dt, shift.shape[0], shift, a, coef_x, coef_1), dx)
    return dx, sum_dy, sum_dyx, r_c


def _same(a):
    return a


@_quiet
def batch_norm_backward(be, view, dy, mean, rstd_, w, training):
    """(dx in the view's layout, sum(dy * xhat) per channel, sum(dy) per channel)."""
    if training and _fused_batch(view):
        dx = np.empty_like(view.data)
        w_ = _param_vec(w, 1.0, view.c, param_dtype(dx.dtype))
        sum_dy, sum_dyx = be.channels_first_batch_backward(dy, view.data, mean, rstd_, w_, dx)
        return dx, np.add.reduce(sum_dyx, axis=0) * rstd_, np.add.reduce(sum_dy, axis=0)
    dx, sum_dy, sum_dyx, _ = channel_backward(
        be, view, dy, mean[None], rstd_[None], w,
        lambda s: np.add.reduce(s, axis=0, keepdims=True), _same, view.n * view.s,
        training)
    return dx, np.add.reduce(sum_dyx, axis=0) * rstd_, np.add.reduce(sum_dy, axis=0)


@_quiet
def per_sample_backward(be, view, dy, groups, mean, rstd_, w, batch_stats):
    """GroupNorm/InstanceNorm: (dx in the view's layout, grad_weight, grad_bias)."""
    n, c = view.n, view.c
    per = c // groups
    def expand(g):      # each channel given its group's value (InstanceNorm: its own)
        return g if per == 1 else np.repeat(g, per, axis=1)

    if batch_stats and _fused_group(view, n * groups):
        dx = np.empty_like(view.data)
        w_ = _param_vec(w, 1.0, c, param_dtype(dx.dtype))
        sum_dy, sum_dyx = be.channels_first_group_backward(dy, view.data, groups, mean,
                                                           rstd_, w_, dx)
        r_c = expand(rstd_)
    else:
        def pool(s):    # the channels of each group summed
            return s if per == 1 else np.add.reduce(s.reshape(n, groups, per), axis=-1)
        dx, sum_dy, sum_dyx, r_c = channel_backward(be, view, dy, expand(mean), rstd_, w,
                                                    pool, expand, per * view.s, batch_stats)
    return dx, np.add.reduce(sum_dyx * r_c, axis=0), np.add.reduce(sum_dy, axis=0)


def rows_backward(be, dy, x, k, mean, rstd_, w, rms, dt):
    """LayerNorm / RMSNorm backward: (dx in x's shape and dtype, grad_w, grad_b) per K;
    ``dt`` is x's storage dtype, w of the parameter dtype."""
    dx = np.empty((math.prod(x.shape) // k, k), dt)
    gw, gb = be.rows_backward(rows_view(dy, k, dt), rows_view(x, k, dt), mean, rstd_, w,
                              rms, dx)
    return dx.reshape(x.shape).astype(x.dtype, copy=False), gw, gb


@_quiet
def update_instance_running(running_mean, running_var, mean, m2, s, momentum):
    """torch's InstanceNorm running statistics: batch means of the per-instance mean and
    unbiased variance, the variance from the centred M2 (not derived back from rstd)."""
    if running_mean is not None:
        update_running(running_mean, mean.mean(axis=0), momentum)
    if running_var is not None:     # (m2 is None when no running_var is kept)
        update_running(running_var, (m2 / (s - 1)).mean(axis=0), momentum)
