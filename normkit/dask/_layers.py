"""Layers and precise-BN recalibration on Dask input.

* ``layer(x)`` with a Dask ``x`` runs the layer's usual forward, whose functional calls
  dispatch to the lazy implementations (training BatchNorm: statistics and running
  statistics eagerly, output lazy). The small-batch diagnostics are skipped for Dask
  input (they would pull the batch into memory); ``layer.backward`` returns a lazy
  ``grad_x`` and computes ``layer.grads`` (NumPy, as always) at once.
* ``recalibrate(layers, batches)`` with Dask batches: every batch's per-channel
  (count, mean, M2) is a lazy tree reduction; all of them are computed in one
  ``dask.compute`` (in parallel, memory bounded by a few chunks per worker) and merged
  with Chan's formula (``normkit._moments.combine``). The layers are then updated
  through their public ``load_state_dict``, exactly as ``normkit.recalibrate`` would.
"""
from __future__ import annotations

import itertools
import warnings
from typing import Any

import numpy as np

from .. import _moments
from ..layers import BatchNorm
from ..recalibration import _as_named_layers, _batch_for
from ._common import compute
from ._hook import is_dask
from ._reduce import population_moments


def layer_forward(layer, x):
    if getattr(layer, "renorm", False) and layer.training:
        raise NotImplementedError("BatchNorm(renorm=True) in training mode does not take "
                                  "Dask input; compute the batch or use eval mode")
    own = "diagnostics" in vars(layer)
    saved = layer.diagnostics if own else None
    if own:
        layer.diagnostics = False          # the checks would compute x in memory
    try:
        y, layer._cache = layer._forward(x)
    finally:
        if own:
            layer.diagnostics = saved
    return y


def _lazy_moments(layer, x):
    import dask.array as da
    x = x if is_dask(x) else da.from_array(np.asarray(x))
    if x.ndim < 2:
        raise ValueError(f"a BatchNorm input needs at least 2 dimensions (N, C, ...), got "
                         f"shape {x.shape}")
    ax = layer.axis % x.ndim
    if x.shape[ax] != layer.num_features:
        raise ValueError(f"expected {layer.num_features} channels on axis {layer.axis}, "
                         f"got input shape {x.shape}")
    return population_moments(x, (ax,), backend=layer.backend)


def recalibrate(layers_or_callable: Any, batches: Any, *, layers: Any = None,
                num_batches: int | None = None, progress: bool | None = None) -> dict:
    """``normkit.recalibrate`` for Dask batches (a Dask array is one batch).

    Same arguments, result and warnings as :func:`normkit.recalibrate` for layers
    (the callable form is not handled here). ``progress=True`` shows Dask's local
    progress bar (a distributed cluster has its dashboard instead).
    """
    if layers is not None or callable(layers_or_callable) and not hasattr(
            layers_or_callable, "track_running_stats"):
        raise TypeError("normkit.dask.recalibrate takes layers (the callable form runs "
                        "your model: use normkit.recalibrate)")
    if num_batches is not None and (isinstance(num_batches, bool) or
                                    not isinstance(num_batches, int) or num_batches < 0):
        raise ValueError(f"num_batches must be a non-negative int, got {num_batches!r}")
    named = _as_named_layers(layers_or_callable)
    single = isinstance(layers_or_callable, BatchNorm)
    if is_dask(batches):
        batches = [batches]
    if num_batches is not None:
        batches = itertools.islice(batches, num_batches)
    lazy: dict[object, list] = {name: [] for name in named}
    for batch in batches:
        for name, x in _batch_for(named, batch, single).items():
            lazy[name].append(_lazy_moments(named[name], x))
    if progress:
        from dask.diagnostics import ProgressBar
        with ProgressBar():
            (done,) = compute(lazy)
    else:
        (done,) = compute(lazy)
    return _finish(named, done)


def _finish(named, done):
    summary = {}
    for name, layer in named.items():
        parts = done[name]
        count = 0
        if parts:
            n, mean, m2 = _moments.combine([p["n"] for p in parts],
                                           [p["mean"] for p in parts],
                                           [p["m2"] for p in parts], axis=0)
            count = int(n[0]) if n.size else 0
        summary[name] = count
        if count < 2:
            warnings.warn(f"recalibrate: layer {name!r} saw {count} value(s) per channel; "
                          "its running statistics are left as they were", RuntimeWarning,
                          stacklevel=3)
            continue
        with np.errstate(invalid="ignore"):
            layer.load_state_dict({
                "running_mean": mean, "running_var": m2 / (count - 1),
                "num_batches_tracked": np.array(layer.num_batches_tracked + len(parts))},
                strict=False)
    return summary
