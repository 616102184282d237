"""Convert BatchNorm hyper-parameters and statistics between frameworks' conventions.

Two things differ between frameworks, and both silently change results when a model
moves from one to another:

**Momentum.** PyTorch (and normkit) weight the *new batch* by ``momentum``::

    running = (1 - momentum) * running + momentum * batch          # torch, normkit

Keras / TensorFlow, ONNX, Flax and MXNet weight the *old running value*::

    running = momentum * running + (1 - momentum) * batch          # keras, onnx, ...

so torch's default 0.1 is Keras's 0.9 (Keras's default 0.99 is torch's 0.01).
PyTorch's ``momentum=None`` (a cumulative average over all batches) has no
counterpart in the others.

**Running variance.** PyTorch averages the *unbiased* batch variance
(``sum((x - mean)**2) / (n - 1)``) into ``running_var``; Keras, TensorFlow, ONNX (in
training mode), Flax and MXNet average the *biased* one (``/ n``). Normalization always
uses the biased batch variance in training mode, everywhere. When every batch has the
same ``n`` values per channel (batch size times spatial size), the two running
variances differ exactly by the factor ``n / (n - 1)``; with varying ``n`` the
conversion is approximate.

The default ``eps`` differs too (torch/ONNX ``1e-5``, Keras ``1e-3``, Flax ``1e-5``);
it is a plain number that needs no conversion, only copying.
"""
from __future__ import annotations

import numbers

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["MOMENTUM_CONVENTIONS", "convert_momentum", "biased_to_unbiased_var",
           "unbiased_to_biased_var", "convert_running_var"]

#: convention name -> (what ``momentum`` weights, whether running_var is unbiased)
MOMENTUM_CONVENTIONS = {
    "torch": ("new", True),
    "normkit": ("new", True),
    "keras": ("old", False),
    "tensorflow": ("old", False),
    "onnx": ("old", False),
    "flax": ("old", False),
    "mxnet": ("old", False),
}


def _convention(name, role):
    key = str(name).lower()
    if key not in MOMENTUM_CONVENTIONS:
        raise ValueError(f"{role}: unknown convention {name!r}; expected one of "
                         f"{sorted(MOMENTUM_CONVENTIONS)}")
    return MOMENTUM_CONVENTIONS[key]


def convert_momentum(momentum: float | None, source: str,
                     target: str = "torch") -> float | None:
    """Translate a BatchNorm momentum from the ``source`` to the ``target`` convention.

    Parameters
    ----------
    momentum : float
        The value in the ``source`` convention, in [0, 1].
    source, target : str
        Convention names: ``"torch"``/``"normkit"`` (momentum weights the new batch) or
        ``"keras"``, ``"tensorflow"``, ``"onnx"``, ``"flax"``, ``"mxnet"`` (momentum
        weights the running value).

    Returns
    -------
    float

    Examples
    --------
    >>> round(convert_momentum(0.99, "keras"), 12)   # Keras default, for normkit/torch
    0.01
    >>> convert_momentum(0.1, "torch", "onnx")
    0.9
    """
    src, _ = _convention(source, "source")
    dst, _ = _convention(target, "target")
    if momentum is None:
        if src == "new" and dst == "new":
            return None
        raise ValueError("momentum=None (torch's cumulative moving average) has no "
                         f"equivalent in the {target!r} convention; pick a number")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return momentum if src == dst else 1.0 - momentum


def _count(n):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
        raise ValueError("n (values per channel in each batch: batch size times spatial "
                         f"size) must be an int >= 2, got {n!r}")
    return int(n)


def biased_to_unbiased_var(var: ArrayLike, n: int) -> np.ndarray | float:
    """``var * n / (n - 1)``: a biased (population) variance as an unbiased one.

    ``n`` is the number of values per channel the variance was computed from (for a
    BatchNorm running variance: batch size times spatial size of the training batches).
    Returns a new float64 array (or float for scalar input).
    """
    n = _count(n)
    out = np.asarray(var, dtype=np.float64) * (n / (n - 1))
    return out if out.ndim else float(out)


def unbiased_to_biased_var(var: ArrayLike, n: int) -> np.ndarray | float:
    """``var * (n - 1) / n``: the inverse of :func:`biased_to_unbiased_var`."""
    n = _count(n)
    out = np.asarray(var, dtype=np.float64) * ((n - 1) / n)
    return out if out.ndim else float(out)


def convert_running_var(var: ArrayLike, n: int, source: str,
                        target: str = "torch") -> np.ndarray | float:
    """Convert a running variance between conventions (biased <-> unbiased average).

    Exact when every batch had ``n`` values per channel; returns ``var`` unchanged
    (as a float64 copy) when both conventions agree.
    """
    _, src_unbiased = _convention(source, "source")
    _, dst_unbiased = _convention(target, "target")
    if src_unbiased == dst_unbiased:
        out = np.array(var, dtype=np.float64)
        return out if out.ndim else float(out)
    if dst_unbiased:
        return biased_to_unbiased_var(var, n)
    return unbiased_to_biased_var(var, n)
