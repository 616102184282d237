"""The functional API on Dask arrays: same signatures and results, lazy outputs.

* Per-sample norms (LayerNorm, RMSNorm, GroupNorm, InstanceNorm) and eval BatchNorm run
  ``normkit.functional`` itself on every block (``map_blocks``): the block holds whole
  rows / whole samples, so its result is exactly the in-memory one. Normalized axes that
  are split across chunks are rechunked into one chunk first (``_common.whole``), and
  only those.
* Training BatchNorm (and InstanceNorm updating running statistics) needs statistics
  over the whole array: they are computed *eagerly*, at call time, by the exact tree
  reduction of ``_reduce``; the running statistics are updated in place then, as for
  NumPy input; the normalized output stays lazy (one more pass over x when computed).
* ``out=`` (an ndarray, Zarr array, ...): the call becomes eager; the result is written
  into ``out`` block by block and ``out`` is returned, as for NumPy input. A NumPy
  ``out`` on a local scheduler is the kernels' own output (``_common.write_into``): no
  output blocks, no concatenation.
"""
from __future__ import annotations

import functools
from functools import partial

import numpy as np

from .. import _engine as E
from .. import _validate as V
from . import _blocks
from ._backward import (  # noqa: F401
    batch_norm_backward,
    group_norm_backward,
    instance_norm_backward,
    layer_norm_backward,
    rms_norm_backward,
)
from ._common import (
    check_input,
    check_out,
    compute,
    direct_ok,
    like,
    run_blocks,
    small,
    squeeze,
    stat_chunks,
    store_into,
    whole,
    write_direct,
)
from ._reduce import population_moments


def _stores_out(fn):
    """``out=``: checked here, then passed on; the call writes into ``out`` block by block
    and returns it (``_common.write_into``), or returns a lazy result (with statistics,
    or for empty x) that is stored into ``out`` here (``store_into``)."""
    @functools.wraps(fn)
    def wrapper(x, *args, out=None, **kwargs):
        if out is None:
            return fn(x, *args, **kwargs)
        check_input(x)
        check_out(out, x)
        res = fn(x, *args, out=out, **kwargs)
        return res if res is out else store_into(res, out)
    return wrapper


def _batch_stats(mom, count, running_mean, running_var, momentum):
    """(mean, biased var) of training BatchNorm from its moments; the running statistics
    updated in place (unbiased variance)."""
    mean, m2 = mom["mean"], mom["m2"]
    with np.errstate(all="ignore"):     # a statistic that overflows its dtype is Inf
        E.update_running_stats(running_mean, running_var, mean, m2 / (count - 1), momentum)
    return mean, m2 / count


def _empty(x, stats_shape, dt, return_stats, with_mean=True):
    import dask.array as da
    y = da.from_array(np.empty(x.shape, x.dtype))
    if not return_stats:
        return y
    nan = da.from_array(np.full(stats_shape, np.nan, dt))
    return y, (nan if with_mean else None), nan


def _check_activation(activation, residual, x):
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return like(residual, x, "residual")


def _check_mode(what, batch_stats, momentum, running_mean, running_var, too_few, needs_running):
    """Statistics from the batch (updating the running ones in place) or from the running
    statistics: the checks of either mode, with normkit._validate's messages.
    ``too_few``: the message when the batch has too few values, else None."""
    if not batch_stats:
        if running_mean is None or running_var is None:
            raise ValueError(needs_running)
        return momentum
    momentum = V.check_momentum(momentum, what)
    if too_few:
        raise ValueError(too_few)
    V.check_writable(running_mean, "running_mean")
    V.check_writable(running_var, "running_var")
    return momentum


def _params(c, weight, bias):
    weight, bias = small(weight), small(bias)
    V.as_param(weight, (c,), "weight")
    V.as_param(bias, (c,), "bias")
    return weight, bias


# ====================================================================== BatchNorm
@_stores_out
def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
               training=False, momentum=0.1, eps=1e-5, *, axis=1, out=None, backend=None,
               return_stats=False, activation=None, residual=None):
    import dask.array as da
    check_input(x, 2)
    ax = V.channel_axis(x, axis, "batch_norm")
    c = x.shape[ax]
    running_mean = V.running_stat(small(running_mean), (c,), "running_mean")
    running_var = V.running_stat(small(running_var), (c,), "running_var")
    weight, bias = _params(c, weight, bias)
    eps = V.check_eps(eps, "batch_norm")
    residual = _check_activation(activation, residual, x)
    dt = V.param_dtype(x.dtype)
    count = x.size // c if c else 0
    too_few = ("Expected more than 1 value per channel when training, got input size "
               f"{x.shape}") if count <= 1 else None
    momentum = _check_mode("batch_norm", training, momentum, running_mean, running_var,
                           too_few, "batch_norm: eval mode (training=False) needs running_mean and "
                           "running_var; pass them or use training=True")
    ctx = _blocks.task_context(backend)
    if x.size == 0:
        return _empty(x, (c,), dt, return_stats)
    others = () if residual is None else (residual,)
    if training and not return_stats and direct_ok(out, (x, *others)):
        # one graph: the moments, then every block normalized into out with them
        moments = population_moments(x, (ax,), backend=ctx.backend)
        per_block = moments[tuple(slice(None) if i == ax else None for i in range(x.ndim))]
        fn = partial(_blocks.train_block, ctx, ax, weight, bias, eps, activation)
        (mom,) = write_direct(fn, (x, per_block, *others), out, moments)
        _batch_stats(mom, count, running_mean, running_var, momentum)
        return out
    if training:        # eager: the statistics of the whole array, exactly merged
        (mom,) = compute(population_moments(x, (ax,), backend=ctx.backend))
        mean, var = _batch_stats(mom, count, running_mean, running_var, momentum)
    else:
        mean, var = running_mean.copy(), running_var.astype(np.float64)
    fn = partial(_blocks.affine_block, ctx, ax, mean, var, weight, bias, eps, activation)
    y = run_blocks(fn, x, others, into=None if return_stats else out)
    if not return_stats:
        return y
    rstd = 1.0 / np.sqrt(var + eps)
    return y, da.from_array(np.array(mean, dtype=dt)), da.from_array(np.array(rstd, dtype=dt))


# ====================================================================== Group / Instance
def _per_sample(x, ax, per, weight, bias, eps, fixed, activation, residual, backend,
                return_stats, out=None):
    """GroupNorm / InstanceNorm block by block; stats (N, C / per)."""
    ctx = _blocks.task_context(backend)
    spatial = [i for i in range(1, x.ndim) if i != ax]
    xw = whole(x, spatial, ax, per)
    others = () if residual is None else (residual.rechunk(xw.chunks),)
    fn = partial(_blocks.sample_block, ctx, ax, per, weight, bias, eps, fixed, activation,
                 return_stats)
    if not return_stats:
        return run_blocks(fn, xw, others, into=out)
    dt = V.param_dtype(x.dtype)
    chunks = stat_chunks(xw, (0, ax), {ax: tuple(ch // per for ch in xw.chunks[ax])})
    y, mean, rstd = run_blocks(fn, xw, others, [(chunks, dt), (chunks, dt)])
    return y, squeeze(mean, spatial), squeeze(rstd, spatial)


@_stores_out
def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
               backend=None, return_stats=False, activation=None, residual=None):
    check_input(x, 2)
    ax = V.channel_axis(x, axis, "group_norm", allow_batch_axis=False)
    c = x.shape[ax]
    groups = V.num_groups(num_groups, c, x)
    weight, bias = _params(c, weight, bias)
    eps = V.check_eps(eps, "group_norm")
    residual = _check_activation(activation, residual, x)
    if x.size == 0:
        return _empty(x, (x.shape[0], groups), V.param_dtype(x.dtype), return_stats)
    return _per_sample(x, ax, c // groups, weight, bias, eps, None, activation, residual,
                       backend, return_stats, out)


@_stores_out
def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, out=None,
                  backend=None, return_stats=False):
    check_input(x, 2)
    ax = V.channel_axis(x, axis, "instance_norm", allow_batch_axis=False)
    n, c = x.shape[0], x.shape[ax]
    running_mean = V.running_stat(small(running_mean), (c,), "running_mean")
    running_var = V.running_stat(small(running_var), (c,), "running_var")
    weight, bias = _params(c, weight, bias)
    eps = V.check_eps(eps, "instance_norm")
    spatial = x.size // (n * c) if n * c else 0
    too_few = ("Expected more than 1 spatial element when training, got input size "
               f"{x.shape}") if spatial <= 1 and x.size else None
    momentum = _check_mode("instance_norm", use_input_stats, momentum, running_mean,
                           running_var, too_few, "instance_norm: use_input_stats=False "
                           "needs running_mean and running_var")
    fixed = None if use_input_stats else (running_mean.copy(), running_var.copy())
    if x.size == 0:
        return _empty(x, (n, c), V.param_dtype(x.dtype), return_stats)
    if use_input_stats and (running_mean is not None or running_var is not None):
        # eager, as training BatchNorm: per-instance moments, then the batch average
        (mom,) = compute(population_moments(x, (0, ax), backend=backend))
        E.update_instance_running(running_mean, running_var, mom["mean"], mom["m2"],
                                  spatial, momentum)
    return _per_sample(x, ax, 1, weight, bias, eps, fixed, None, None, backend, return_stats,
                       out)


# ====================================================================== Layer / RMS
def _rows(x, normalized_shape, weight, bias, eps, backend, return_stats, rms, what,
          out=None):
    check_input(x)
    ns = V.normalized_shape(normalized_shape, x, what)
    weight, bias = small(weight), small(bias)
    V.as_param(weight, ns, "weight")
    V.as_param(bias, ns, "bias")
    ctx = _blocks.task_context(backend)
    lead = x.ndim - len(ns)
    xw = whole(x, range(lead, x.ndim))
    fn = partial(_blocks.rows_block, ctx, ns, weight, bias, eps, rms, return_stats)
    if not return_stats:
        return run_blocks(fn, xw, into=out)
    dt = V.param_dtype(x.dtype)
    chunks = stat_chunks(xw, range(lead))
    y, mean, rstd = run_blocks(fn, xw, (), [None if rms else (chunks, dt), (chunks, dt)])
    trailing = range(lead, x.ndim)
    return y, squeeze(mean, trailing), squeeze(rstd, trailing)


@_stores_out
def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
               backend=None, return_stats=False):
    eps = V.check_eps(eps, "layer_norm")
    return _rows(x, normalized_shape, weight, bias, eps, backend, return_stats, False,
                 "layer_norm", out)


@_stores_out
def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None, backend=None,
             return_stats=False):
    check_input(x)
    eps = V.default_rms_eps(x.dtype) if eps is None else V.check_eps(eps, "rms_norm")
    return _rows(x, normalized_shape, weight, None, eps, backend, return_stats, True,
                 "rms_norm", out)
