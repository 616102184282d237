"""What runs inside one Dask task: normkit's kernels on one NumPy block.

Every block function takes a ``TaskContext`` first. It is built when the graph is built
and pickled with the task, so the backend the caller chose (``backend=`` or the current
default, resolved to a concrete name) and the kernel thread count travel to the worker.
Block functions are module-level (picklable by reference) and take plain NumPy arrays.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from .. import functional as F
from ..backends import get_num_threads, resolve, set_num_threads
from . import _hook


@dataclass(frozen=True)
class TaskContext:
    backend: str           # a concrete backend name ('cython', 'numba', 'numpy')
    threads: int           # kernel threads per task inside a worker process


def task_context(backend):
    """The caller's backend choice, resolved here (so a bad name fails at call time)."""
    return TaskContext(resolve(backend).NAME, _hook.get_task_threads())


def _in_worker_process() -> bool:
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return False
    try:
        distributed.get_worker()
    except ValueError:        # not running inside a distributed worker
        return False
    return True


def enter(ctx: TaskContext) -> str:
    """Apply the context in this task; returns the backend name to pass on."""
    if _in_worker_process() and get_num_threads() != ctx.threads:
        # a worker process runs only Dask tasks: its kernel thread count is ours to set
        set_num_threads(ctx.threads)
    return ctx.backend


def aligned(*arrays):
    """Blocks unpickled on a worker can sit at an odd offset of a network buffer; the
    compiled kernels need aligned memory (copy only those that are not)."""
    return [a if a is None or a.flags.aligned else np.array(a) for a in arrays]


def channel_range(block_info, ax):
    """(start, stop) of this block along the channel axis of the first input."""
    return block_info[0]["array-location"][ax]


def _keepdims(stat, block_shape, kept):
    """A statistic of shape block_shape[kept] reshaped with 1 on the reduced axes."""
    shape = [1] * len(block_shape)
    for k, d in zip(kept, stat.shape, strict=True):
        shape[k] = d
    return np.asarray(stat).reshape(shape)


# ---------------------------------------------------------------- forward blocks
def rows_block(ctx, ns, weight, bias, eps, rms, return_stats, block, block_info=None,
               out=None):
    """LayerNorm / RMSNorm on a block holding whole rows (``out``: see ``write_block``)."""
    be = enter(ctx)
    block, weight, bias = aligned(block, weight, bias)
    if rms:
        res = F.rms_norm(block, ns, weight, eps, backend=be, return_stats=return_stats,
                         out=out)
    else:
        res = F.layer_norm(block, ns, weight, bias, eps, backend=be,
                           return_stats=return_stats, out=out)
    if not return_stats:
        return res
    y, mean, rstd = res
    kept = tuple(range(block.ndim - len(ns)))
    return (y, None if mean is None else _keepdims(mean, block.shape, kept),
            _keepdims(rstd, block.shape, kept))


def sample_block(ctx, ax, per, weight, bias, eps, fixed, activation, return_stats,
                 block, residual=None, block_info=None, out=None):
    """GroupNorm (per = C / G) or InstanceNorm (per = 1) on a block of whole groups.

    ``fixed=(running_mean, running_var)``: InstanceNorm with use_input_stats=False.
    """
    be = enter(ctx)
    block, residual, weight, bias = aligned(block, residual, weight, bias)
    fixed = None if fixed is None else aligned(*fixed)
    c0, c1 = channel_range(block_info, ax)
    sl = slice(c0, c1)
    w = None if weight is None else weight[sl]
    b = None if bias is None else bias[sl]
    if fixed is not None:
        res = F.instance_norm(block, fixed[0][sl], fixed[1][sl], w, b, False, 0.0, eps,
                              axis=ax, backend=be, return_stats=return_stats, out=out)
    elif per == 1 and residual is None and activation is None:
        res = F.instance_norm(block, None, None, w, b, True, 0.0, eps, axis=ax,
                              backend=be, return_stats=return_stats, out=out)
    else:
        res = F.group_norm(block, (c1 - c0) // per, w, b, eps, axis=ax, backend=be,
                           return_stats=return_stats, activation=activation,
                           residual=residual, out=out)
    if not return_stats:
        return res
    y, mean, rstd = res
    shape = list(block.shape)
    shape[ax] = (c1 - c0) // per
    return y, _keepdims(mean, shape, (0, ax)), _keepdims(rstd, shape, (0, ax))


def affine_block(ctx, ax, mean, var, weight, bias, eps, activation, block, residual=None,
                 block_info=None, out=None):
    """BatchNorm with fixed per-channel statistics (running, or the exact batch ones)."""
    be = enter(ctx)
    block, residual, mean, var, weight, bias = aligned(block, residual, mean, var, weight,
                                                       bias)
    c0, c1 = channel_range(block_info, ax)
    sl = slice(c0, c1)
    return F.batch_norm(block, mean[sl], var[sl], None if weight is None else weight[sl],
                        None if bias is None else bias[sl], False, 0.0, eps, axis=ax,
                        backend=be, activation=activation, residual=residual, out=out)


def train_block(ctx, ax, weight, bias, eps, activation, block, mom, residual=None,
                block_info=None, out=None):
    """Training BatchNorm on a block, with the merged moments (``_reduce.MOMENTS``) of
    this block's channels as a task input: statistics and output in one graph."""
    be = enter(ctx)
    block, residual, weight, bias = aligned(block, residual, weight, bias)
    c0, c1 = channel_range(block_info, ax)
    sl = slice(c0, c1)
    mom = mom.reshape(-1)
    return F.batch_norm(block, mom["mean"], mom["m2"] / mom["n"],
                        None if weight is None else weight[sl],
                        None if bias is None else bias[sl], False, 0.0, eps, axis=ax,
                        backend=be, activation=activation, residual=residual, out=out)


def write_block(fn, target, *blocks, block_info=None):
    """``fn`` on one block, its output going straight into that block's region of the
    NumPy array ``target`` (no output block, no final concatenation); returns a
    one-element placeholder. Where the region is not one contiguous piece of memory
    (``target`` chunked across a non-leading axis), the block's result is copied in.
    """
    region = tuple(slice(a, b) for a, b in block_info[0]["array-location"])
    view = target[region]
    if view.flags.c_contiguous and view.flags.aligned:
        fn(*blocks, block_info=block_info, out=view)
    else:
        view[...] = fn(*blocks, block_info=block_info)
    return np.zeros((1,) * view.ndim, bool)


def item(k, parts):
    """One output of a block function that returned several."""
    return parts[k]
