"""Exact per-channel (count, mean, M2) over a Dask array: a tree reduction.

``da.reduction`` runs ``_chunk`` on every block (normkit's moment kernels, float64
results), then merges groups of partials with ``_combine`` (at most ``split_every`` at a
time, so the tree has bounded fan-in and memory) and finishes with ``_aggregate``. Every
merge is Chan's formula from ``normkit._moments`` -- the one place the library merges
moments -- so the result is the mean and centered M2 of all values, as if the whole
array had been one block, up to float64 rounding (never E[x^2] - E[x]^2).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np

from .. import _moments
from .._validate import storage_dtype
from ..backends import resolve
from . import _blocks

MOMENTS = np.dtype([("n", "f8"), ("mean", "f8"), ("m2", "f8")])


def _kept_moments(be, a, kept):
    """(mean, m2, count) of a C-contiguous block over every axis not in ``kept``.

    The kernels see one of their canonical shapes; only an unusual axis order is
    transposed (copied) first.
    """
    shape, nd = a.shape, a.ndim
    k = len(kept)
    kept_shape = tuple(shape[i] for i in kept)
    rest = a.size // max(1, math.prod(kept_shape))
    if kept == tuple(range(k)):                              # (kept..., reduced...)
        mean, m2 = be.plane_moments(a.reshape(-1, rest))
        return mean.reshape(kept_shape), m2.reshape(kept_shape), rest
    if k == 1:                                               # BatchNorm: (pre, C, post)
        j = kept[0]
        pre, c, post = math.prod(shape[:j]), shape[j], math.prod(shape[j + 1:])
        if post == 1:
            mean, m2 = be.channels_last_moments(a.reshape(1, pre, c))
            return mean[0], m2[0], pre
        mean, m2 = be.plane_moments(a.reshape(pre * c, post))
        mean, m2 = _moments.merge_equal(mean.reshape(pre, c), m2.reshape(pre, c), post,
                                        axis=0)
        return mean, m2, pre * post
    if kept == (0, nd - 1):                                  # InstanceNorm channels-last
        mean, m2 = be.channels_last_moments(a.reshape(shape[0], -1, shape[-1]))
        return mean, m2, rest
    order = kept + tuple(i for i in range(nd) if i not in kept)
    return _kept_moments(be, np.ascontiguousarray(a.transpose(order)), tuple(range(k)))


def _chunk(ctx, block, axis=None, keepdims=True, computing_meta=False, **kwargs):
    if computing_meta:
        return block
    kept = tuple(i for i in range(block.ndim) if i not in axis)
    shape = tuple(1 if i in axis else d for i, d in enumerate(block.shape))
    if block.size == 0:
        z = np.zeros(shape)
        return {"n": z, "mean": z, "m2": z}
    be = resolve(_blocks.enter(ctx))
    # the block as the kernels read it: its own dtype (16-bit too), contiguous, native
    a = np.require(block, storage_dtype(block.dtype), ['C', 'A'])
    mean, m2, count = _kept_moments(be, a, kept)
    return {"n": np.full(shape, float(count)), "mean": mean.reshape(shape),
            "m2": m2.reshape(shape)}


def _merge(pairs, axis):
    from dask.array.core import _concatenate2
    from dask.utils import deepmap
    if not isinstance(pairs, list):
        pairs = [pairs]
    n, mean, m2 = (_concatenate2(deepmap(lambda p, f=f: p[f], pairs), axes=axis)
                   for f in ("n", "mean", "m2"))
    for a in axis:
        n, mean, m2 = (np.expand_dims(v, a) for v in _moments.combine(n, mean, m2, axis=a))
    return n, mean, m2


def _combine(pairs, axis=None, keepdims=True, computing_meta=False, **kwargs):
    n, mean, m2 = _merge(pairs, axis)
    return {"n": n, "mean": mean, "m2": m2}


def _aggregate(pairs, axis=None, keepdims=False, computing_meta=False, **kwargs):
    n, mean, m2 = _merge(pairs, axis)
    out = np.empty(n.shape, MOMENTS)
    out["n"], out["mean"], out["m2"] = n, mean, m2
    return out if keepdims else out.squeeze(axis=axis)


def population_moments(x: Any, keep: tuple[int, ...], *, backend: str | None = None,
                       split_every: int | None = None) -> Any:
    """Lazy exact moments of ``x`` over every axis not in ``keep``.

    Returns a Dask array of shape ``x.shape[keep]`` with the structured dtype
    ``MOMENTS`` (fields ``n``, ``mean``, ``m2``: count, mean and sum of squared
    deviations, float64). ``keep=(ax,)`` gives BatchNorm's per-channel statistics.
    """
    import dask.array as da
    keep = tuple(sorted(k % x.ndim for k in keep))
    axis = tuple(i for i in range(x.ndim) if i not in keep)
    ctx = _blocks.task_context(backend)
    return da.reduction(x, partial(_chunk, ctx), _aggregate, combine=_combine,
                        axis=axis, keepdims=False, dtype=MOMENTS, concatenate=False,
                        split_every=split_every, meta=np.empty((0,) * len(keep), MOMENTS))
