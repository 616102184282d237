"""Numba kernels behind ``normkit.backends.numba_backend`` (the contract is ``_spec.py``).

Layout of this file
-------------------
* ``_h_*`` helpers do the work on one row / plane / chunk. They are plain loops,
  compiled into the drivers that call them. Only the helpers that *reduce* carry
  ``fastmath=_FM`` (reassoc + contract), the minimum that lets LLVM split a sum into
  several vector accumulators. ``nnan``/``ninf`` are never enabled, so NaN and Inf
  keep propagating. Element-wise helpers use no fastmath flag at all, which keeps the
  vectorized and the scalar (aliasing, in-place) loops bit-identical.
* ``_d_*`` drivers loop over work items with ``prange``. An item is a piece of a row or
  plane: the wrapper passes ``nc``, the pieces per row, computed from the shape alone
  (never from the thread count), and piece ``j`` of a row of ``S`` covers
  ``[j*S//nc, (j+1)*S//nc)``. So 1 thread, 2 threads and the serial twin compute the
  same partials and merge them in the same order: bit-identical results.
  Each driver is compiled twice by ``build``: ``parallel=True`` and a serial twin
  (``prange`` is then a plain ``range``), under two qualnames so that their
  ``cache=True`` entries never collide (Numba's cache index is keyed by qualname and
  signature, not by the ``parallel`` flag).
* Reductions never ``+=`` into a shared array inside ``prange``: every item writes its
  own partial (a slot, or a row of a partial buffer), and a second loop merges them.
  Partial moments are merged by ``_h_chan`` (Chan et al.), the one place that formula
  is written in this backend.
* Every function uses ``error_model='numpy'``: a division by zero or the square root of
  a negative number gives Inf/NaN as IEEE says (``eps=0`` on constant data -> NaN, as in
  the other backends), never a Python exception.

Accuracy
--------
Data is read and written only through ``_ld`` / ``_st`` / ``_cv`` (``numba_convert.py``):
float16 / bfloat16 data arrive as int16 / uint16 views, are widened exactly to float32
in registers and narrowed once, RNE, on store; the same drivers are typed once per
storage dtype, so the float32 / float64 loops are unchanged.

Every statistic is accumulated in float64 (float32 values are widened on load); for
16-bit data the row sums and moments (``numba_sums.py``) add float32 partials of at
most 512 values in float64, with their error bound and range fallback written there.
Moments are two-pass *per item* (sum, then squared deviations from the item's own mean,
reread while the item is still in L1/L2), and items of one row are merged with Chan's
formula, so float32 data with |mean| >> std keeps its digits and each value is read
from memory once. Element-wise passes run in the data's dtype (float32 for 16-bit
data) and centre on halves,
``(x/2 - shift/2) * (2 scale)``: the same bits as ``(x - shift) * scale`` (scaling by 2
is exact), but ``x - shift`` cannot overflow for data near the dtype's maximum (3e38
mixed with -3e38 in float32). Computing in float64 instead cost 15-55% on one thread.
"""
from __future__ import annotations

import hashlib
import os
import types as _pytypes

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .numba_convert import _cv, _ld, _st, _wide, _wide_buf
from .numba_sums import row_mean_var, row_moments

# Flags that let a float reduction vectorize, and nothing more (no nnan/ninf/nsz).
_FM = {"reassoc", "contract"}
_JIT = {"cache": True, "error_model": "numpy"}
# The longest piece of a row that one two-pass moment pass covers (``_h_block_moments``):
# 256 KiB in float32 / 512 KiB in float64, so the second pass rereads it from L2.
_BLOCK = 1 << 16
# Channels-first element-wise passes over planes of at most _SMALL_PLANE values take
# runs of _RUN // S whole planes per work item.
_SMALL_PLANE = 512
_RUN = 4096
# Channels-last element-wise passes: rows of C < _TILE values go in runs of _TILE // C
# rows, the per-channel parameters tiled as long (the inner loop's setup and overlap
# checks then run once per run, not per row of 64 values).
_TILE = 1024


def _at(v, i):
    """v[i] for a per-channel vector, v itself for a scalar: one loop serves both
    the channels-first pieces (scalar parameters) and channels-last rows (vectors)."""
    return v[i] if isinstance(v, np.ndarray) else v


@overload(_at, jit_options={"error_model": "numpy"})
def _ov_at(v, i):
    if isinstance(v, types.Array):
        return lambda v, i: v[i]
    return lambda v, i: v


def _row(v, q):
    """Parameter of row q (0 <= q < _rows(v)): for a (1, K) view of per-plane parameters
    v[0, q] (K = C for per-channel, N * C for per-sample parameters), else v."""
    return v[0, q] if isinstance(v, np.ndarray) and v.ndim == 2 else v


@overload(_row, jit_options={"error_model": "numpy"})
def _ov_row(v, q):
    if isinstance(v, types.Array) and v.ndim == 2:
        return lambda v, q: v[0, q]
    return lambda v, q: v


def _rows(v):
    """How many parameter rows ``_row`` takes: K for a (1, K) view, else 1."""
    return v.shape[1] if isinstance(v, np.ndarray) and v.ndim == 2 else 1


@overload(_rows, jit_options={"error_model": "numpy"})
def _ov_rows(v):
    if isinstance(v, types.Array) and v.ndim == 2:
        return lambda v: v.shape[1]
    return lambda v: 1


# ============================================================ helpers: reductions
@njit(fastmath=_FM, **_JIT)
def _h_dot_c(dy, x, lo, hi, sh):
    """(sum dy, sum dy * (x - sh)) over [lo, hi), float64."""
    dv = dy[lo:hi]
    xv = x[lo:hi]
    s1 = 0.0
    s2 = 0.0
    for i in range(xv.shape[0]):
        d = np.float64(_ld(dv, i))
        s1 += d
        s2 += d * (_ld(xv, i) - sh)
    return s1, s2


@njit(fastmath=_FM, **_JIT)
def _h_row_gsums(dy, x, w, mu, rs):
    """LayerNorm backward row sums: sum g, sum g * xhat with g = dy * w."""
    s1 = 0.0
    s2 = 0.0
    for k in range(x.shape[0]):
        g = np.float64(_ld(dy, k)) * w[k]
        s1 += g
        s2 += g * ((_ld(x, k) - mu) * rs)
    return s1, s2


# ============================================================ helpers: moments
@njit(**_JIT)
def _h_chan(na, ma, qa, nb, mb, qb):
    """Chan et al.: merge (count, mean, M2) of two disjoint parts. The one place
    partial moments are merged in this backend."""
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), qa + qb + delta * delta * (na * nb / n)


@njit(**_JIT)
def _h_merge_parts(pm, pq, base, nc, L, mo, qo):
    """Merge, in order, the nc per-column partials pm/pq[base:base + nc] of runs of L
    values cut at j * L // nc into the vectors mo/qo (one value per column)."""
    for c in range(mo.shape[0]):
        na = float(L // nc)
        ma = pm[base, c]
        qa = pq[base, c]
        for j in range(1, nc):
            nb = float((j + 1) * L // nc - j * L // nc)
            na, ma, qa = _h_chan(na, ma, qa, nb, pm[base + j, c], pq[base + j, c])
        mo[c] = ma
        qo[c] = qa


@njit(**_JIT)
def _h_block_moments(a, lo, hi):
    """Mean and M2 of a[lo:hi], float64: two-pass per piece of <= _BLOCK values (each
    piece reread from L1/L2, not memory), pieces merged in order."""
    n = hi - lo
    npc = (n + _BLOCK - 1) // _BLOCK
    na = 0.0
    ma = 0.0
    qa = 0.0
    for j in range(npc):
        b = lo + j * n // npc
        h = lo + (j + 1) * n // npc
        nb = float(h - b)
        mb, qb = row_moments(a, b, h)
        if j == 0:
            na, ma, qa = nb, mb, qb
        else:
            na, ma, qa = _h_chan(na, ma, qa, nb, mb, qb)
    return ma, qa


@njit(**_JIT)
def _h_cl_moments(xn, lo, hi, pm, pq):
    """Two-pass moments of rows [lo, hi) of xn (S, C), per column, into pm/pq (C,)."""
    C = xn.shape[1]
    for c in range(C):
        pm[c] = 0.0
        pq[c] = 0.0
    for s in range(lo, hi):
        row = xn[s]
        for c in range(C):
            pm[c] += _ld(row, c)
    cnt = hi - lo
    for c in range(C):
        pm[c] = pm[c] / cnt
    for s in range(lo, hi):
        row = xn[s]
        for c in range(C):
            d = _ld(row, c) - pm[c]
            pq[c] += d * d


@njit(**_JIT)
def _h_cl_gsums(dyn, xn, lo, hi, sh, p1, p2):
    C = xn.shape[1]
    for c in range(C):
        p1[c] = 0.0
        p2[c] = 0.0
    for s in range(lo, hi):
        drow = dyn[s]
        xrow = xn[s]
        for c in range(C):
            d = np.float64(_ld(drow, c))
            p1[c] += d
            p2[c] += d * (np.float64(_ld(xrow, c)) - sh[c])


# ============================================================ helpers: element-wise
@njit(inline="always", **_JIT)
def _l_act(a, r, o, W, sh, sc, of, q0, res, relu):
    """o = (a - sh) * sc + of [+ r] [then ReLU] in the data's dtype, overflow-safe:
    computed as (a/2 - sh/2) * (2 sc), which is the same bits (scaling by 2 is exact)
    but cannot overflow where a - sh would (3e38 - -3e38 in float32). Exception: a
    subnormal a or sh (|v| < 1.2e-38 in float32) may lose its last bit when halved.

    a/r/o are 1-D runs of rows of width W: one row (W = L) for a channels-first piece
    with scalar ``sh``/``sc``/``of``, or R channels-last rows (W = R C) with per-channel
    vectors tiled R times (``_h_tile``; the last run may be shorter), or a run of
    small channels-first planes (W = S) starting at plane q0 with (1, K) views of the
    per-plane parameters (``_row``). (1-D slices, not 2-D reshapes: a Numba reshape
    costs ~90 ns, which dominated tiny calls.)
    Inlined in Numba IR (``inline='always'``) through
    ``_l_act_flags``, which makes ``res``/``relu`` constants, into ``_h_act``, which
    passes the *same* array object for operands that alias (in place): the flags fold
    away and aliased operands are one pointer, so every variant vectorizes without a
    runtime overlap check (that check fails on exact aliasing and would run the scalar
    loop). ``0 if v < 0 else v`` keeps NaN (as torch.relu).
    """
    h = _cv(a, 0.5)
    two = _cv(a, 2)                 # a literal 2 would promote float32 to float64
    zero = _cv(a, 0)
    # the parameter row steps with the run, wrapping at K: a division per run (there
    # were four) cost as much as a 7x7 plane's values
    K = _rows(sh)
    q = q0 % K
    for lo in range(0, o.shape[0], W):
        av = a[lo:lo + W]
        rv = r[lo:lo + W]
        ov = o[lo:lo + W]
        shq, scq, ofq = _row(sh, q), _row(sc, q), _row(of, q)
        q = q + 1 if q + 1 < K else 0
        for i in range(ov.shape[0]):        # W, or less in a last partial run
            v = (_ld(av, i) * h - _at(shq, i) * h) * (_at(scq, i) * two) + _at(ofq, i)
            if res:
                v = v + _ld(rv, i)
            if relu:
                v = zero if v < zero else v  # noqa: FURB136 - max() would drop NaN
            _st(ov, i, v)


@njit(inline="always", **_JIT)
def _l_act_flags(a, r, o, W, sh, sc, of, q0, res, relu):
    """``_l_act`` with ``res``/``relu`` turned into literals (one folded loop each)."""
    if res and relu:
        _l_act(a, r, o, W, sh, sc, of, q0, True, True)
    elif res:
        _l_act(a, r, o, W, sh, sc, of, q0, True, False)
    elif relu:
        _l_act(a, r, o, W, sh, sc, of, q0, False, True)
    else:
        _l_act(a, r, o, W, sh, sc, of, q0, False, False)


@njit(**_JIT)
def _h_act(a, r, o, W, sh, sc, of, q0, res, relu):
    """``_l_act`` on equal-length 1-D arrays, passing ``o`` itself for an operand that is
    ``o`` (in place). Without a residual, ``r`` is a stand-in that is never read."""
    xo = a.ctypes.data == o.ctypes.data
    ro = res and r.ctypes.data == o.ctypes.data
    if xo and ro:
        _l_act_flags(o, o, o, W, sh, sc, of, q0, res, relu)
    elif xo:
        _l_act_flags(o, r, o, W, sh, sc, of, q0, res, relu)
    elif ro:
        _l_act_flags(a, o, o, W, sh, sc, of, q0, res, relu)
    else:
        _l_act_flags(a, r, o, W, sh, sc, of, q0, res, relu)


@njit(**_JIT)
def _h_gapply(dy, x, o, W, sh, cdy, cx, c1):
    """o = cdy * dy + cx * (x - sh) + c1 on 1-D runs of rows of width W (as ``_l_act``);
    the coefficients are scalars or per-column vectors; x - sh halved as in ``_l_act``
    (cannot overflow)."""
    h = _cv(x, 0.5)
    two = _cv(x, 2)
    for lo in range(0, o.shape[0], W):
        dv = dy[lo:lo + W]
        xv = x[lo:lo + W]
        ov = o[lo:lo + W]
        for i in range(ov.shape[0]):        # W, or less in a last partial run
            _st(ov, i, _at(cdy, i) * _ld(dv, i)
                + (_at(cx, i) * two) * (_ld(xv, i) * h - _at(sh, i) * h) + _at(c1, i))


@njit(**_JIT)
def _h_row_out(xr, w, b, mu, rs, o):
    """o = (x - mu) * rs * w + b in the data's dtype.

    For float32 the float64 mean is split into mh + ml (both float32): (x - mh) - ml
    keeps the centering exact to float32 precision even when |mu| >> std, while every
    operation runs on float32 lanes. The centring is done on halves, times 2 rs (the
    same bits: scaling by 2 is exact) so that x - mh cannot overflow near the float32
    maximum. No fastmath: it could rewrite (x - mh) - ml as x - (mh + ml). For float64
    ml is 0 and this is the plain formula.
    """
    h = _cv(xr, 0.5)
    mh = _cv(xr, mu)
    ml = _cv(xr, mu - mh)
    r2 = _cv(xr, rs) * _cv(xr, 2)
    for k in range(xr.shape[0]):
        _st(o, k, (((_ld(xr, k) * h - mh * h) - ml * h) * r2) * w[k] + b[k])


@njit(**_JIT)
def _h_row_out_rms(xr, w, rs, o):
    r = _cv(xr, rs)
    for k in range(xr.shape[0]):
        _st(o, k, (_ld(xr, k) * r) * w[k])


@njit(**_JIT)
def _h_row_dx(dy, x, w, mu, rs, a, bc, o, pw, pb):
    """dx = rs * (g - a - xhat * bc); pw += dy * xhat; pb += dy."""
    for k in range(x.shape[0]):
        d = np.float64(_ld(dy, k))
        xh = (_ld(x, k) - mu) * rs
        _st(o, k, rs * (d * w[k] - a - xh * bc))
        pw[k] += d * xh
        pb[k] += d


@njit(**_JIT)
def _h_flat(a):
    """Channels-last (N, S, C) data as (N, S * C): a run of rows of one sample is then a
    1-D slice (reshaped once per call, not per item)."""
    return a.reshape((a.shape[0], a.shape[1] * a.shape[2]))


@njit(**_JIT)
def _h_tile(v, R):
    """Per-channel parameters v (C,) repeated R times: one run of R channels-last rows."""
    C = v.shape[0]
    t = np.empty(C * R, v.dtype)
    for r in range(R):
        t[r * C:(r + 1) * C] = v
    return t


@njit(**_JIT)
def _h_item(it, nc, C, per, S):
    """Item ``it`` of ``N * C * nc`` (channels-first; C = 1 for channels-last):
    -> (n, c, parameter row, lo, hi)."""
    pl = it // nc
    j = it - pl * nc
    n = pl // C
    return n, pl - n * C, n if per > 1 else 0, j * S // nc, (j + 1) * S // nc


@njit(**_JIT)
def _h_group_out(xr, o, lo, hi, S, c0, w, b, mu, rs):
    """Normalize values [lo, hi) of one (sample, group) block; value k is in channel
    c0 + k // S. out = (x - sh) * a + (b - (mu - sh) * a) with sh = mu rounded to the
    data's dtype and a = rs * w[c]: (x - sh) is exact near the mean and the part of the
    mean that the rounding lost is folded into the offset in float64 (as the unfused
    path does), so float32 output stays accurate when |mean| >> std."""
    sh = _cv(xr, mu)
    ml = mu - np.float64(sh)
    k = lo
    while k < hi:
        c = k // S
        e = min(hi, (c + 1) * S)
        a = rs * w[c0 + c]
        _h_act(xr[k:e], xr[k:e], o[k:e], e - k, sh, _cv(xr, a),
               _cv(xr, b[c0 + c] - ml * a), 0, False, False)
        k = e


@njit(**_JIT)
def _h_unit_back(dy, x, dx, p0, ps, np_, w, mu, rs, sum_dy, sum_dyxc):
    """The backward of the np_ planes p0, p0 + ps, ... (flat (n, c) indices) sharing one
    statistic (a GroupNorm (sample, group) block, or a BatchNorm channel over N): each
    plane's sums, then its dx while the planes are still in cache -- the numbers of
    grad_sums then grad_apply with normkit._engine.channel_backward's coefficients."""
    C, S = x.shape[1], x.shape[2]
    sh = _cv(x, mu)                 # the parameter-dtype shift: x - sh exact near mu
    resid = mu - np.float64(sh)
    A = 0.0
    B = 0.0
    for k in range(np_):
        p = p0 + k * ps
        n = p // C
        c = p - n * C
        s1, s2 = _h_dot_c(dy[n, c], x[n, c], 0, S, np.float64(sh))
        s2 -= resid * s1            # centred at the exact mean
        sum_dy[n, c] = s1
        sum_dyxc[n, c] = s2
        A += s2 * w[c]
        B += s1 * w[c]
    cx = -rs * rs * rs * A / (np_ * S)
    c1 = -rs * B / (np_ * S) - cx * resid
    for k in range(np_):
        p = p0 + k * ps
        n = p // C
        c = p - n * C
        _h_gapply(dy[n, c], x[n, c], dx[n, c], S, sh, _cv(x, rs * w[c]), _cv(x, cx),
                  _cv(x, c1))


# ============================================================ drivers
def _d_plane_moments(x, nc, mean, m2):
    P, S = x.shape
    if nc == 1:
        # whole rows: one parallel region, no partials to merge (a second region costs
        # a second fork/join, a scheduler quantum when the cores are busy)
        for p in prange(P):
            mean[p], m2[p] = _h_block_moments(x[p], 0, S)
        return
    pm = np.empty((P * nc, 1))
    pq = np.empty((P * nc, 1))
    for it in prange(P * nc):
        p, _, _, lo, hi = _h_item(it, nc, 1, 1, S)
        pm[it, 0], pq[it, 0] = row_moments(x[p], lo, hi)
    for p in prange(P):
        _h_merge_parts(pm, pq, p * nc, nc, S, mean[p:p + 1], m2[p:p + 1])


def _d_channels_last_moments(x, nc, mean, m2):
    N, S, C = x.shape
    pm = np.empty((N * nc, C))
    pq = np.empty((N * nc, C))
    for it in prange(N * nc):
        n, _, _, lo, hi = _h_item(it, nc, 1, 1, S)
        _h_cl_moments(x[n], lo, hi, pm[it], pq[it])
    for n in prange(N):
        _h_merge_parts(pm, pq, n * nc, nc, S, mean[n], m2[n])


def _d_rows_forward(x, weight, bias, eps, rms, out, mean, rstd):
    R, K = x.shape
    for r in prange(R):
        mu, var = row_mean_var(x[r], rms)   # 16-bit: float32 chunks (numba_sums)
        rs = 1.0 / np.sqrt(var + eps)
        mean[r] = mu
        rstd[r] = rs
        if rms:
            _h_row_out_rms(x[r], weight, rs, out[r])
        else:
            _h_row_out(x[r], weight, bias, mu, rs, out[r])


def _d_rows_backward(dy, x, mean, rstd, weight, rms, dx, nblk, dw, db):
    R, K = x.shape
    pw = np.zeros((nblk, K))
    pb = np.zeros((nblk, K))
    for t in prange(nblk):
        bd, bx = _wide_buf(dy, K), _wide_buf(x, K)     # as in _d_rows_forward
        for r in range(t * R // nblk, (t + 1) * R // nblk):
            mu = mean[r]
            rs = rstd[r]
            dyr, xr = _wide(dy[r], bd), _wide(x[r], bx)
            s1, s2 = _h_row_gsums(dyr, xr, weight, mu, rs)
            a = 0.0 if rms else s1 / K
            _h_row_dx(dyr, xr, weight, mu, rs, a, s2 / K, dx[r], pw[t], pb[t])
    for k in range(K):
        dw[k] = pw[0, k]
        db[k] = pb[0, k]
    for t in range(1, nblk):
        for k in range(K):
            dw[k] += pw[t, k]
            db[k] += pb[t, k]


def _d_channels_first_grad_sums(dy, x, shift, nc, sum_dy, sum_dyxc):
    N, C, S = x.shape
    p1 = np.empty(N * C * nc)
    p2 = np.empty(N * C * nc)
    for it in prange(N * C * nc):
        n, c, pn, lo, hi = _h_item(it, nc, C, shift.shape[0], S)
        p1[it], p2[it] = _h_dot_c(dy[n, c], x[n, c], lo, hi, np.float64(shift[pn, c]))
    for pl in prange(N * C):
        n = pl // C
        c = pl - n * C
        sum_dy[n, c] = p1[pl * nc]
        sum_dyxc[n, c] = p2[pl * nc]
        for j in range(1, nc):
            sum_dy[n, c] += p1[pl * nc + j]
            sum_dyxc[n, c] += p2[pl * nc + j]


def _d_channels_last_grad_sums(dy, x, shift, nc, sum_dy, sum_dyxc):
    N, S, C = x.shape
    p1 = np.empty((N * nc, C))
    p2 = np.empty((N * nc, C))
    for it in prange(N * nc):
        n, _, pn, lo, hi = _h_item(it, nc, 1, shift.shape[0], S)
        sh = shift[pn].astype(np.float64)
        _h_cl_gsums(dy[n], x[n], lo, hi, sh, p1[it], p2[it])
    for n in prange(N):
        for c in range(C):
            sum_dy[n, c] = p1[n * nc, c]
            sum_dyxc[n, c] = p2[n * nc, c]
        for j in range(1, nc):
            for c in range(C):
                sum_dy[n, c] += p1[n * nc + j, c]
                sum_dyxc[n, c] += p2[n * nc + j, c]


def _d_channels_first_grad_apply(dy, x, shift, coef_dy, coef_x, coef_1, dx, nc):
    N, C, S = x.shape
    for it in prange(N * C * nc):
        n, c, pn, lo, hi = _h_item(it, nc, C, shift.shape[0], S)
        _h_gapply(dy[n, c][lo:hi], x[n, c][lo:hi], dx[n, c][lo:hi], hi - lo,
                  shift[pn, c], coef_dy[pn, c], coef_x[pn, c],
                  coef_1[pn, c])


def _d_channels_last_grad_apply(dy, x, shift, coef_dy, coef_x, coef_1, dx, nc):
    N, S, C = x.shape
    dyf, xf, dxf = _h_flat(dy), _h_flat(x), _h_flat(dx)
    R = max(1, _TILE // C)
    for it in prange(N * nc):
        n, _, pn, lo, hi = _h_item(it, nc, 1, shift.shape[0], S)
        _h_gapply(dyf[n][lo * C:hi * C], xf[n][lo * C:hi * C], dxf[n][lo * C:hi * C],
                  C * R, _h_tile(shift[pn], R), _h_tile(coef_dy[pn], R),
                  _h_tile(coef_x[pn], R), _h_tile(coef_1[pn], R))


def _d_channels_first_group_forward(x, groups, weight, bias, eps, out, nc, mean, rstd):
    N, C, S = x.shape
    Cg = C // groups
    L = Cg * S
    NG = N * groups
    xb = x.reshape((NG, L))
    ob = out.reshape((NG, L))
    mu_b = mean.reshape(NG)
    rs_b = rstd.reshape(NG)
    if nc == 1:
        # One item per (sample, group) block: statistics, then normalize it while it
        # is still in L1/L2 -- x is read from memory once.
        for p in prange(NG):
            mu, q = _h_block_moments(xb[p], 0, L)
            rs = 1.0 / np.sqrt(q / L + eps)
            mu_b[p] = mu
            rs_b[p] = rs
            _h_group_out(xb[p], ob[p], 0, L, S, (p % groups) * Cg, weight, bias, mu, rs)
    else:
        # Few huge blocks: split each into nc chunks for the statistics (partials merged
        # in order), then normalize the chunks in parallel.
        pm = np.empty((NG * nc, 1))
        pq = np.empty((NG * nc, 1))
        for it in prange(NG * nc):
            p, _, _, lo, hi = _h_item(it, nc, 1, 1, L)
            pm[it, 0], pq[it, 0] = _h_block_moments(xb[p], lo, hi)
        q = np.empty(NG)
        for p in range(NG):
            _h_merge_parts(pm, pq, p * nc, nc, L, mu_b[p:p + 1], q[p:p + 1])
            rs_b[p] = 1.0 / np.sqrt(q[p] / L + eps)
        for it in prange(NG * nc):
            p, _, _, lo, hi = _h_item(it, nc, 1, 1, L)
            _h_group_out(xb[p], ob[p], lo, hi, S, (p % groups) * Cg, weight, bias, mu_b[p],
                         rs_b[p])


def _d_channels_first_batch_forward(x, weight, bias, eps, out, mean, m2):
    N, C, S = x.shape
    # One item per channel: its N planes' moments merged in order, then the same planes
    # normalized while they are still in L2 -- x is read from memory once.
    for c in prange(C):
        mu, q = _h_block_moments(x[0, c], 0, S)
        na = float(S)
        for n in range(1, N):
            mb, qb = _h_block_moments(x[n, c], 0, S)
            na, mu, q = _h_chan(na, mu, q, float(S), mb, qb)
        mean[c] = mu
        m2[c] = q
        rs = 1.0 / np.sqrt(q / (N * S) + eps)
        for n in range(N):
            _h_group_out(x[n, c], out[n, c], 0, S, S, c, weight, bias, mu, rs)


def _d_channels_first_group_backward(dy, x, groups, mean, rstd, weight, dx, sum_dy,
                                     sum_dyxc):
    Cg = x.shape[1] // groups
    for u in prange(x.shape[0] * groups):
        n = u // groups
        g = u - n * groups
        _h_unit_back(dy, x, dx, u * Cg, 1, Cg, weight, mean[n, g], rstd[n, g], sum_dy,
                     sum_dyxc)


def _d_channels_first_batch_backward(dy, x, mean, rstd, weight, dx, sum_dy, sum_dyxc):
    N, C, _ = x.shape
    for c in prange(C):
        _h_unit_back(dy, x, dx, c, C, N, weight, mean[c], rstd[c], sum_dy, sum_dyxc)


def _d_channels_first_affine_act(x, shift, scale, offset, residual, has_res, relu, out, nc):
    N, C, S = x.shape
    if nc == 1 and S <= _SMALL_PLANE:
        # small planes (7x7): runs of B whole planes per item, one loop over them (a
        # call per plane cost ~100 ns, more than its 49 values)
        B = _RUN // S
        xf, rf, of = x.reshape(N * C * S), residual.reshape(N * C * S), out.reshape(N * C * S)
        K = shift.size
        sh, sc, ov = shift.reshape((1, K)), scale.reshape((1, K)), offset.reshape((1, K))
        for it in prange((N * C + B - 1) // B):
            lo, hi = it * B * S, min(N * C, (it + 1) * B) * S
            _h_act(xf[lo:hi], rf[lo:hi], of[lo:hi], S, sh, sc, ov, it * B, has_res, relu)
        return
    for it in prange(N * C * nc):
        n, c, pn, lo, hi = _h_item(it, nc, C, shift.shape[0], S)
        _h_act(x[n, c][lo:hi], residual[n, c][lo:hi], out[n, c][lo:hi], hi - lo,
               shift[pn, c], scale[pn, c], offset[pn, c], 0, has_res, relu)


def _d_channels_last_affine_act(x, shift, scale, offset, residual, has_res, relu, out, nc):
    N, S, C = x.shape
    xf, rf, of = _h_flat(x), _h_flat(residual), _h_flat(out)
    R = max(1, _TILE // C)
    for it in prange(N * nc):
        n, _, pn, lo, hi = _h_item(it, nc, 1, shift.shape[0], S)
        _h_act(xf[n][lo * C:hi * C], rf[n][lo * C:hi * C], of[n][lo * C:hi * C], C * R,
               _h_tile(shift[pn], R), _h_tile(scale[pn], R), _h_tile(offset[pn], R), 0,
               has_res, relu)


# ============================================================ signatures
def _A(dt, nd, ro=False):
    return types.Array(dt, nd, "C", readonly=ro)


def _signature(driver, D, P, ro=True):
    """The one signature of ``driver`` for storage type D (float32/float64, or the int16 /
    uint16 view of float16 / bfloat16 data) and parameter type P (numba types); ``ro``:
    the data inputs (x, dy, residual) typed read-only (accepts writable arrays too)."""
    f8, i8, b1 = types.float64, types.int64, types.boolean
    x2, x3 = _A(D, 2, ro), _A(D, 3, ro)
    p1, p2 = _A(P, 1, True), _A(P, 2, True)
    o2, o3 = _A(D, 2), _A(D, 3)
    s1, s2 = _A(f8, 1), _A(f8, 2)
    r1, r2 = _A(f8, 1, True), _A(f8, 2, True)
    return {
        "plane_moments": (x2, i8, s1, s1),
        "channels_last_moments": (x3, i8, s2, s2),
        "rows_forward": (x2, p1, p1, f8, b1, o2, s1, s1),
        "rows_backward": (x2, x2, r1, r1, p1, b1, o2, i8, s1, s1),
        "channels_first_grad_sums": (x3, x3, p2, i8, s2, s2),
        "channels_last_grad_sums": (x3, x3, p2, i8, s2, s2),
        "channels_first_grad_apply": (x3, x3, p2, p2, p2, p2, o3, i8),
        "channels_last_grad_apply": (x3, x3, p2, p2, p2, p2, o3, i8),
        "channels_first_group_forward": (x3, i8, p1, p1, f8, o3, i8, s2, s2),
        "channels_first_batch_forward": (x3, p1, p1, f8, o3, s1, s1),
        "channels_first_group_backward": (x3, x3, i8, r2, r2, p1, o3, s2, s2),
        "channels_first_batch_backward": (x3, x3, r1, r1, p1, o3, s2, s2),
        "channels_first_affine_act": (x3, p2, p2, p2, x3, b1, b1, o3, i8),
        "channels_last_affine_act": (x3, p2, p2, p2, x3, b1, b1, o3, i8),
    }[driver]


# Driver name -> function. The plain affine kernels of the contract run the
# ``*_affine_act`` drivers with no residual and no ReLU (see numba_backend).
DRIVERS = {name[3:]: fn for name, fn in list(globals().items()) if name.startswith("_d_")}

# Storage dtype the kernels see -> (numba storage type, numba parameter type). float16
# and bfloat16 data arrive as their int16 / uint16 views (numba_backend._views).
STORAGE = {
    np.dtype(np.float32): (types.float32, types.float32),
    np.dtype(np.float64): (types.float64, types.float64),
    np.dtype(np.int16): (types.int16, types.float32),      # float16 bits
    np.dtype(np.uint16): (types.uint16, types.float32),    # bfloat16 bits
}


def arg_names(driver):
    """The driver's argument names (the contract's names), for error messages."""
    fn = DRIVERS[driver]
    return fn.__code__.co_varnames[:fn.__code__.co_argcount]


def data_positions(driver):
    """Positions of the arguments in the storage dtype (x, dy, out, dx, residual)."""
    sig = _signature(driver, types.int16, types.float32)
    return tuple(i for i, t in enumerate(sig)
                 if isinstance(t, types.Array) and t.dtype == types.int16)


def storage_name(t):
    """The user's name of a kernel array's element type (int16 views are float16)."""
    return {types.int16: "float16", types.uint16: "bfloat16"}.get(t, str(t))


def _convert_stamp():
    """A short hash of numba_convert.py and numba_sums.py, part of every cached kernel's
    name.

    Numba invalidates a cache entry only when the file defining the function changes;
    the conversions and reductions live in other files and are compiled into every
    kernel, so their source hash goes into the qualname: editing them recompiles."""
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha1()
    for name in ("numba_convert.py", "numba_sums.py"):
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:8]


_STAMP: list = []


def build(driver: str, dtype, parallel: bool, readonly: bool = True):
    """Compile (or load from the on-disk cache) one driver for one storage dtype.

    The driver's function object is copied under a qualname ending in ``_par`` or
    ``_ser`` (and the conversions' stamp) so the variants get separate cache files. One
    signature per dispatcher: the first call of a kernel loads only what it uses.
    ``readonly=False`` types the data inputs writable: measured 1.8x faster for float16
    (the F16C loads vectorize worse from arrays typed read-only), no change otherwise.
    """
    if not _STAMP:
        _STAMP.append(_convert_stamp())
    fn = DRIVERS[driver]
    suffix = ("_par" if parallel else "_ser") + ("" if readonly else "_rw") + "_" + _STAMP[0]
    copy = _pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix,
                                 fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    copy.__module__ = fn.__module__
    copy.__doc__ = fn.__doc__
    sig = types.void(*_signature(driver, *STORAGE[np.dtype(dtype)], readonly))
    return njit(sig, parallel=parallel, nogil=True, **_JIT)(copy)
