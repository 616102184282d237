"""Error bounds the case table (tests/_cases.py) does not cover: finite differences,
folded affine maps, merged population statistics and float32 peers of a layer.
Each function states its derivation; tests/_cases.py's ``u``, ``gamma`` and the
normalized-output bounds are reused, never restated.
"""
from __future__ import annotations

import math

import _cases as K
import numpy as np

U32 = 2.0 ** -24


# ------------------------------------------------------------ finite differences
def fd_step(rel_err, curvature=1e-2, scale=1.0):
    """Central-difference step: the power of two nearest (3 rel_err / curvature)^(1/3)
    * scale, which minimizes h^2 |f3| / 6 + rel_err |f| / h for a third derivative
    |f3| = curvature |f| / scale^3. ``rel_err``: the loss's relative rounding error
    bound (loss_error / |f|); ``curvature``: |f3| / |f| of the loss (1e-2 for the
    unit-scale norms of test_gradcheck, from their Richardson terms). Any h gives a
    valid bound in :func:`central_difference`; h only decides how tight it is. A power
    of two makes ``2 h`` and the division by it exact."""
    h = (3 * rel_err / curvature) ** (1 / 3) * scale
    return float(2.0 ** np.round(np.log2(h)))


def central_difference(loss, arr, h, loss_err):
    """Central differences of the scalar ``loss()`` w.r.t. each element of ``arr``
    (float64, modified in place and restored) and a per-element bound of their error.

    D(h) = (L(p+h) - L(p-h)) / 2h = L' + c h^2 + O(h^4). Error terms:
    * truncation c h^2: estimated from the same data by Richardson's rule,
      c h^2 = (D(2h) - D(h)) / 3; doubled for the O(h^4) rest and the rounding of the
      estimate itself;
    * rounding of L: each evaluation within ``loss_err`` of exact, so
      (loss_err + loss_err) / 2h;
    * rounding of the argument: fl(p +- h) moves p by <= u |p +- h| each, so the
      effective step is 2h (1 + theta), |theta| <= u (|p| + h) / h, times |L'|.
    (L(p+h) - L(p-h) is exact by Sterbenz's lemma when the two are within 2x, and the
    division by the power-of-two 2h is exact.)"""
    assert arr.flags.c_contiguous and arr.dtype == np.float64
    u = K.U64
    flat = arr.reshape(-1)
    grad = np.empty(arr.size)
    bound = np.empty(arr.size)
    for i in range(arr.size):
        old = flat[i]
        f = {}
        for k in (-2, -1, 1, 2):
            flat[i] = old + k * h
            f[k] = loss()
        flat[i] = old
        d1 = (f[1] - f[-1]) / (2 * h)
        d2 = (f[2] - f[-2]) / (4 * h)
        grad[i] = d1
        bound[i] = (2 * abs(d2 - d1) / 3 + loss_err / h
                    + abs(d1) * u * (abs(old) + 2 * h) / h)
    return grad.reshape(arr.shape), bound.reshape(arr.shape)


def loss_error(y, g, n, cond):
    """Bound of |fl(L) - L| for L = sum(y * g), y a float64 normalization whose
    statistics reduce n values: per element y is within half of K.tol_normalized's
    two-sided bound, times sum |g|, plus the m-term float64 sum of y * g."""
    y, g = np.abs(np.asarray(y, np.float64)), np.abs(np.asarray(g, np.float64))
    scale = max(1.0, float(y.max(initial=0.0)))
    per_y = K.tol_normalized(np.float64, n, cond, scale)["atol"] / 2
    return per_y * g.sum() + K.gamma(y.size) * (y * g).sum()


# ------------------------------------------------------------ folded affine maps
def bound_folded(abs_terms, abs_shift, k, dtype=np.float64):
    """Per-element bound on a layer with BN folded in (W2 = s W, b2 = s (b - m) + beta,
    s = gamma / sqrt(var + eps)) against BN(layer(u)): each side is a k-term dot product
    (gamma(k) times the sum of its |terms|, scaled by |s|: ``abs_terms`` = |s| times the
    layer applied to |u|, |W|, |b|); the folding rounds s, each W2 and b2 (~4 u of the
    terms) and BN's own pass or b2's shift (s m, beta: ``abs_shift`` = |s m| + |beta|)
    ~8 u of its terms."""
    u = K.unit_roundoff(dtype)
    return (2 * K.gamma(k, u) + 4 * u) * np.asarray(abs_terms) + 8 * u * (
        np.asarray(abs_terms) + np.asarray(abs_shift))


# ------------------------------------------------------------ merged statistics
def bound_merged_mean(abs_mean, n_total, u=K.U64):
    """Chan et al.'s pairwise/batched merge of per-batch means: the merged mean of
    n_total values is a (weighted) n_total-term sum, error <= gamma(n_total) * mean|x|
    per side."""
    return 2 * K.gamma(n_total, u) * np.asarray(abs_mean)


def bound_merged_var(x_rows, axis, u=K.U64):
    """Population variance merged from batches (Chan, Golub & LeVeque's pairwise
    update): K.bound_m2 over all values along ``axis``, divided by n."""
    x_rows = np.asarray(x_rows, np.float64)
    n = x_rows.shape[axis]
    if u == K.U64:
        return K.bound_m2(x_rows, axis, np.float64) / n
    # accumulation in float32 (a float32 peer): same shape with u32
    mean = x_rows.mean(axis=axis, keepdims=True)
    m2 = ((x_rows - mean) ** 2).sum(axis=axis)
    sumsq = (x_rows ** 2).sum(axis=axis)
    g = K.gamma(n, u)
    return 4 * (g * np.sqrt(m2 * sumsq) + g * g * sumsq + g * m2) / n


# ------------------------------------------------------------ float32 peers of a layer
def tol_layer_vs_float32_peer(layer, y_ref):
    """A float32 peer (torch, ONNX reference: float32 accumulation) vs normkit float32 (float64 statistics):
    K.tol_normalized for float32 with the statistics normkit just used (the layer's
    cached mean/rstd: n values each, their conditioning), scale max(1, |w|, |b|, |y|)."""
    cache = layer._cache                   # (x, mean, rstd, ...); RMSNorm: (x, rstd)
    mean, rstd = (None, cache[1]) if len(cache) == 2 else (cache[1], cache[2])
    n = cache[0].size // np.size(rstd)
    scale = max([1.0, float(np.abs(y_ref).max())] + [
        float(np.abs(p).max()) for p in layer.parameters().values()])
    return K.tol_normalized(np.float32, n, K.conditioning(mean, rstd), scale)


def tol_running_state_float32_peer(x, steps):
    """Running statistics after ``steps`` training steps (per channel, axis 1): each step
    blends (momentum <= 1) torch's float32 batch statistics (mean: 2 gamma(n, u32)
    mean|x|, bound_merged_mean; unbiased variance: bound_merged_var with u32, an
    upper bound for InstanceNorm's per-sample ones too) with normkit's float64 ones,
    and both round the blend to float32 (a few u32 of the value)."""
    rows = np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)
    n = rows.shape[1]
    stat = np.maximum(bound_merged_mean(np.abs(rows).mean(axis=1), n, U32),
                      bound_merged_var(rows, 1, U32) * n / max(n - 1, 1))
    return dict(rtol=4 * steps * U32, atol=steps * float(stat.max()))


# ------------------------------------------------------------ a kernel's backward
def bound_rows_backward(dy, x, mean, rstd, w, rms, dtype):
    """Bounds of the rows_backward kernel's (dweight, dbias, dx) against the float64
    reference. dx = r (g - a - xhat bc), a = mean(g) (0 for RMS), bc = mean(g xhat):
    the two float64 means of K terms, then ~6 roundings in dtype; dw, db: float64 sums
    over R. xhat is formed from the float64 mean (to working precision of dtype, see
    _cases). 16-bit data: the float32 bound (terms of the means possibly formed in
    float32, ``term_roundoff``) plus the 16-bit rounding of both sides (``narrowing``)."""
    u = K.compute_roundoff(dtype)
    ut = K.term_roundoff(dtype)
    r, mu = rstd[:, None], mean[:, None]
    xhat = (x.astype(np.float64) - mu) * r
    g = dy.astype(np.float64) * w.astype(np.float64)
    k = x.shape[1]
    gk = K.gamma(k)
    a = 0.0 if rms else g.mean(axis=1, keepdims=True)
    bc = (g * xhat).mean(axis=1, keepdims=True)
    d_a = 0.0 if rms else (2 * gk + 4 * ut) * np.abs(g).mean(axis=1, keepdims=True)
    d_bc = ((2 * gk + 4 * ut) * np.abs(g * xhat).mean(axis=1, keepdims=True)
            + 8 * u * np.abs(bc))
    dx = (r * (d_a + np.abs(xhat) * d_bc)
          + 8 * u * r * (np.abs(g) + np.abs(a) + 2 * np.abs(xhat * bc))
          + 2 * u * u * r * r * np.abs(mu * bc))
    dx = K.narrowing(dtype, dx, r * (np.abs(g) + np.abs(a) + np.abs(xhat * bc)))
    dw = K.bound_sum(np.abs(dy * xhat).sum(axis=0), x.shape[0], dtype)
    db = K.bound_sum(np.abs(dy.astype(np.float64)).sum(axis=0), x.shape[0], dtype)
    return [dw, db, dx]


def bound_moments_from_stats(mean, var, n, u=K.U64, dtype=np.float64):
    """Two-sided bounds (d_mean, d_var) of a float64 population mean and variance of n
    values computed by two algorithms (Chan merges, pairwise, two-pass), from the
    statistics alone (for data too large to revisit): K.bound_mean and K.bound_m2 / n
    with mean|x| <= sqrt(E[x^2]) (Cauchy-Schwarz), E[x^2] = var + mean^2, M2 = n var.
    16-bit ``dtype``: each side's kernels may sum in float32 partials (K's comment at
    half_stat_roundoff: mean within 2 G sigma, M2 within 8 G M2), twice more."""
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    meansq = var + mean * mean
    g = K.gamma(n, u)
    h = K.half_stat_roundoff(dtype)
    d_mean = 2 * K.gamma(n + 1, u) * np.sqrt(meansq) + 2 * 2 * h * np.sqrt(var)
    d_var = (4 * (g * np.sqrt(var * meansq) + g * g * meansq + g * var)
             + 2 * (8 * h * var + K._half_underflow(dtype, n) / n))
    return d_mean, d_var


# ------------------------------------------------------------ Monte-Carlo checks
# Statistical tolerances (not rounding bounds) of the diagnostics' Monte-Carlo tests:
# z times the standard error of the estimated statistic under the test's own sampling
# model, z the two-sided normal quantile of P_FAIL, so that a correct estimator fails
# with probability ~P_FAIL over re-drawn seeds (the seeds are fixed: it then never
# flips). Where two random quantities are compared, their SEs add (sd(A - B) <=
# sd(A) + sd(B) whatever their correlation).
P_FAIL = 1e-9


def z_score(p_fail=P_FAIL):
    """Two-sided standard normal quantile: 6.11 for 1e-9."""
    from scipy import stats
    return float(stats.norm.isf(p_fail / 2))


def rel_se_sd(kurtosis, count):
    """Relative SE of a standard deviation estimated from ``count`` i.i.d. values of
    kurtosis k (delta method: Var(s^2)/sigma^4 = (k - 1)/count, halved for the sqrt):
    sqrt((k - 1) / (4 count)); pooled by RMS over C replicates, count = B C. For the
    sample variance of n normal values, k = 3 + 12 / (n - 1)."""
    return math.sqrt((kurtosis - 1) / (4 * count))


def rel_se_rms(samples):
    """Relative SE of the RMS of independent replicates v_i: RMS^2 = mean(v^2) has SE
    sd(v^2) / sqrt(N) (central limit theorem), the sqrt halves its relative SE."""
    v2 = np.asarray(samples, np.float64).ravel() ** 2
    return float(v2.std(ddof=1) / (2 * v2.mean() * math.sqrt(v2.size)))


def chi2_ratio_interval(df, p_fail=P_FAIL):
    """(lo, hi) with P(lo <= s^2 / sigma^2 <= hi) = 1 - p_fail for a normal-theory
    variance estimate on ``df`` degrees of freedom (s^2 ~ sigma^2 chi2(df) / df), from
    scipy's exact chi2 quantiles."""
    from scipy import stats
    return (float(stats.chi2.ppf(p_fail / 2, df)) / df,
            float(stats.chi2.isf(p_fail / 2, df)) / df)


def median_interval(samples, p_fail=P_FAIL):
    """Distribution-free interval of the population median from independent samples:
    the number of samples below it is Binomial(N, 1/2), so it lies between the order
    statistics k and N + 1 - k, k = binom.ppf(p_fail / 2, N, 1/2), with probability
    >= 1 - p_fail (scipy's exact binomial quantiles)."""
    from scipy import stats
    v = np.sort(np.asarray(samples, np.float64).ravel())
    k = max(int(stats.binom.ppf(p_fail / 2, v.size, 0.5)), 1)
    return float(v[k - 1]), float(v[v.size - k])
