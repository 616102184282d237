"""Fold an eval-mode BatchNorm into the linear or convolution layer before it.

In eval mode BatchNorm is a per-channel affine map, ``y = x * s + (beta - mean * s)``
with ``s = gamma / sqrt(running_var + eps)``, so a preceding layer ``x = W @ u + b``
absorbs it: ``W' = W * s`` (scaled along the output-channel axis of ``W``) and
``b' = (b - mean) * s + beta``. The folded network computes the same function with one
pass fewer over the activations.

Which axis of ``W`` holds the output channels:

=====================================  ==================  ==========
layer                                  weight shape        ``axis``
=====================================  ==================  ==========
Linear / Gemm (torch, ONNX ``transB``)  (out, in)           0
Conv1d/2d/3d (torch, ONNX), any groups  (out, in/g, k...)   0
ConvTranspose (torch, ONNX)             (in, out/g, k...)   1, with ``groups=g``
Keras Dense / channels-last Conv        (..., in, out)      -1
=====================================  ==================  ==========

Everything is computed in float64 and returned in the weight's dtype (float16 and
``ml_dtypes.bfloat16`` weights included: one rounding at the end).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from . import _validate as V
from .backends.numpy_ref import narrow

__all__ = ["fold_batch_norm", "fold_batch_norm_stats"]


def _array(a: Any, name: str) -> Any:
    """NumPy view of an array-like or a torch tensor (detached, on the CPU)."""
    if a is None:
        return None
    if hasattr(a, "detach"):                      # torch tensor, without importing torch
        # bfloat16 kept bit for bit (NumPy has no bfloat16 of its own)
        from .layers import _torch_to_numpy
        a = _torch_to_numpy(a)
    V.reject_masked(a, name)
    a = np.asarray(a)
    if a.dtype == V.BF16:                         # ml_dtypes: widened to float64 below
        return a
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    return a


def _bn_statistics(bn):
    """(running_mean, running_var, gamma, beta, eps) of an eval-mode BatchNorm.

    Accepts a ``normkit.BatchNorm`` or anything shaped like one (a torch
    ``BatchNorm1d/2d/3d``: ``training``, ``running_mean``, ``running_var``, ``eps``,
    ``weight``, ``bias``).
    """
    from .layers import InstanceNorm
    if isinstance(bn, InstanceNorm) or "InstanceNorm" in type(bn).__name__:
        raise TypeError("fold_batch_norm folds a BatchNorm; an InstanceNorm normalizes "
                        "each sample with its own statistics and cannot be folded")
    missing = [a for a in ("training", "running_mean", "running_var", "eps")
               if not hasattr(bn, a)]
    if missing:
        raise TypeError(f"fold_batch_norm: expected a BatchNorm layer, got "
                        f"{type(bn).__name__} (it has no {', '.join(missing)})")
    what = getattr(bn, "name", None) or type(bn).__name__
    if bn.training:
        raise ValueError(f"cannot fold {what}: it is in training mode, where it "
                         "normalizes with batch statistics; call .eval() first")
    if (getattr(bn, "track_running_stats", True) is False or bn.running_mean is None
            or bn.running_var is None):
        raise ValueError(f"cannot fold {what}: it has no running statistics "
                         "(track_running_stats=False), so even in eval mode it "
                         "normalizes with batch statistics")
    return (_array(bn.running_mean, "running_mean"), _array(bn.running_var, "running_var"),
            _array(getattr(bn, "weight", None), "bn weight"),
            _array(getattr(bn, "bias", None), "bn bias"), float(bn.eps))


def fold_batch_norm(weight: ArrayLike, bias: ArrayLike | None, bn: Any, *, axis: int = 0,
                    groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fold an eval-mode BatchNorm into the preceding layer's weight and bias.

    Parameters
    ----------
    weight : array_like or torch.Tensor
        Weight of the linear/convolution layer that feeds the BatchNorm.
    bias : array_like, torch.Tensor or None
        Its bias (``None``: no bias, treated as zeros).
    bn : normkit.BatchNorm or torch.nn.BatchNorm1d/2d/3d
        In eval mode and with running statistics; otherwise ``ValueError``.
    axis : int, keyword-only
        Axis of ``weight`` holding the layer's output channels (see the module
        docstring): 0 for Linear/Conv, 1 for ConvTranspose, -1 for channels-last
        kernels.
    groups : int, keyword-only
        Groups of a transposed convolution (``axis=1``), whose weight holds only
        ``out / groups`` output channels per group. Ignored for ``axis=0``.

    Returns
    -------
    (new_weight, new_bias) : tuple of ndarray
        In the weight's dtype (float64 for integer weights; float16 and bfloat16 stay
        16-bit); ``new_bias`` has shape (C,).

    Examples
    --------
    >>> import numpy as np, normkit
    >>> bn = normkit.BatchNorm(4).eval()
    >>> bn.running_var[:] = 4.0
    >>> w, b = normkit.fold_batch_norm(np.ones((4, 3)), None, bn)
    >>> w[0], b
    (array([0.49999938, 0.49999938, 0.49999938]), array([0., 0., 0., 0.]))
    """
    mean, var, gamma, beta, eps = _bn_statistics(bn)
    return fold_batch_norm_stats(weight, bias, mean, var, gamma, beta, eps, axis=axis,
                                 groups=groups)


def _fold_args(weight, bias, running_mean, running_var, gamma, beta, eps, axis, groups):
    """fold_batch_norm_stats' arguments checked: arrays (or None), eps, axis, groups."""
    if weight is None:
        raise TypeError("weight: expected the weight array of the layer before the "
                        "BatchNorm, got None")
    w = _array(weight, "weight")
    b = _array(bias, "bias")
    mean = _array(running_mean, "running_mean")
    var = _array(running_var, "running_var")
    gamma = _array(gamma, "gamma")
    beta = _array(beta, "beta")
    if mean.ndim != 1:
        raise ValueError(f"running_mean: expected shape (C,), got shape {mean.shape}")
    c = mean.shape[0]
    a: Any                   # the checked arrays (ndarray or None)
    for name, a in (("running_var", var), ("gamma", gamma), ("beta", beta), ("bias", b)):
        if a is not None and a.shape != (c,):
            raise ValueError(f"{name}: expected shape ({c},), got shape {a.shape}")
    eps = V.real_arg(eps, "eps", "fold_batch_norm")
    if not eps >= 0:         # as eval-mode batch_norm (torch: eps must be non-negative)
        raise ValueError(f"fold_batch_norm: eps: expected a number >= 0, got {eps!r}")
    if w.ndim < 1:
        raise ValueError("weight must have at least one dimension, got a scalar")
    axis = V.int_arg(axis, "axis", "fold_batch_norm")
    if not -w.ndim <= axis < w.ndim:
        raise ValueError(f"axis {axis} is out of range for weight of shape {w.shape}")
    axis %= w.ndim
    groups = V.int_arg(groups, "groups", "fold_batch_norm", minimum=1)

    return w, b, mean, var, gamma, beta, eps, axis, groups


def fold_batch_norm_stats(weight: ArrayLike, bias: ArrayLike | None,
                          running_mean: ArrayLike, running_var: ArrayLike,
                          gamma: ArrayLike | None = None, beta: ArrayLike | None = None,
                          eps: float = 1e-5, *, axis: int = 0,
                          groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fold_batch_norm` from raw statistics instead of a layer.

    Parameters
    ----------
    weight, bias
        As in :func:`fold_batch_norm`.
    running_mean, running_var : array_like of shape (C,)
        The statistics eval-mode BatchNorm normalizes with.
    gamma, beta : array_like of shape (C,), optional
        BatchNorm's affine weight and bias (identity when omitted).
    eps : float
        BatchNorm's eps, added to the variance inside the square root.
    axis, groups : keyword-only
        As in :func:`fold_batch_norm`.

    Returns
    -------
    (new_weight, new_bias) : tuple of ndarray
    """
    w, b, mean, var, gamma, beta, eps, axis, groups = _fold_args(
        weight, bias, running_mean, running_var, gamma, beta, eps, axis, groups)
    out_dtype = w.dtype if w.dtype.kind == "f" or w.dtype == V.BF16 else np.dtype(np.float64)
    # float64 throughout (16-bit values widen exactly), one rounding to out_dtype
    w, b, mean, var, gamma, beta = (None if a is None else np.asarray(a, np.float64)
                                    for a in (w, b, mean, var, gamma, beta))
    assert w is not None and mean is not None and var is not None    # checked above
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = 1.0 / np.sqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    shift = -mean * scale if beta is None else beta - mean * scale
    new_b = shift if b is None else b * scale + shift

    w_scale = _weight_scale(scale, w.shape, axis, groups)
    # narrow: float64 -> dtype rounded once (ml_dtypes' bfloat16 cast rounds twice,
    # through float32)
    return narrow(w * w_scale, out_dtype), narrow(new_b, out_dtype)


def _weight_scale(scale, wshape, axis, groups):
    """``scale`` (C,) shaped to broadcast against a weight of ``wshape``."""
    c = scale.shape[0]
    bshape = [1] * len(wshape)
    if groups == 1 or axis == 0:
        if wshape[axis] != c:
            raise ValueError(f"weight axis {axis} has {wshape[axis]} output channels but "
                             f"the BatchNorm has {c} (weight shape {wshape}); pass the "
                             "axis holding the output channels (1 for transposed "
                             "convolutions)")
        bshape[axis] = c
        return scale.reshape(bshape)
    # grouped transposed convolution: weight (in, out/groups, ...), in = groups * in/g;
    # the output channel of weight[i, j] is (i // (in / groups)) * (out / groups) + j
    if axis != 1:
        raise ValueError("groups > 1 is for transposed convolutions, whose weight has "
                         f"the output channels on axis 1; got axis={axis}")
    cin, per = wshape[0], wshape[1]
    if cin % groups or per * groups != c:
        raise ValueError(f"a transposed convolution weight of shape {wshape} with "
                         f"groups={groups} has {per * groups} output channels, expected "
                         f"{c} (the BatchNorm's) and {cin} divisible by {groups}")
    group_of_row = np.arange(cin) // (cin // groups)
    channel = group_of_row[:, None] * per + np.arange(per)[None, :]
    return scale[channel].reshape(cin, per, *([1] * (len(wshape) - 2)))
