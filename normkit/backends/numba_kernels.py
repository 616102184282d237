"""Numba kernels behind ``normkit.backends.numba_backend`` (the contract is ``_spec.py``).

Layout of this file
-------------------
* ``_h_*`` helpers do the work on one row / plane / chunk. They are plain loops,
  compiled into the drivers that call them. Only the helpers that *reduce* carry
  ``fastmath=_FM`` (reassoc + contract), the minimum that lets LLVM split a sum into
  several vector accumulators. ``nnan``/``ninf`` are never enabled, so NaN and Inf
  keep propagating. Element-wise helpers use no fastmath flag at all, which keeps the
  vectorized and the scalar (aliasing, in-place) loops bit-identical.
* ``_d_*`` drivers split the work into items (rows, planes, or chunks of them) and
  loop over the items with ``prange``. Each driver is compiled twice by ``build``:
  ``parallel=True`` and a serial twin (``prange`` is then a plain ``range``), under two
  qualnames so that their ``cache=True`` entries never collide (Numba's cache index is
  keyed by qualname and signature, not by the ``parallel`` flag).
* Fused kernels: ``channels_first_group_forward`` takes one (sample, group) block per
  item (statistics, then the normalized output while the block is in L1/L2: x is read
  from memory once), or splits a few huge blocks into chunks; ``*_affine_act`` add an
  optional residual and ReLU to the affine, each combination (and each aliasing of
  x / residual / out) a separate constant-folded loop, so the plain case costs nothing.
* Reductions never ``+=`` into a shared array inside ``prange``: every item writes its
  own partial (a slot, or a row of a partial buffer), and a second loop merges them.

Accuracy
--------
Every statistic is accumulated in float64 (float32 values are widened on load).
Moments are two-pass *per item* (sum, then squared deviations from the item's own mean,
reread while the item is still in L1/L2), and items of one row are merged with Chan's
formula, so float32 data with |mean| >> std keeps its digits and each value is read
from memory once. Backward passes use centered x, ``(x - mean)``.
"""
from __future__ import annotations

import types as _pytypes

import numpy as np
from numba import njit, prange, types

# Flags that let a float reduction vectorize, and nothing more (no nnan/ninf/nsz).
_FM = {"reassoc", "contract"}
# The longest piece of a row that one two-pass moment pass covers (``_h_block_moments``):
# 256 KiB in float32 / 512 KiB in float64, so the second pass rereads it from L2.
_BLOCK = 1 << 16


# ============================================================ helpers: reductions
@njit(fastmath=_FM, cache=True)
def _h_sum(a, lo, hi):
    v = a[lo:hi]
    s = 0.0
    for i in range(v.shape[0]):
        s += v[i]
    return s


@njit(fastmath=_FM, cache=True)
def _h_ssd(a, lo, hi, m):
    """Sum of squared deviations from m (float64)."""
    v = a[lo:hi]
    q = 0.0
    for i in range(v.shape[0]):
        d = v[i] - m
        q += d * d
    return q


@njit(fastmath=_FM, cache=True)
def _h_sumsq(a, lo, hi):
    v = a[lo:hi]
    q = 0.0
    for i in range(v.shape[0]):
        e = np.float64(v[i])
        q += e * e
    return q


@njit(fastmath=_FM, cache=True)
def _h_dot_c(dy, x, lo, hi, sh):
    """(sum dy, sum dy * (x - sh)) over [lo, hi), float64."""
    dv = dy[lo:hi]
    xv = x[lo:hi]
    s1 = 0.0
    s2 = 0.0
    for i in range(xv.shape[0]):
        d = np.float64(dv[i])
        s1 += d
        s2 += d * (xv[i] - sh)
    return s1, s2


@njit(fastmath=_FM, cache=True)
def _h_row_gsums(dy, x, w, mu, rs):
    """LayerNorm backward row sums: sum g, sum g * xhat with g = dy * w."""
    s1 = 0.0
    s2 = 0.0
    for k in range(x.shape[0]):
        g = np.float64(dy[k]) * w[k]
        s1 += g
        s2 += g * ((x[k] - mu) * rs)
    return s1, s2


# ============================================================ helpers: channels-last chunks
@njit(cache=True)
def _h_cl_moments(xn, lo, hi, pm, pq):
    """Two-pass moments of rows [lo, hi) of xn (S, C), per column, into pm/pq (C,)."""
    C = xn.shape[1]
    for c in range(C):
        pm[c] = 0.0
        pq[c] = 0.0
    for s in range(lo, hi):
        row = xn[s]
        for c in range(C):
            pm[c] += row[c]
    cnt = hi - lo
    for c in range(C):
        pm[c] = pm[c] / cnt
    for s in range(lo, hi):
        row = xn[s]
        for c in range(C):
            d = row[c] - pm[c]
            pq[c] += d * d


@njit(cache=True)
def _h_cl_gsums(dyn, xn, lo, hi, sh, p1, p2):
    C = xn.shape[1]
    for c in range(C):
        p1[c] = 0.0
        p2[c] = 0.0
    for s in range(lo, hi):
        drow = dyn[s]
        xrow = xn[s]
        for c in range(C):
            d = np.float64(drow[c])
            p1[c] += d
            p2[c] += d * (np.float64(xrow[c]) - sh[c])


# ============================================================ helpers: element-wise
@njit(cache=True)
def _h_affine(a, o, lo, hi, sh, sc, of):
    av = a[lo:hi]
    ov = o[lo:hi]
    if av.ctypes.data == ov.ctypes.data:
        # In place. Reading and writing through one array lets LLVM vectorize; with two
        # arrays its runtime overlap check fails and it runs the scalar loop (same
        # values, no fastmath here, but ~1.5x slower).
        for i in range(ov.shape[0]):
            ov[i] = (ov[i] - sh) * sc + of
    else:
        for i in range(av.shape[0]):
            ov[i] = (av[i] - sh) * sc + of


@njit(cache=True)
def _l_act(a, r, o, sh, sc, of, res, relu):
    """o = (a - sh) * sc + of [+ r] [then ReLU] over whole (equal-length) vectors.

    Called from ``_h_affine_act`` with literal ``res``/``relu`` and with the *same*
    array object for operands that alias (in place): once LLVM inlines it the flags
    fold away and aliased operands are one pointer, so every variant vectorizes
    without a runtime overlap check (that check fails on exact aliasing and would run
    the scalar loop). ``z if v < z else v`` keeps NaN (as torch.relu).
    """
    z = o.dtype.type(0)
    for i in range(o.shape[0]):
        v = (a[i] - sh) * sc + of
        if res:
            v = v + r[i]
        if relu:
            v = z if v < z else v
        o[i] = v


@njit(cache=True)
def _h_affine_act(a, r, o, lo, hi, sh, sc, of, res, relu):
    av = a[lo:hi]
    ov = o[lo:hi]
    xo = av.ctypes.data == ov.ctypes.data
    if res:
        rv = r[lo:hi]
        ro = rv.ctypes.data == ov.ctypes.data
        if relu:
            if xo and ro:
                _l_act(ov, ov, ov, sh, sc, of, True, True)
            elif xo:
                _l_act(ov, rv, ov, sh, sc, of, True, True)
            elif ro:
                _l_act(av, ov, ov, sh, sc, of, True, True)
            else:
                _l_act(av, rv, ov, sh, sc, of, True, True)
        else:
            if xo and ro:
                _l_act(ov, ov, ov, sh, sc, of, True, False)
            elif xo:
                _l_act(ov, rv, ov, sh, sc, of, True, False)
            elif ro:
                _l_act(av, ov, ov, sh, sc, of, True, False)
            else:
                _l_act(av, rv, ov, sh, sc, of, True, False)
    elif relu:
        if xo:
            _l_act(ov, ov, ov, sh, sc, of, False, True)
        else:
            _l_act(av, av, ov, sh, sc, of, False, True)
    else:
        if xo:
            _l_act(ov, ov, ov, sh, sc, of, False, False)
        else:
            _l_act(av, av, ov, sh, sc, of, False, False)


@njit(cache=True)
def _l_act_row(a, r, o, sh, sc, of, res, relu):
    """``_l_act`` for one channels-last row: per-channel parameter vectors."""
    z = o.dtype.type(0)
    for c in range(o.shape[0]):
        v = (a[c] - sh[c]) * sc[c] + of[c]
        if res:
            v = v + r[c]
        if relu:
            v = z if v < z else v
        o[c] = v


@njit(cache=True)
def _h_affine_act_rows(a, r, o, lo, hi, sh, sc, of, res, relu):
    xo = a.ctypes.data == o.ctypes.data
    ro = res and r.ctypes.data == o.ctypes.data
    for s in range(lo, hi):
        ov = o[s]
        if res:
            if relu:
                if xo and ro:
                    _l_act_row(ov, ov, ov, sh, sc, of, True, True)
                elif xo:
                    _l_act_row(ov, r[s], ov, sh, sc, of, True, True)
                elif ro:
                    _l_act_row(a[s], ov, ov, sh, sc, of, True, True)
                else:
                    _l_act_row(a[s], r[s], ov, sh, sc, of, True, True)
            else:
                if xo and ro:
                    _l_act_row(ov, ov, ov, sh, sc, of, True, False)
                elif xo:
                    _l_act_row(ov, r[s], ov, sh, sc, of, True, False)
                elif ro:
                    _l_act_row(a[s], ov, ov, sh, sc, of, True, False)
                else:
                    _l_act_row(a[s], r[s], ov, sh, sc, of, True, False)
        elif relu:
            if xo:
                _l_act_row(ov, ov, ov, sh, sc, of, False, True)
            else:
                _l_act_row(a[s], a[s], ov, sh, sc, of, False, True)
        else:
            if xo:
                _l_act_row(ov, ov, ov, sh, sc, of, False, False)
            else:
                _l_act_row(a[s], a[s], ov, sh, sc, of, False, False)


@njit(cache=True)
def _h_merge_chunks(cm, cq, base, nc, L):
    """Chan et al. merge, in order, of the nc chunk moments cm/cq[base:base + nc] of
    one row of L values split at j * L // nc."""
    na = float(L // nc)
    ma = cm[base]
    qa = cq[base]
    for j in range(1, nc):
        nb = float((j + 1) * L // nc - j * L // nc)
        mb = cm[base + j]
        n = na + nb
        delta = mb - ma
        qa = qa + cq[base + j] + delta * delta * (na * nb / n)
        ma = (na * ma + nb * mb) / n
        na = n
    return ma, qa


@njit(cache=True)
def _h_block_moments(a, lo, hi):
    """Mean and M2 of a[lo:hi], float64: two-pass per piece of <= _BLOCK values (each
    piece reread from L1/L2, not memory), pieces merged in order with Chan's formula."""
    n = hi - lo
    npc = (n + _BLOCK - 1) // _BLOCK
    if npc <= 1:
        mu = _h_sum(a, lo, hi) / n
        return mu, _h_ssd(a, lo, hi, mu)
    na = 0.0
    ma = 0.0
    qa = 0.0
    for j in range(npc):
        l = lo + j * n // npc
        h = lo + (j + 1) * n // npc
        nb = float(h - l)
        mb = _h_sum(a, l, h) / nb
        qb = _h_ssd(a, l, h, mb)
        if j == 0:
            na = nb
            ma = mb
            qa = qb
        else:
            m = na + nb
            delta = mb - ma
            qa = qa + qb + delta * delta * (na * nb / m)
            ma = (na * ma + nb * mb) / m
            na = m
    return ma, qa


@njit(cache=True)
def _h_group_out(xr, o, lo, hi, S, c0, w, b, mu, rs):
    """Normalize values [lo, hi) of one (sample, group) block: value k is in channel
    c0 + k // S. out = (x - sh) * a + (b - (mu - sh) * a) with sh = mu rounded to the
    data's dtype and a = rs * w[c]: (x - sh) is exact near the mean and the part of the
    mean that the rounding lost is folded into the offset in float64 (as the unfused
    path does), so float32 output stays accurate when |mean| >> std."""
    t = xr.dtype.type
    sh = t(mu)
    ml = mu - np.float64(sh)
    k = lo
    while k < hi:
        c = k // S
        e = min(hi, (c + 1) * S)
        a = rs * w[c0 + c]
        _h_affine(xr, o, k, e, sh, t(a), t(b[c0 + c] - ml * a))
        k = e


@njit(cache=True)
def _h_affine_rows(a, o, lo, hi, sh, sc, of):
    C = a.shape[1]
    inplace = a.ctypes.data == o.ctypes.data
    for s in range(lo, hi):
        orow = o[s]
        if inplace:
            for c in range(C):
                orow[c] = (orow[c] - sh[c]) * sc[c] + of[c]
        else:
            arow = a[s]
            for c in range(C):
                orow[c] = (arow[c] - sh[c]) * sc[c] + of[c]


@njit(cache=True)
def _h_gapply(dy, x, o, lo, hi, sh, cdy, cx, c1):
    dv = dy[lo:hi]
    xv = x[lo:hi]
    ov = o[lo:hi]
    for i in range(xv.shape[0]):
        ov[i] = cdy * dv[i] + cx * (xv[i] - sh) + c1


@njit(cache=True)
def _h_gapply_rows(dy, x, o, lo, hi, sh, cdy, cx, c1):
    C = x.shape[1]
    for s in range(lo, hi):
        drow = dy[s]
        xrow = x[s]
        orow = o[s]
        for c in range(C):
            orow[c] = cdy[c] * drow[c] + cx[c] * (xrow[c] - sh[c]) + c1[c]


@njit(cache=True)
def _h_row_out(xr, w, b, mu, rs, o):
    """o = (x - mu) * rs * w + b in the data's dtype.

    For float32 the float64 mean is split into mh + ml (both float32): (x - mh) - ml
    keeps the centering exact to float32 precision even when |mu| >> std, while every
    operation runs on 16 float32 lanes instead of 8 float64 ones. No fastmath here: it
    would be free to rewrite (x - mh) - ml as x - (mh + ml) and lose the digits.
    For float64 ml is 0 and this is the plain formula.
    """
    t = xr.dtype.type
    mh = t(mu)
    ml = t(mu - mh)
    r = t(rs)
    for k in range(xr.shape[0]):
        o[k] = (((xr[k] - mh) - ml) * r) * w[k] + b[k]


@njit(cache=True)
def _h_row_out_rms(xr, w, rs, o):
    r = xr.dtype.type(rs)
    for k in range(xr.shape[0]):
        o[k] = (xr[k] * r) * w[k]


@njit(cache=True)
def _h_row_dx(dy, x, w, mu, rs, a, bc, o, pw, pb):
    """dx = rs * (g - a - xhat * bc); pw += dy * xhat; pb += dy."""
    for k in range(x.shape[0]):
        d = np.float64(dy[k])
        xh = (x[k] - mu) * rs
        o[k] = rs * (d * w[k] - a - xh * bc)
        pw[k] += d * xh
        pb[k] += d


# ============================================================ drivers
# Item i of a row/plane split into nc chunks covers [j*S//nc, (j+1)*S//nc), j = i % nc:
# never empty while nc <= S (the wrappers guarantee it).

def _d_plane_moments(x, nc, mean, m2):
    P, S = x.shape
    if nc == 1:
        for p in prange(P):
            row = x[p]
            mu = _h_sum(row, 0, S) / S
            mean[p] = mu
            m2[p] = _h_ssd(row, 0, S, mu)
    else:
        cm = np.empty(P * nc)
        cq = np.empty(P * nc)
        for it in prange(P * nc):
            p = it // nc
            j = it - p * nc
            lo = j * S // nc
            hi = (j + 1) * S // nc
            row = x[p]
            mu = _h_sum(row, lo, hi) / (hi - lo)
            cm[it] = mu
            cq[it] = _h_ssd(row, lo, hi, mu)
        for p in prange(P):
            mean[p], m2[p] = _h_merge_chunks(cm, cq, p * nc, nc, S)


def _d_channels_last_moments(x, nc, mean, m2):
    N, S, C = x.shape
    pm = np.empty((N * nc, C))
    pq = np.empty((N * nc, C))
    for it in prange(N * nc):
        n = it // nc
        j = it - n * nc
        _h_cl_moments(x[n], j * S // nc, (j + 1) * S // nc, pm[it], pq[it])
    for n in prange(N):
        mo = mean[n]
        qo = m2[n]
        base = n * nc
        na = float(S // nc)
        for c in range(C):
            mo[c] = pm[base, c]
            qo[c] = pq[base, c]
        for j in range(1, nc):
            nb = float((j + 1) * S // nc - j * S // nc)
            n_ = na + nb
            f = na * nb / n_
            wa = na / n_
            wb = nb / n_
            mb = pm[base + j]
            qb = pq[base + j]
            for c in range(C):
                delta = mb[c] - mo[c]
                qo[c] = qo[c] + qb[c] + delta * delta * f
                mo[c] = wa * mo[c] + wb * mb[c]
            na = n_


def _d_rows_forward(x, w, b, eps, rms, out, mean, rstd):
    R, K = x.shape
    for r in prange(R):
        xr = x[r]
        if rms:
            mu = 0.0
            var = _h_sumsq(xr, 0, K) / K
        else:
            mu = _h_sum(xr, 0, K) / K
            var = _h_ssd(xr, 0, K, mu) / K
        rs = 1.0 / np.sqrt(var + eps)
        mean[r] = mu
        rstd[r] = rs
        if rms:
            _h_row_out_rms(xr, w, rs, out[r])
        else:
            _h_row_out(xr, w, b, mu, rs, out[r])


def _d_rows_backward(dy, x, mean, rstd, w, rms, dx, nch, dw, db):
    R, K = x.shape
    pw = np.zeros((nch, K))
    pb = np.zeros((nch, K))
    for t in prange(nch):
        pwt = pw[t]
        pbt = pb[t]
        for r in range(t * R // nch, (t + 1) * R // nch):
            mu = mean[r]
            rs = rstd[r]
            s1, s2 = _h_row_gsums(dy[r], x[r], w, mu, rs)
            a = 0.0 if rms else s1 / K
            _h_row_dx(dy[r], x[r], w, mu, rs, a, s2 / K, dx[r], pwt, pbt)
    for k in range(K):
        dw[k] = pw[0, k]
        db[k] = pb[0, k]
    for t in range(1, nch):
        for k in range(K):
            dw[k] += pw[t, k]
            db[k] += pb[t, k]


def _d_channels_first_affine(x, shift, scale, offset, out, nc):
    N, C, S = x.shape
    per = shift.shape[0] > 1
    for it in prange(N * C * nc):
        pl = it // nc
        j = it - pl * nc
        n = pl // C
        c = pl - n * C
        pn = n if per else 0
        _h_affine(x[n, c], out[n, c], j * S // nc, (j + 1) * S // nc,
                  shift[pn, c], scale[pn, c], offset[pn, c])


def _d_channels_last_affine(x, shift, scale, offset, out, nc):
    N, S, C = x.shape
    per = shift.shape[0] > 1
    for it in prange(N * nc):
        n = it // nc
        j = it - n * nc
        pn = n if per else 0
        _h_affine_rows(x[n], out[n], j * S // nc, (j + 1) * S // nc,
                       shift[pn], scale[pn], offset[pn])


def _d_channels_first_grad_sums(dy, x, shift, nc, sum_dy, sum_dyxc):
    N, C, S = x.shape
    per = shift.shape[0] > 1
    p1 = np.empty(N * C * nc)
    p2 = np.empty(N * C * nc)
    for it in prange(N * C * nc):
        pl = it // nc
        j = it - pl * nc
        n = pl // C
        c = pl - n * C
        pn = n if per else 0
        s1, s2 = _h_dot_c(dy[n, c], x[n, c], j * S // nc, (j + 1) * S // nc,
                          np.float64(shift[pn, c]))
        p1[it] = s1
        p2[it] = s2
    for pl in prange(N * C):
        n = pl // C
        c = pl - n * C
        s1 = 0.0
        s2 = 0.0
        for j in range(nc):
            s1 += p1[pl * nc + j]
            s2 += p2[pl * nc + j]
        sum_dy[n, c] = s1
        sum_dyxc[n, c] = s2


def _d_channels_last_grad_sums(dy, x, shift, nc, sum_dy, sum_dyxc):
    N, S, C = x.shape
    per = shift.shape[0] > 1
    p1 = np.empty((N * nc, C))
    p2 = np.empty((N * nc, C))
    for it in prange(N * nc):
        n = it // nc
        j = it - n * nc
        pn = n if per else 0
        sh = shift[pn].astype(np.float64)
        _h_cl_gsums(dy[n], x[n], j * S // nc, (j + 1) * S // nc, sh, p1[it], p2[it])
    for n in prange(N):
        o1 = sum_dy[n]
        o2 = sum_dyxc[n]
        for c in range(C):
            o1[c] = p1[n * nc, c]
            o2[c] = p2[n * nc, c]
        for j in range(1, nc):
            a1 = p1[n * nc + j]
            a2 = p2[n * nc + j]
            for c in range(C):
                o1[c] += a1[c]
                o2[c] += a2[c]


def _d_channels_first_grad_apply(dy, x, shift, coef_dy, coef_x, coef_1, dx, nc):
    N, C, S = x.shape
    per = shift.shape[0] > 1
    for it in prange(N * C * nc):
        pl = it // nc
        j = it - pl * nc
        n = pl // C
        c = pl - n * C
        pn = n if per else 0
        _h_gapply(dy[n, c], x[n, c], dx[n, c], j * S // nc, (j + 1) * S // nc,
                  shift[pn, c], coef_dy[pn, c], coef_x[pn, c], coef_1[pn, c])


def _d_channels_last_grad_apply(dy, x, shift, coef_dy, coef_x, coef_1, dx, nc):
    N, S, C = x.shape
    per = shift.shape[0] > 1
    for it in prange(N * nc):
        n = it // nc
        j = it - n * nc
        pn = n if per else 0
        _h_gapply_rows(dy[n], x[n], dx[n], j * S // nc, (j + 1) * S // nc,
                       shift[pn], coef_dy[pn], coef_x[pn], coef_1[pn])


def _d_channels_first_group_forward(x, groups, w, b, eps, out, nc, mean, rstd):
    N, C, S = x.shape
    Cg = C // groups
    L = Cg * S
    NG = N * groups
    xb = x.reshape((NG, L))
    ob = out.reshape((NG, L))
    if nc == 1:
        # One item per (sample, group) block: statistics, then normalize it while it
        # is still in L1/L2 -- x is read from memory once.
        for p in prange(NG):
            row = xb[p]
            mu, q = _h_block_moments(row, 0, L)
            rs = 1.0 / np.sqrt(q / L + eps)
            mean[p] = mu
            rstd[p] = rs
            _h_group_out(row, ob[p], 0, L, S, (p % groups) * Cg, w, b, mu, rs)
    else:
        # Few huge blocks: split each into nc chunks for the statistics (partials merged
        # with Chan's formula), then normalize the chunks in parallel.
        cm = np.empty(NG * nc)
        cq = np.empty(NG * nc)
        for it in prange(NG * nc):
            p = it // nc
            j = it - p * nc
            mu, q = _h_block_moments(xb[p], j * L // nc, (j + 1) * L // nc)
            cm[it] = mu
            cq[it] = q
        for p in range(NG):
            ma, qa = _h_merge_chunks(cm, cq, p * nc, nc, L)
            mean[p] = ma
            rstd[p] = 1.0 / np.sqrt(qa / L + eps)
        for it in prange(NG * nc):
            p = it // nc
            j = it - p * nc
            _h_group_out(xb[p], ob[p], j * L // nc, (j + 1) * L // nc, S,
                         (p % groups) * Cg, w, b, mean[p], rstd[p])


def _d_channels_first_affine_act(x, shift, scale, offset, res, has_res, relu, out, nc):
    N, C, S = x.shape
    per = shift.shape[0] > 1
    for it in prange(N * C * nc):
        pl = it // nc
        j = it - pl * nc
        n = pl // C
        c = pl - n * C
        pn = n if per else 0
        _h_affine_act(x[n, c], res[n, c], out[n, c], j * S // nc, (j + 1) * S // nc,
                      shift[pn, c], scale[pn, c], offset[pn, c], has_res, relu)


def _d_channels_last_affine_act(x, shift, scale, offset, res, has_res, relu, out, nc):
    N, S, C = x.shape
    per = shift.shape[0] > 1
    for it in prange(N * nc):
        n = it // nc
        j = it - n * nc
        pn = n if per else 0
        _h_affine_act_rows(x[n], res[n], out[n], j * S // nc, (j + 1) * S // nc,
                           shift[pn], scale[pn], offset[pn], has_res, relu)


# ============================================================ signatures
def _A(dt, nd, ro=False):
    return types.Array(dt, nd, "C", readonly=ro)


def _signature(kernel, T):
    """The one signature of ``kernel`` for compute dtype T (a numba float type)."""
    f8 = types.float64
    i8 = types.int64
    x2, x3 = _A(T, 2, True), _A(T, 3, True)
    p1, p2 = _A(T, 1, True), _A(T, 2, True)
    o2, o3 = _A(T, 2), _A(T, 3)
    s1, s2 = _A(f8, 1), _A(f8, 2)
    b1 = types.boolean
    return {
        "plane_moments": (x2, i8, s1, s1),
        "channels_last_moments": (x3, i8, s2, s2),
        "rows_forward": (x2, p1, p1, f8, types.boolean, o2, s1, s1),
        "rows_backward": (x2, x2, _A(f8, 1, True), _A(f8, 1, True), p1, types.boolean,
                          o2, i8, s1, s1),
        "channels_first_affine": (x3, p2, p2, p2, o3, i8),
        "channels_last_affine": (x3, p2, p2, p2, o3, i8),
        "channels_first_grad_sums": (x3, x3, p2, i8, s2, s2),
        "channels_last_grad_sums": (x3, x3, p2, i8, s2, s2),
        "channels_first_grad_apply": (x3, x3, p2, p2, p2, p2, o3, i8),
        "channels_last_grad_apply": (x3, x3, p2, p2, p2, p2, o3, i8),
        "channels_first_group_forward": (x3, i8, p1, p1, f8, o3, i8, s1, s1),
        "channels_first_affine_act": (x3, p2, p2, p2, x3, b1, b1, o3, i8),
        "channels_last_affine_act": (x3, p2, p2, p2, x3, b1, b1, o3, i8),
    }[kernel]


DRIVERS = {
    "plane_moments": _d_plane_moments,
    "channels_last_moments": _d_channels_last_moments,
    "rows_forward": _d_rows_forward,
    "rows_backward": _d_rows_backward,
    "channels_first_affine": _d_channels_first_affine,
    "channels_last_affine": _d_channels_last_affine,
    "channels_first_grad_sums": _d_channels_first_grad_sums,
    "channels_last_grad_sums": _d_channels_last_grad_sums,
    "channels_first_grad_apply": _d_channels_first_grad_apply,
    "channels_last_grad_apply": _d_channels_last_grad_apply,
    "channels_first_group_forward": _d_channels_first_group_forward,
    "channels_first_affine_act": _d_channels_first_affine_act,
    "channels_last_affine_act": _d_channels_last_affine_act,
}

_NUMBA_DTYPES = {np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64}


def build(kernel: str, dtype, parallel: bool):
    """Compile (or load from the on-disk cache) one driver for one dtype.

    The driver's function object is copied under a qualname ending in ``_par`` or
    ``_ser`` so the two variants get separate cache files. One signature per
    dispatcher: the first call of a kernel loads only what it uses.
    """
    fn = DRIVERS[kernel]
    suffix = "_par" if parallel else "_ser"
    copy = _pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix,
                                 fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    copy.__module__ = fn.__module__
    copy.__doc__ = fn.__doc__
    sig = types.void(*_signature(kernel, _NUMBA_DTYPES[np.dtype(dtype)]))
    return njit(sig, parallel=parallel, cache=True, nogil=True)(copy)
