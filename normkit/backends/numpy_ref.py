"""The NumPy reference backend: the readable oracle every fast kernel is tested against.

Every reduction accumulates in float64 and every variance is centered (two passes:
the mean first, then the squared deviations from it), so float32 data with a large
mean and a small spread keeps its digits. Speed is not a goal here; clarity is.
See ``normkit/backends/_spec.py`` for the contract of each kernel.

16-bit data (float16, bfloat16) is widened to float64 like float32, everything is
computed in float64, and each output element is rounded *once* to the data dtype
(``store``), so the oracle is the correctly rounded float64 result:

* float64 -> float16: NumPy's cast rounds directly, to nearest even (checked:
  1 + 2**-11 + 2**-40 gives 1 + 2**-10, where a detour through float32 would give 1).
* float64 -> bfloat16: ml_dtypes (0.6) casts *through float32*, rounding twice:
  1 + 2**-8 + 2**-40 becomes 1.0 (float32 drops the 2**-40, leaving a tie that rounds
  to even) instead of 1 + 2**-7. ``narrow`` therefore rounds to float32 *to odd*
  first (a correct rounding when 2 or more bits are kept beyond the target's, which
  holds: 24 against 8, subnormals included, bfloat16 having float32's exponent range),
  then to bfloat16 with ml_dtypes' float32 -> bfloat16 round-to-nearest-even.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

_BF16 = np.dtype(ml_dtypes.bfloat16)

NAME = "numpy"


def set_num_threads(n: int) -> None:
    """NumPy's elementwise code is single-threaded; nothing to configure."""


def info() -> dict:
    return {"numpy": np.__version__, "threads": "1 (reference implementation)"}


def _f64(a):
    return np.asarray(a, dtype=np.float64)


_U32 = np.dtype(np.uint32)
_LOW16, _MIDPOINT = np.uint32(0xFFFF), np.uint32(0x8000)


def narrow(a64, dtype):
    """float64 values as ``dtype``, rounded once to nearest even (see the module
    docstring for bfloat16)."""
    a64 = np.asarray(a64, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):   # overflow to Inf is a result
        if np.dtype(dtype) != _BF16:
            return a64.astype(dtype)
        r = a64.astype(np.float32, order="C")
        bits = r.view(_U32).reshape(-1)
        # Only a float32 value exactly halfway between two bfloat16 values (low 16 bits
        # 0x8000) can round wrongly the second time, and only when it is not x itself.
        # Round to odd there: the odd float32 neighbour on x's side (one step up or
        # down in sign-magnitude bits), which is what round-to-odd gives. Elsewhere
        # round-to-odd and round-to-nearest-even give the same bfloat16. (The
        # constants, and touching only the ties: ~30 us less per call on small arrays.)
        tie = (bits & _LOW16) == _MIDPOINT
        if np.count_nonzero(tie):
            tie = np.flatnonzero(tie)
            x = a64.reshape(-1)[tie]
            err = (x - r.reshape(-1)[tie].astype(np.float64)) * x  # NaN: neither sign
            bits[tie] += (err > 0).astype(_U32) - (err < 0).astype(_U32)
        return r.astype(_BF16)


def store(out, value):
    """out[...] = value (float64), each element rounded once to out's dtype."""
    if out.dtype == _BF16:
        out[...] = narrow(np.broadcast_to(value, out.shape), _BF16)
    else:
        out[...] = value


def _quiet(fn):
    """NaN/Inf in the data are expected to propagate, not to warn."""
    def wrapper(*args):
        with np.errstate(all="ignore"):
            return fn(*args)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# ---------------------------------------------------------------- statistics
@_quiet
def plane_moments(x):
    x64 = _f64(x)
    mean = x64.mean(axis=1)
    m2 = ((x64 - mean[:, None]) ** 2).sum(axis=1)
    return mean, m2


@_quiet
def channels_last_moments(x):
    x64 = _f64(x)
    mean = x64.mean(axis=1)
    m2 = ((x64 - mean[:, None, :]) ** 2).sum(axis=1)
    return mean, m2


# ---------------------------------------------------------------- LayerNorm / RMSNorm
@_quiet
def rows_forward(x, weight, bias, eps, rms, out):
    x64 = _f64(x)
    if rms:
        mean = np.zeros(x64.shape[0])
        var = (x64 * x64).mean(axis=1)
        bias = np.zeros_like(bias)
    else:
        mean = x64.mean(axis=1)
        var = ((x64 - mean[:, None]) ** 2).mean(axis=1)
    rstd = 1.0 / np.sqrt(var + eps)
    store(out, (x64 - mean[:, None]) * rstd[:, None] * _f64(weight) + _f64(bias))
    return mean, rstd


@_quiet
def rows_backward(dy, x, mean, rstd, weight, rms, dx):
    dy64 = _f64(dy)
    xhat = (_f64(x) - mean[:, None]) * rstd[:, None]
    g = dy64 * _f64(weight)
    k = x.shape[1]
    proj = (g * xhat).sum(axis=1, keepdims=True) / k
    centred_g = g if rms else g - g.sum(axis=1, keepdims=True) / k
    store(dx, rstd[:, None] * (centred_g - xhat * proj))
    return (dy64 * xhat).sum(axis=0), dy64.sum(axis=0)


# ---------------------------------------------------------------- per-channel passes
# Channels-first arrays are (N, C, S): parameters (N', C) broadcast as [:, :, None].
# Channels-last arrays are (N, S, C): parameters (N', C) broadcast as [:, None, :].
def _first(p):
    return _f64(p)[:, :, None]


def _last(p):
    return _f64(p)[:, None, :]


@_quiet
def channels_first_affine(x, shift, scale, offset, out):
    store(out, (_f64(x) - _first(shift)) * _first(scale) + _first(offset))


@_quiet
def channels_last_affine(x, shift, scale, offset, out):
    store(out, (_f64(x) - _last(shift)) * _last(scale) + _last(offset))


@_quiet
def channels_first_group_forward(x, groups, weight, bias, eps, out):
    n, c, s = x.shape
    mean, m2 = plane_moments(x.reshape(n * groups, (c // groups) * s))
    rstd = 1.0 / np.sqrt(m2 / ((c // groups) * s) + eps)
    per_channel = lambda a: np.repeat(a.reshape(n, groups), c // groups, axis=1)  # noqa: E731
    store(out, ((_f64(x) - per_channel(mean)[:, :, None]) * per_channel(rstd)[:, :, None]
                * _f64(weight)[None, :, None] + _f64(bias)[None, :, None]))
    return mean.reshape(n, groups), rstd.reshape(n, groups)


@_quiet
def channels_first_batch_forward(x, weight, bias, eps, out):
    n, c, s = x.shape
    mean, m2 = plane_moments(np.moveaxis(x, 1, 0).reshape(c, n * s))
    rstd = 1.0 / np.sqrt(m2 / (n * s) + eps)
    store(out, ((_f64(x) - mean[:, None]) * rstd[:, None] * _f64(weight)[:, None]
                + _f64(bias)[:, None]))
    return mean, m2


def _shared_stat_backward(dy, x, mean, rstd, weight, pool, count, dx):
    """dx of planes whose statistics (mean, rstd: (N', C), per plane) are shared by
    the planes ``pool`` sums over (returning the sums per plane again), and the
    per-plane sums sum(dy), sum(dy * (x - mean))."""
    dy64, xc = _f64(dy), _f64(x) - mean[:, :, None]
    sdy, sdyx = dy64.sum(axis=2), (dy64 * xc).sum(axis=2)
    w = _f64(weight)
    cx = -rstd ** 3 * pool(sdyx * w) / count
    c1 = -rstd * pool(sdy * w) / count
    store(dx, (rstd * w)[:, :, None] * dy64 + cx[:, :, None] * xc + c1[:, :, None])
    return sdy, sdyx


@_quiet
def channels_first_group_backward(dy, x, groups, mean, rstd, weight, dx):
    n, c, s = x.shape
    per = c // groups

    def pool(a):
        return np.repeat(a.reshape(n, groups, per).sum(axis=-1), per, axis=1)
    return _shared_stat_backward(dy, x, np.repeat(mean, per, axis=1),
                                 np.repeat(rstd, per, axis=1), weight, pool, per * s, dx)


@_quiet
def channels_first_batch_backward(dy, x, mean, rstd, weight, dx):
    n, _, s = x.shape
    return _shared_stat_backward(dy, x, mean[None], rstd[None], weight,
                                 lambda a: a.sum(axis=0, keepdims=True), n * s, dx)


def _act(y, residual, relu):
    if residual is not None:
        y = y + _f64(residual)
    if relu:
        y = np.where(y < 0, 0.0, y)     # NaN stays NaN, as torch.relu
    return y


@_quiet
def channels_first_affine_act(x, shift, scale, offset, residual, relu, out):
    store(out, _act((_f64(x) - _first(shift)) * _first(scale) + _first(offset), residual,
                    relu))


@_quiet
def channels_last_affine_act(x, shift, scale, offset, residual, relu, out):
    store(out, _act((_f64(x) - _last(shift)) * _last(scale) + _last(offset), residual,
                    relu))


@_quiet
def channels_first_grad_sums(dy, x, shift):
    dy64 = _f64(dy)
    return dy64.sum(axis=2), (dy64 * (_f64(x) - _first(shift))).sum(axis=2)


@_quiet
def channels_last_grad_sums(dy, x, shift):
    dy64 = _f64(dy)
    return dy64.sum(axis=1), (dy64 * (_f64(x) - _last(shift))).sum(axis=1)


@_quiet
def channels_first_grad_apply(dy, x, shift, coef_dy, coef_x, coef_1, dx):
    store(dx, _first(coef_dy) * _f64(dy) + _first(coef_x) * (_f64(x) - _first(shift))
          + _first(coef_1))


@_quiet
def channels_last_grad_apply(dy, x, shift, coef_dy, coef_x, coef_1, dx):
    store(dx, _last(coef_dy) * _f64(dy) + _last(coef_x) * (_f64(x) - _last(shift))
          + _last(coef_1))
