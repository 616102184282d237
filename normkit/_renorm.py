"""Batch renormalization (Ioffe 2017), the training-mode path of ``BatchNorm(renorm=True)``.

With batch statistics ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` (``var_B`` biased) and
moving renorm statistics ``mu``, ``sigma``::

    r = clip(sigma_B / sigma, rmin, rmax)          rmin defaults to 1 / rmax
    d = clip((mu_B - mu) / sigma, -dmax, dmax)
    y = ((x - mu_B) / sigma_B * r + d) * gamma + beta

``r`` and ``d`` are constants for the backward pass, so it is BatchNorm's backward with
the weight ``gamma * r``, and ``d(loss)/d(gamma) = sum(dy * (x_hat * r + d))``.

Where this matches Keras 3 (``BatchNormalization(renorm=True)``):

* ``r``/``d`` as above, with ``sigma = max(renorm_std, sqrt(eps))`` to avoid dividing by
  zero early on; computed from the renorm statistics *before* this batch updates them;
* separate renorm statistics (``renorm_mean``, ``renorm_std``: moving averages of
  ``mu_B`` and ``sigma_B``, initialised to 0 and 1) with their own momentum, next to
  the inference statistics; eval mode is plain BatchNorm with the inference statistics;
* ``renorm_clipping`` is a dict with the keys ``rmax``, ``rmin``, ``dmax``; a missing
  ``rmax``/``dmax`` means no clipping on that side.

Where it differs, on purpose:

* momenta use normkit's (torch's) convention, the weight of the *new* value:
  Keras ``renorm_momentum=0.99`` is ``renorm_momentum=0.01`` here (the default);
* a missing ``rmin`` is ``1 / rmax`` (the paper's ``[1/rmax, rmax]``), where Keras uses 0;
  pass ``rmin=0`` for Keras's behaviour;
* the inference statistics follow BatchNorm's usual rule (``running_var`` averages the
  unbiased batch variance, ``momentum=None`` is a cumulative average), where Keras
  averages ``sigma_B`` and derives ``moving_variance = sigma**2 - eps``; the two agree
  to first order.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _engine as E
from . import _validate as V
from ._canonical import batch_view
from .backends import resolve
from .functional import batch_norm_backward

_KEYS = ("rmax", "rmin", "dmax")


class RenormCache:
    """What the renorm backward needs: input, batch statistics and the constants r, d."""

    __slots__ = ("d", "mean", "r", "rstd", "x")

    def __init__(self, x, mean, rstd, r, d):
        self.x, self.mean, self.rstd, self.r, self.d = x, mean, rstd, r, d


def check_clipping(clipping):
    """A normalised copy of ``renorm_clipping``: {'rmin', 'rmax', 'dmax'} floats."""
    clipping = dict(clipping or {})
    unknown = set(clipping) - set(_KEYS)
    if unknown:
        raise ValueError(f"renorm_clipping: unknown keys {sorted(unknown)}; expected a "
                         f"subset of {list(_KEYS)}")
    for key, value in clipping.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise ValueError(f"renorm_clipping[{key!r}] must be a number, got {value!r}")
    rmax = float(clipping.get("rmax", math.inf))
    rmin = float(clipping.get("rmin", 1.0 / rmax if rmax > 0 else 0.0))
    dmax = float(clipping.get("dmax", math.inf))
    if rmax <= 0 or rmin < 0 or rmin > rmax:
        raise ValueError(f"renorm_clipping: need 0 <= rmin <= rmax and rmax > 0, got "
                         f"rmin={rmin}, rmax={rmax}")
    if dmax < 0:
        raise ValueError(f"renorm_clipping: dmax must be >= 0, got {dmax}")
    return {"rmax": rmax, "rmin": rmin, "dmax": dmax}


def check_momentum(momentum):
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
            or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"renorm_momentum must be a float in [0, 1] (the weight of the "
                         f"new batch, as momentum), got {momentum!r}")
    return float(momentum)


def forward(layer, x, momentum):
    """Training-mode forward of ``layer`` (a BatchNorm with renorm); updates its state."""
    x = V.as_input(x, min_ndim=2)
    ax = V.channel_axis(x, layer.axis, "batch_norm")
    c = x.shape[ax]
    shape = (c,)
    running_mean = V.running_stat(layer.running_mean, shape, "running_mean")
    running_var = V.running_stat(layer.running_var, shape, "running_var")
    renorm_mean = V.running_stat(layer.renorm_mean, shape, "renorm_mean")
    renorm_std = V.running_stat(layer.renorm_std, shape, "renorm_std")
    w = V.as_param(layer.weight, shape, "weight")
    b = V.as_param(layer.bias, shape, "bias")
    count = math.prod(d for i, d in enumerate(x.shape) if i != ax)
    if count == 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {x.shape}")
    E.check_training_eps(layer.eps)
    dt = V.param_dtype(x.dtype)
    if x.size == 0:        # as BatchNorm: an empty output, the statistics untouched
        nan = np.full(c, np.nan)
        return np.empty(x.shape, x.dtype), RenormCache(x, nan, nan, np.ones(c), np.zeros(c))
    be = resolve(layer._backend)
    view = batch_view(x, ax, V.storage_dtype(x.dtype))
    mean, m2 = E.batch_moments(be, view)

    eps = layer.eps
    clip = layer.renorm_clipping
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        sigma_b = np.sqrt(m2 / count + eps)
        sigma = np.maximum(renorm_std.astype(np.float64), math.sqrt(eps))
        r = np.clip(sigma_b / sigma, clip["rmin"], clip["rmax"])
        d = np.clip((mean - renorm_mean.astype(np.float64)) / sigma, -clip["dmax"],
                    clip["dmax"])
        rstd = 1.0 / sigma_b
        scale = rstd * r if w is None else rstd * r * w
        offset = d if w is None else d * w
        if b is not None:
            offset = offset + b
        res = view.empty(None)
        view.call(be, "affine", view.data, *E.coefs(dt, 1, mean, scale, offset), res)

        # statistics move after r and d are taken (the paper, Keras)
        E.update_running_stats(running_mean, running_var, mean, m2 / (count - 1), momentum)
        E.update_running_stats(renorm_mean, renorm_std, mean, sigma_b, layer.renorm_momentum)
    y = view.to_user(res, None, x.dtype)
    return y, RenormCache(x, mean, rstd, r, d)


def backward(layer, grad_out, cache):
    """``(grad_x, {'weight': ..., 'bias': ...})`` of a renorm forward, r and d constant."""
    w = layer.weight
    w_eff = cache.r if w is None else cache.r * w.astype(np.float64)
    gx, g_xhat, g_bias = batch_norm_backward(grad_out, cache.x, cache.mean, cache.rstd,
                                             w_eff, training=True, axis=layer.axis,
                                             backend=layer._backend)
    # g_xhat = sum(dy * x_hat); y = (x_hat * r + d) * gamma + beta
    return gx, {"weight": cache.r * g_xhat + cache.d * g_bias, "bias": g_bias}
