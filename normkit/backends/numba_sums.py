"""The Numba backend's row reductions: sums and two-pass moments of a[lo:hi].

float32 / float64 data accumulate in float64 (each value widened on load), as always.

16-bit data (float16 / bfloat16 as int16 / uint16 views) accumulate in float32 over
chunks of at most ``_CHUNK16`` values, each chunk's float32 partial added to a float64
total (issue 13: "float64 merges of float32 partials"). Why: the float64 loop spent its
time widening (vcvtph2ps, then vcvtps2pd per 4 values, both on one port); in float32
the loop is one conversion and one add per 8 values and runs ~2.4x faster (measured in
L1, 1 thread: 0.60 -> 0.25 cycles per value for float16), so half the bytes of float32
data can also take about half the time.

Error bound. A chunk is a multiple of _LANES values, at most ``_CHUNK16`` = 256. LLVM
vectorizes its float32 sum under ``reassoc`` (8 float32 lanes x 4 interleaved with
AVX2/AVX-512: each lane adds 8 values, then a tree of depth 5), but the bound must not
depend on that choice, so it takes the worst tree, a sequential sum of the chunk:
depth h <= 255 of terms rounded at most 3 times (d, d * d): |ds| <= G sum|x - k|,
|dq| <= G sum (x - k)^2, G = gamma_{h+3}(u32) ~ 1.5e-5 (tests/_cases.py,
half_stat_roundoff, which also covers the Cython backend's shorter runs); the < 32
values left at a row's end add in float64.

Moments are one shifted pass, as the Cython backend's (nk_half.h, NK_MOMENTS32):
the shift k is the mean of the range's first <= 16 values rounded to the 16-bit type
(so d = x - k is exact in float32), s = sum d and q = sum d^2 in float32 chunks, then
mean = k + s / n and M2 = q - s^2 / n. The check n (mean - k)^2 <= M2 (2 s^2 <= n q)
bounds the error: the mean is within sqrt(2) G sigma and M2 within (2 + 2 sqrt(2)) G M2
of the exact values. A range failing it (its first values far from its mean: about
6e-5 of normal rows, more on sorted or bordered data) is redone once around
k = round16(mean just computed), then, failing again or on NaN/Inf, in float64.
(Float64 partials merge these; |mean| >> std keeps its digits.) The first sum pass
that this replaced read every value once more: 16-bit LayerNorm rows were slower than
float32 ones.

Range: bfloat16 has float32's exponent range, so a float32 chunk may overflow (values
or squares above ~1.8e19) or underflow (squares below 2**-126). A chunk whose float32
result is not finite, or whose squares sum below 2**-90 (there the subnormal rounding,
<= 2**-150 per operation, could matter: 256 * 2**-150 / 2**-90 = 2**-52 above it), is
recomputed in float64, the code path float32 data takes (the < 32 end values too) --
except a chunk whose squares sum to exactly 0 where that proves every d is 0 (a
constant chunk, common in padded or offset data): always for float16, whose nonzero
differences are >= 2**-24 (squares >= 2**-48), and for bfloat16 when |k| >= 2**-60
(a bfloat16 x != k then differs from k by >= 2**-68, whose square, >= 2**-136, is a
nonzero float32). ``_chunk_ok`` holds that rule.
Data with NaN/Inf gives the same NaN/Inf either way (recomputed: a second pass over
that chunk).
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .numba_convert import _STORAGE_16, _ld, _round_as

_FM = {"reassoc", "contract"}      # lets a sum vectorize; no nnan/ninf
_JIT = {"cache": True, "error_model": "numpy"}
_CHUNK16 = 256                     # values per float32 partial (see the bound above)
_LANES = 32                        # LLVM's float32 sum: 8 lanes x 4 interleaved
_TINY = 2.0 ** -90                 # below: squares summed in float64 (underflow)
_SHIFT_FROM = 16                   # values whose mean gives the moments' shift
_EXACT_ZERO_K = 2.0 ** -60         # bfloat16: q == 0 proves d == 0 from this |k| up


# ============================================================ the sums
# One loop per sum; the accumulator's type is the type of ``zero``: 0.0 sums in float64
# (every value widened exactly), np.float32(0.0) in float32 (the 16-bit chunks below).
@njit(fastmath=_FM, **_JIT)
def _sum(a, lo, hi, zero):
    v = a[lo:hi]
    s = zero
    for i in range(v.shape[0]):
        s += _ld(v, i)
    return s


@njit(fastmath=_FM, **_JIT)
def _dev(a, lo, hi, m, zero):
    """(sum of deviations, sum of squared deviations) from m (of zero's type)."""
    v = a[lo:hi]
    s = zero
    q = zero
    for i in range(v.shape[0]):
        d = _ld(v, i) - m
        s += d
        q += d * d
    return s, q


@njit(fastmath=_FM, **_JIT)
def _sumsq(a, lo, hi, zero):
    v = a[lo:hi]
    q = zero
    for i in range(v.shape[0]):
        e = _ld(v, i) + zero        # widened to zero's type (exact)
        q += e * e
    return q


@njit(fastmath=_FM, **_JIT)
def _h_ssd(a, lo, hi, m):
    """Sum of squared deviations from m (float64): the float32/float64 moments' second
    pass, which needs no sum of deviations (``_dev``'s extra add on the hot path)."""
    v = a[lo:hi]
    q = 0.0
    for i in range(v.shape[0]):
        d = _ld(v, i) - m
        q += d * d
    return q


def _chunk_ok(a, q, k):
    """May a chunk's float32 sums around shift k (sum of squares q) be kept? (Module
    docstring, "Range".)"""
    raise NotImplementedError("only callable from jitted code")


@overload(_chunk_ok, jit_options={"error_model": "numpy"})
def _ov_chunk_ok(a, q, k):
    if a.dtype == types.int16:      # float16: q < 2**-48 only when q == 0 (exact)
        return lambda a, q, k: q < np.inf
    return lambda a, q, k: q < np.inf and (q >= _TINY or (q == 0.0 and abs(k) >= _EXACT_ZERO_K))


@njit(**_JIT)
def _body(lo, hi):
    """End of the float32 part of [lo, hi): a multiple of _LANES values (so LLVM's
    vector loop has no scalar tail inside a chunk); the rest adds in float64."""
    return lo + (hi - lo) // _LANES * _LANES


@njit(**_JIT)
def _dev16(a, lo, hi, m):
    """(sum d, sum d * d), d = a[i] - m over a[lo:hi] (m float32), float64 totals."""
    body = _body(lo, hi)
    s, q = _dev(a, body, hi, np.float64(m), 0.0)
    for b in range(lo, body, _CHUNK16):
        e = min(b + _CHUNK16, body)
        sc, qc = _dev(a, b, e, m, np.float32(0.0))
        if _chunk_ok(a, qc, m):
            s += sc
            q += qc
        else:                       # overflow, underflow or NaN/Inf
            sc64, qc64 = _dev(a, b, e, np.float64(m), 0.0)
            s += sc64
            q += qc64
    return s, q


@njit(**_JIT)
def _sumsq16(a, lo, hi):
    t = 0.0
    body = _body(lo, hi)
    for b in range(lo, body, _CHUNK16):
        e = min(b + _CHUNK16, body)
        q = _sumsq(a, b, e, np.float32(0.0))
        t += q if _chunk_ok(a, q, np.float32(0.0)) else _sumsq(a, b, e, 0.0)
    return t + _sumsq(a, body, hi, 0.0)


# ============================================================ what the kernels call
def row_sumsq(a, lo, hi):
    """Sum of squares of a[lo:hi] in float64 (16-bit: float32 chunks, see above)."""
    raise NotImplementedError("only callable from jitted code")


def row_moments(a, lo, hi):
    """(mean, M2) of a[lo:hi] in float64: two-pass (16-bit: one shifted pass in float32
    chunks, see above)."""
    raise NotImplementedError("only callable from jitted code")


@overload(row_sumsq, jit_options={"error_model": "numpy"})
def _ov_row_sumsq(a, lo, hi):
    if a.dtype in _STORAGE_16:
        return lambda a, lo, hi: _sumsq16(a, lo, hi)
    return lambda a, lo, hi: _sumsq(a, lo, hi, 0.0)


@njit(**_JIT)
def _shift16(a, lo, hi):
    """The mean of a[lo:hi]'s first <= _SHIFT_FROM values, rounded to the 16-bit type:
    x - shift is then exact in float32 for every x within 13 (float16) / 16 (bfloat16)
    binades of it, so only the sums round."""
    e = min(hi, lo + _SHIFT_FROM)
    return _round_as(a, np.float32(_sum(a, lo, e, 0.0) / (e - lo)))


@njit(**_JIT)
def _moments16(a, lo, hi):
    n = hi - lo
    m = _shift16(a, lo, hi)
    for _ in range(2):
        s, q = _dev16(a, lo, hi, m)
        if 2.0 * s * s <= n * q:
            return np.float64(m) + s / n, q - s * (s / n)
        if not np.isfinite(s):      # NaN/Inf: no shift helps
            break
        # the shift is too far from the mean for the float32 bound (n (mean - m)^2 >
        # M2, module docstring): once more around the mean just computed
        m = _round_as(a, np.float32(np.float64(m) + s / n))
    return _moments_wide(a, lo, hi)


@njit(**_JIT)
def _moments_wide(a, lo, hi):
    m = _sum(a, lo, hi, 0.0) / (hi - lo)
    return m, _h_ssd(a, lo, hi, m)


@overload(row_moments, jit_options={"error_model": "numpy"})
def _ov_row_moments(a, lo, hi):
    if a.dtype in _STORAGE_16:
        return lambda a, lo, hi: _moments16(a, lo, hi)
    return lambda a, lo, hi: _moments_wide(a, lo, hi)


def row_mean_var(xr, rms):
    """(mean, variance) of a 1-D row for LayerNorm (``rms``: 0 and the mean square)."""
    raise NotImplementedError("only callable from jitted code")


@njit(**_JIT)
def _mean_var_wide(xr, rms):
    K = xr.shape[0]
    if rms:
        return 0.0, _sumsq(xr, 0, K, 0.0) / K
    # corrected two-pass: the deviations' sum fixes the rounding of the first mean (a
    # long row's sum loses a few ulps), and the variance
    m0 = _sum(xr, 0, K, 0.0) / K
    sd, q = _dev(xr, 0, K, m0, 0.0)
    return m0 + sd / K, (q - sd * (sd / K)) / K


@njit(**_JIT)
def _mean_var16(xr, rms):
    K = xr.shape[0]
    if rms:
        return 0.0, _sumsq16(xr, 0, K) / K
    m, q = _moments16(xr, 0, K)
    return m, q / K


@overload(row_mean_var, jit_options={"error_model": "numpy"})
def _ov_row_mean_var(xr, rms):
    if xr.dtype in _STORAGE_16:
        return lambda xr, rms: _mean_var16(xr, rms)
    return lambda xr, rms: _mean_var_wide(xr, rms)
