"""Backward functions on Dask arrays: lazy ``grad_x``, lazy ``grad_weight``/``grad_bias``.

Each block runs ``normkit.functional.<name>_backward`` on its NumPy blocks. For the
per-sample norms a block holds whole samples, so its ``grad_x`` is exact and its weight
and bias gradients are partial sums, summed over blocks in float64. Training BatchNorm's
``grad_x`` depends on two per-channel sums over the whole array; they are reduced first
(from the same partial sums) and the correction is applied block by block::

    dx = dx_eval - weight * rstd * (sum(dy) + xhat * sum(dy * xhat)) / count
"""
from __future__ import annotations

from functools import partial

import numpy as np

from .. import _validate as V
from .. import functional as F
from . import _blocks
from ._common import (
    check_input,
    like,
    partial_chunks,
    run_blocks,
    small,
    stat_chunks,
    whole,
)


def _grad_dtype(weight, x):
    """As normkit.functional: the weight's dtype, else the compute dtype."""
    return weight.dtype if isinstance(weight, np.ndarray) else V.param_dtype(x.dtype)


def _stats_like(s, xw, kept, sizes=None):
    """A statistic (NumPy or Dask) reshaped keep-dims and chunked to align with xw."""
    import dask.array as da
    if s is None:
        return None
    s = da.asarray(s)
    shape = [1] * xw.ndim
    chunks = stat_chunks(xw, kept, sizes)
    for i in kept:
        shape[i] = sum(chunks[i])
    return s.reshape(shape).rechunk(chunks)


def _finish(dx, gw, gb, kept, weight, x):
    """Sum the per-block partials over the non-kept axes, in float64, then cast."""
    axes = tuple(i for i in range(x.ndim) if i not in kept)
    dt = _grad_dtype(weight, x)
    return (dx, gw.sum(axis=axes, dtype=np.float64).astype(dt),
            gb.sum(axis=axes, dtype=np.float64).astype(dt))


# ---------------------------------------------------------------- BatchNorm
def _bn_block(ctx, ax, mean, rstd, weight, dy, x, block_info=None):
    be = _blocks.enter(ctx)
    dy, x, mean, rstd, weight = _blocks.aligned(dy, x, mean, rstd, weight)
    sl = slice(*_blocks.channel_range(block_info, ax))
    dx, gw, gb = F.batch_norm_backward(dy, x, mean[sl], rstd[sl],
                                       None if weight is None else weight[sl],
                                       training=False, axis=ax, backend=be)
    shape = [1] * x.ndim
    shape[ax] = gw.shape[0]
    return dx, gw.reshape(shape), gb.reshape(shape)


def _bn_train_dx(ax, count, mean, rstd, weight, dx, x, gw, gb, block_info=None):
    sl = slice(*_blocks.channel_range(block_info, ax))
    shape = [1] * x.ndim
    shape[ax] = sl.stop - sl.start
    m, r = mean[sl].reshape(shape), rstd[sl].reshape(shape)
    a = r if weight is None else r * weight[sl].reshape(shape)
    xhat = (x.astype(np.float64) - m) * r
    corr = a * (gb.astype(np.float64) + xhat * gw.astype(np.float64)) / count
    return (dx.astype(np.float64) - corr).astype(dx.dtype)


def batch_norm_backward(grad_out, x, mean, rstd, weight=None, *, training=True, axis=1,
                        backend=None):
    check_input(x, 2)
    dy = like(grad_out, x, "grad_out")
    ax = V.channel_axis(x, axis, "batch_norm_backward")
    c = x.shape[ax]
    mean = V.as_param(small(mean), (c,), "mean")
    rstd = V.as_param(small(rstd), (c,), "rstd")
    weight = small(weight)
    V.as_param(weight, (c,), "weight")
    ctx = _blocks.task_context(backend)
    gdt = _grad_dtype(weight, x)
    chunks = partial_chunks(x, (ax,))
    fn = partial(_bn_block, ctx, ax, mean, rstd, weight)
    dx, gw, gb = run_blocks(fn, dy, (x,), [(chunks, gdt), (chunks, gdt)])
    dx, gw, gb = _finish(dx, gw, gb, (ax,), weight, x)
    if training and x.size:
        total = _stats_like(gw, x, (ax,)), _stats_like(gb, x, (ax,))
        dx = dx.map_blocks(partial(_bn_train_dx, ax, x.size // c, mean, rstd, weight), x,
                           *total, dtype=x.dtype, meta=np.empty((0,) * x.ndim, x.dtype))
    return dx, gw, gb


# ---------------------------------------------------------------- Group / Instance
def _sample_block(ctx, ax, per, weight, instance, use_input_stats, dy, x, mean, rstd,
                  block_info=None):
    be = _blocks.enter(ctx)
    dy, x, mean, rstd, weight = _blocks.aligned(dy, x, mean, rstd, weight)
    sl = slice(*_blocks.channel_range(block_info, ax))
    w = None if weight is None else weight[sl]
    nb, gb_ = x.shape[0], (sl.stop - sl.start) // per
    mean, rstd = mean.reshape(nb, gb_), rstd.reshape(nb, gb_)
    if instance:
        dx, gw, gb = F.instance_norm_backward(dy, x, mean, rstd, w,
                                              use_input_stats=use_input_stats, axis=ax,
                                              backend=be)
    else:
        dx, gw, gb = F.group_norm_backward(dy, x, gb_, mean, rstd, w, axis=ax, backend=be)
    shape = [1] * x.ndim
    shape[ax] = gw.shape[0]
    return dx, gw.reshape(shape), gb.reshape(shape)


def _per_sample(what, grad_out, x, groups, mean, rstd, weight, axis, backend, instance,
                use_input_stats=True):
    check_input(x, 2)
    dy = like(grad_out, x, "grad_out")
    ax = V.channel_axis(x, axis, what, allow_batch_axis=False)
    c = x.shape[ax]
    groups = c if instance else V.num_groups(groups, c, x)
    per = c // groups
    weight = small(weight)
    V.as_param(weight, (c,), "weight")
    for s, name in ((mean, "mean"), (rstd, "rstd")):
        if s is None or tuple(s.shape) != (x.shape[0], groups):
            raise ValueError(f"{name}: expected shape {(x.shape[0], groups)}, got shape "
                             f"{None if s is None else tuple(s.shape)}")
    spatial = [i for i in range(1, x.ndim) if i != ax]
    xw = whole(x, spatial, ax, per)
    sizes = {ax: tuple(ch // per for ch in xw.chunks[ax])}
    m, r = _stats_like(mean, xw, (0, ax), sizes), _stats_like(rstd, xw, (0, ax), sizes)
    gdt = _grad_dtype(weight, x)
    chunks = partial_chunks(xw, (ax,))
    fn = partial(_sample_block, _blocks.task_context(backend), ax, per, weight, instance,
                 use_input_stats)
    dx, gw, gb = run_blocks(fn, dy.rechunk(xw.chunks), (xw, m, r),
                            [(chunks, gdt), (chunks, gdt)])
    return _finish(dx, gw, gb, (ax,), weight, x)


def group_norm_backward(grad_out, x, num_groups, mean, rstd, weight=None, *, axis=1,
                        backend=None):
    return _per_sample("group_norm_backward", grad_out, x, num_groups, mean, rstd, weight,
                       axis, backend, False)


def instance_norm_backward(grad_out, x, mean, rstd, weight=None, *, use_input_stats=True,
                           axis=1, backend=None):
    return _per_sample("instance_norm_backward", grad_out, x, None, mean, rstd, weight,
                       axis, backend, True, use_input_stats)


# ---------------------------------------------------------------- Layer / RMS
def _rows_block(ctx, ns, weight, rms, dy, x, rstd, mean=None):
    be = _blocks.enter(ctx)
    dy, x, rstd, mean, weight = _blocks.aligned(dy, x, rstd, mean, weight)
    lead = x.shape[:x.ndim - len(ns)]
    fn = F.rms_norm_backward if rms else F.layer_norm_backward
    dx, gw, gb = fn(dy, x, ns, None if rms else mean.reshape(lead), rstd.reshape(lead),
                    weight, backend=be)
    shape = (1,) * len(lead) + tuple(ns)
    return dx, gw.reshape(shape), gb.reshape(shape)


def _rows(what, grad_out, x, normalized_shape, mean, rstd, weight, backend, rms):
    check_input(x)
    dy = like(grad_out, x, "grad_out")
    ns = V.normalized_shape(normalized_shape, x, what)
    weight = small(weight)
    V.as_param(weight, ns, "weight")
    lead = x.ndim - len(ns)
    stats = [("rstd", rstd)] + ([] if rms else [("mean", mean)])
    for name, s in stats:
        if s is None or tuple(s.shape) != x.shape[:lead]:
            raise ValueError(f"{name}: expected shape {x.shape[:lead]}, got shape "
                             f"{None if s is None else tuple(s.shape)}")
    xw = whole(x, range(lead, x.ndim))
    kept = tuple(range(lead))
    others = [xw] + [_stats_like(s, xw, kept) for _, s in stats]
    gdt = _grad_dtype(weight, x)
    chunks = partial_chunks(xw, tuple(range(lead, x.ndim)))
    fn = partial(_rows_block, _blocks.task_context(backend), tuple(ns), weight, rms)
    dx, gw, gb = run_blocks(fn, dy.rechunk(xw.chunks), others, [(chunks, gdt), (chunks, gdt)])
    return _finish(dx, gw, gb, tuple(range(lead, x.ndim)), weight, x)


def layer_norm_backward(grad_out, x, normalized_shape, mean, rstd, weight=None, *,
                        backend=None):
    return _rows("layer_norm_backward", grad_out, x, normalized_shape, mean, rstd, weight,
                 backend, False)


def rms_norm_backward(grad_out, x, normalized_shape, mean, rstd, weight=None, *,
                      backend=None):
    return _rows("rms_norm_backward", grad_out, x, normalized_shape, mean, rstd, weight,
                 backend, True)
