"""Helpers shared by the lazy forward and backward functions: checks, rechunking, and
block functions with several outputs."""
from __future__ import annotations

import contextlib
import math
import os
from functools import partial

import numpy as np

from .. import _validate as V
from ..backends import get_num_threads, set_num_threads
from . import _blocks
from ._hook import is_dask


def _check_float(dt, name):
    if not V.is_float(dt):
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 array, "
                        f"got dtype {dt}")


def check_input(x, min_ndim=1, name="x"):
    """The checks ``normkit._validate.as_input`` makes, without computing anything."""
    _check_float(x.dtype, name)
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions "
                         f"(expected shape (N, C, ...)), got shape {x.shape}")
    return known_chunks(x, name)


def known_chunks(x, name="x"):
    if any(math.isnan(c) for chunks in x.chunks for c in chunks):
        raise ValueError(f"{name} has unknown chunk sizes (shape {x.shape}); call "
                         f"{name}.compute_chunk_sizes() first")
    return x


def small(p):
    """Weights and statistics are small: a Dask one is computed now, once."""
    return p.compute() if is_dask(p) else p


def stand_in(x):
    """An ndarray with x's shape and dtype holding one value (a zero-stride view): for
    the in-memory checks, which then see what they would see of x, computing nothing."""
    return np.broadcast_to(np.zeros((), x.dtype), x.shape)


def check_out(out, x):
    """``out=`` for Dask input: where the result is stored, block by block (docs/dask.md).

    A NumPy array gets normkit's usual checks (shape, dtype, writable); anything else
    ``dask.array.store`` writes into (Zarr, HDF5, a memmap) needs x's shape and dtype.
    """
    if is_dask(out):
        raise TypeError("out: expected an array to store the result into (NumPy, Zarr, "
                        "HDF5, memmap), got a Dask array; without out= the result is a "
                        "lazy Dask array")
    if isinstance(out, np.ndarray):
        V.check_out(out, stand_in(x))
        return
    if not (hasattr(out, "__setitem__") and hasattr(out, "shape") and hasattr(out, "dtype")):
        raise TypeError("out: expected an array to store the result into (NumPy, Zarr, "
                        f"HDF5, memmap), got {type(out).__name__}")
    if tuple(out.shape) != x.shape:
        raise ValueError(f"out: expected shape {x.shape}, got shape {tuple(out.shape)}")
    if np.dtype(out.dtype) != x.dtype:
        raise ValueError(f"out: expected dtype {x.dtype}, got dtype {out.dtype}")


def store_into(result, out):
    """Compute ``result`` (y, or (y, mean, rstd)), writing y into ``out`` block by block
    (``dask.array.store``: x is never whole in memory; a NumPy ``out`` for a distributed
    scheduler gets the computed result copied in); returns what the NumPy call
    returns with ``out=``: ``out``, or ``(out, mean, rstd)`` with NumPy statistics."""
    import dask.array as da
    y, stats = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    wanted = [s for s in stats if s is not None]
    if isinstance(out, np.ndarray) and not _local_scheduler():
        # a distributed worker would write into its own unpickled copy of out
        y, *done = compute(y, *wanted)
        out[...] = y
    else:
        done = compute(da.store(y, out, compute=False), *wanted)[1:]
    if not isinstance(result, tuple):
        return out
    it = iter(done)
    return (out,) + tuple(None if s is None else next(it) for s in stats)


def _scheduler():
    """The scheduler ``dask.compute`` of a Dask array would use now."""
    import dask.array as da
    import dask.base
    return dask.base.get_scheduler(cls=da.Array)


def _local_scheduler():
    """True when computing runs in this process (threads or synchronous), so a task can
    write into a NumPy array of the caller."""
    import dask.local
    import dask.threaded
    return _scheduler() in (dask.threaded.get, dask.local.get_sync)


@contextlib.contextmanager
def _threads_per_task():
    """While Dask's threaded scheduler runs k tasks at once in this process, normkit's
    kernels use ``get_num_threads() // k`` threads each (at least 1), as a worker process
    does (``set_task_threads``): k tasks times the kernels' own threads would otherwise
    put more threads than cores to work, and a multi-threaded kernel waits at its
    barrier for threads that have no core. Restored afterwards. (A normkit call that
    another thread of yours makes meanwhile sees the reduced count too.)"""
    import dask
    import dask.threaded
    before = get_num_threads()
    workers = dask.config.get("num_workers", None) or os.cpu_count() or 1
    per = max(1, before // workers)
    if _scheduler() is not dask.threaded.get or per == before:
        yield
        return
    set_num_threads(per)
    try:
        yield
    finally:
        set_num_threads(before)


def compute(*collections, **kwargs):
    """``dask.compute`` for the computations normkit itself starts (eager statistics,
    ``out=``, recalibration, reports), with ``_threads_per_task``."""
    import dask
    with _threads_per_task():
        return dask.compute(*collections, **kwargs)


def _graph_arrays(y):
    """The NumPy arrays held in y's graph (``from_array`` blocks, literal data)."""
    for v in dict(y.__dask_graph__()).values():
        v = getattr(v, "value", v)               # a DataNode wraps literal data
        if isinstance(v, np.ndarray):
            yield v


def direct_ok(out, inputs):
    """Tasks may write straight into ``out``: a NumPy array, a scheduler in this
    process, and no memory shared with an array in the inputs' graphs (a block written
    early must not change what a later block reads)."""
    return (isinstance(out, np.ndarray) and _local_scheduler()
            and not any(np.may_share_memory(a, out) for d in inputs for a in _graph_arrays(d)))


def write_direct(fn, inputs, out, *also):
    """Compute ``fn`` on the blocks of ``inputs`` (aligned as by ``map_blocks``, the
    first one giving the output's chunks) into ``out`` (``_blocks.write_block``),
    together with the Dask arrays ``also`` in the same ``dask.compute``; returns their
    values."""
    import uuid

    import dask.array as da
    x = inputs[0]
    # name= given: map_blocks would otherwise hash all of out to name the graph
    done = da.map_blocks(partial(_blocks.write_block, fn, out), *inputs, dtype=bool,
                         chunks=tuple((1,) * len(c) for c in x.chunks),
                         meta=np.empty((0,) * x.ndim, bool),
                         name=f"normkit-out-{uuid.uuid4().hex}")
    return compute(done, *also)[1:]


def write_into(fn, x, others, out):
    """``out=`` for a block function ``fn`` (the ``run_blocks`` case without extras).

    ``direct_ok``: every task writes its block's result straight into ``out``
    (``write_direct``) -- no output blocks, no final concatenation, the one full copy a
    NumPy result from ``compute()`` costs. A NumPy ``out`` sharing memory with the data:
    the whole result is computed first, then copied. Anything else (Zarr, HDF5, a
    memmap, or a NumPy array for a distributed scheduler): ``store_into``.
    """
    import dask.array as da
    inputs = (x, *others)
    if direct_ok(out, inputs):
        write_direct(fn, inputs, out)
        return out
    y = da.map_blocks(fn, *inputs, dtype=x.dtype, meta=np.empty((0,) * x.ndim, x.dtype))
    if isinstance(out, np.ndarray) and _local_scheduler():
        (out[...],) = compute(y)
        return out
    return store_into(y, out)


def like(a, x, name):
    """``a`` (NumPy or Dask) as a Dask array of x's shape, chunked as x."""
    import dask.array as da
    if a is None:
        return None
    if not is_dask(a):
        a = np.asarray(a)
        _check_float(a.dtype, name)
    else:
        check_input(a, name=name)
    if a.shape != x.shape:
        raise ValueError(f"{name}: expected shape {x.shape}, got shape {a.shape}")
    return da.asarray(a).rechunk(x.chunks)


def whole(x, axes, channel_axis=None, per=1):
    """x with every axis in ``axes`` in one chunk (and channel chunks that hold whole
    groups of ``per`` channels); unchanged when it already is.

    When axes are merged, the batch axis's chunks shrink by the same factor, so a
    chunk holds about as many bytes as before.
    """
    spec, merged = {}, 1
    for a in axes:
        if len(x.chunks[a]) > 1:
            spec[a] = -1
            merged *= len(x.chunks[a])
    if channel_axis is not None and per > 1 and any(c % per for c in x.chunks[channel_axis]):
        spec[channel_axis] = max(per, round(max(x.chunks[channel_axis]) / per) * per)
    if not spec:
        return x
    if merged > 1 and 0 not in spec and 0 not in axes:
        spec[0] = max(1, math.ceil(max(x.chunks[0]) / merged))
    return x.rechunk(spec)


def run_blocks(fn, x, others=(), extra=(), into=None):
    """``fn`` on every block of x (and the aligned blocks of ``others``).

    Without ``extra`` fn returns the output block. Otherwise it returns a tuple
    ``(y, a1, a2, ...)`` and ``extra`` lists ``(chunks, dtype)`` for each ``a_k`` (or
    None where fn returns None); one task per block computes all of them.
    ``into`` (an ``out=`` target, without ``extra``): compute now, write into it, return it.
    """
    import dask.array as da
    nd = x.ndim
    if not extra and into is not None:
        return write_into(fn, x, others, into)
    if not extra:
        return da.map_blocks(fn, x, *others, dtype=x.dtype, meta=np.empty((0,) * nd, x.dtype))
    parts = da.map_blocks(fn, x, *others, dtype=object, meta=np.empty((0,) * nd, object))
    outs = [parts.map_blocks(partial(_blocks.item, 0), dtype=x.dtype,
                             meta=np.empty((0,) * nd, x.dtype))]
    for k, spec in enumerate(extra, 1):
        if spec is None:
            outs.append(None)
            continue
        chunks, dt = spec
        outs.append(parts.map_blocks(partial(_blocks.item, k), chunks=chunks, dtype=dt,
                                     meta=np.empty((0,) * nd, dt)))
    return outs


def squeeze(a, axes):
    return None if a is None else a.squeeze(axis=tuple(axes))


def stat_chunks(x, kept, sizes=None):
    """Chunks of a keep-dims statistic: x's chunks on ``kept`` axes (or ``sizes[axis]``),
    one chunk of 1 per block elsewhere (per-block partials) -- see ``partial_chunks``."""
    sizes = sizes or {}
    return tuple(sizes.get(i, x.chunks[i]) if i in kept else (1,) for i in range(x.ndim))


def partial_chunks(x, kept):
    """Chunks of per-block partial sums: kept axes as x, one entry of 1 per block elsewhere."""
    return tuple(x.chunks[i] if i in kept else (1,) * len(x.chunks[i]) for i in range(x.ndim))
