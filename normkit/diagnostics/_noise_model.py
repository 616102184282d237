"""The noise model: how noisy the batch statistics of N samples of m values are.

A channel's batch is a one-way random-effects design, ``x_ij = mu + a_i + e_ij``: the
per-sample means and M2 give the variance components by ANOVA, a strided subsample the
kurtosis, and ``expected_noise`` the standard errors of the batch mean and variance.
Formulas, assumptions and the Monte Carlo validation: ``docs/diagnostics.md``.
Everything here is float64 and per channel; callers silence NumPy's floating-point
warnings (NaN channels are expected and handled).
"""
from __future__ import annotations

import math

import numpy as np

_KURT_PRIOR = 8.0       # shrinkage towards 3: Var(kurtosis_hat) ~ 24 / K, prior variance 3
_KURT_MAX = 50.0
_LAM_MAX = 1e6          # sb2 / sw2 beyond this is rho = 1 for all purposes
_CHUNK = 16             # values read together by the subsample: one 64-byte line of float32


def finite_stat(fn, a, default=math.nan):
    """``fn`` (np.median, np.max, ...) of the finite values of ``a``; ``default`` when
    there is none (NumPy's nan-functions would warn on an all-NaN array)."""
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(fn(a)) if a.size else default


def nanmed(a, default):
    """Median of the finite values of ``a``; ``default`` when there is none."""
    return finite_stat(np.median, a, default)


def shrink_kurtosis(beta_hat, count):
    """Shrink a kurtosis estimate from ``count`` values towards the normal 3, clip."""
    beta = 3.0 + (beta_hat - 3.0) * (count / (count + _KURT_PRIOR))
    beta = np.clip(beta, 1.0, _KURT_MAX)
    if not np.isfinite(beta.sum()):
        beta = np.where(np.isfinite(beta), beta, 3.0)
    return beta


def _chi2_ratio_upper(df, z=2.326):
    """Wilson-Hilferty: the 99% quantile of chi2(df) / df."""
    a = 2.0 / (9.0 * df)
    return (1.0 - a + z * math.sqrt(a)) ** 3


def _cv2_within(beta_w, m):
    """Squared coefficient of variation of one sample's biased variance over m values:
    Var(s^2) / E[s^2]^2 = beta / m - (m - 3) / (m (m - 1)) for i.i.d. values."""
    if m <= 1:
        return np.zeros_like(beta_w)
    return beta_w * (1.0 / m) - (m - 3.0) / (m * (m - 1.0))


def per_statistic_cv(beta, n):
    """Relative standard error of the biased variance of ``n`` i.i.d. values with
    kurtosis ``beta`` (inf for a single value): the instance/group statistics."""
    if n <= 1:
        return np.full_like(beta, np.inf)
    return np.sqrt((beta * (n - 1.0) - (n - 3.0)) / (n * (n - 1.0)))


def expected_noise(rho, m, n_samples, beta_w, het, beta_b):
    """Noise of the batch statistics for N samples of m values, given the structure.

    Everything per channel, in units of the channel variance (sb2 + sw2 = 1):
    returns (n_eff, mean_rel_se, var_rel_se, var_rel_bias).
    """
    big_n = float(n_samples)
    if m > 1:
        rho = np.nan_to_num(rho, nan=0.0)
        tau2 = rho * (1.0 - 1.0 / m) + 1.0 / m           # Var of one sample's mean
        e_w = (1.0 - rho) * ((m - 1.0) / m)              # E[within part]
        var_w = (_cv2_within(beta_w, m) + het) * (e_w * e_w) * (1.0 / big_n)
    else:
        tau2 = np.ones_like(beta_b)
        e_w = var_w = 0.0
    e_b = tau2 * ((big_n - 1.0) / big_n)                 # E[between part]
    if big_n > 1:
        c_b = (beta_b * (big_n - 1.0) - (big_n - 3.0)) * (1.0 / (big_n * (big_n - 1.0)))
        var_b = c_b * (e_b * e_b)
    else:
        var_b = 0.0
    e_v = e_b + e_w
    var_rel_se = np.sqrt(var_w + var_b) / e_v
    n_eff = big_n / tau2                                 # = n / (1 + (m - 1) rho)
    return n_eff, np.sqrt(tau2 * (1.0 / big_n)), var_rel_se, e_v - 1.0


class Structure:
    """One batch's per-channel structure: variance components, kurtosis, heterogeneity.

    ``lam`` is the ratio sb2 / sw2 of the ANOVA estimates of the between- and
    within-sample variance components (scale-free, and unclipped so that it can be
    averaged over steps without bias); ``rho = max(lam, 0) / (1 + max(lam, 0))``.
    """

    __slots__ = ("n_samples", "m", "mean", "var", "lam", "rho", "beta_w", "het",
                 "beta_b", "has_beta_b")

    def __init__(self, mu, m2, m, beta_w):
        """mu, m2: (N, C) float64 per-sample means and M2 over m values each."""
        big_n = mu.shape[0]
        self.n_samples, self.m, self.beta_w = big_n, m, beta_w
        mean = mu.mean(axis=0)
        dev2 = mu - mean
        dev2 *= dev2                                         # (mu_i - mean)^2
        sdd = dev2.sum(axis=0)
        ssw = m2.sum(axis=0)                                 # within sum of squares
        self.mean = mean
        self.var = (ssw + m * sdd) * (1.0 / (big_n * m))     # the biased batch variance
        self.lam, self.rho = _variance_components(sdd, ssw, big_n, m)
        self.het = _heterogeneity(m2, m, beta_w) if m > 1 and big_n >= 3 else np.zeros_like(sdd)
        # tails of the per-sample means (only measurable with enough samples)
        self.has_beta_b = big_n >= 8
        if self.has_beta_b:
            g = (dev2 * dev2).sum(axis=0) / (sdd * sdd) * big_n
            self.beta_b = shrink_kurtosis(g * ((big_n + 1.0) / (big_n - 1.0)), big_n)
        else:
            self.beta_b = np.full_like(sdd, 3.0)

    def noise(self):
        return expected_noise(self.rho, self.m, self.n_samples, self.beta_w, self.het,
                              self.beta_b)


def _variance_components(sdd, ssw, big_n, m):
    """(lam, rho) by one-way ANOVA from the between (sdd) and within (ssw) sums of squares."""
    if m <= 1:                              # one value per sample: no within part
        return np.full_like(sdd, _LAM_MAX), np.full_like(sdd, np.nan)
    msw = ssw * (1.0 / (big_n * (m - 1.0)))
    if big_n > 1:                           # Var(per-sample means) - its within share
        sb2 = sdd * (1.0 / (big_n - 1.0)) - msw * (1.0 / m)
        pos = np.maximum(sb2, 0.0)
        rho = np.minimum(pos / (pos + msw), 1.0)
    else:
        sb2 = np.full_like(sdd, np.nan)
        rho = sb2
    # sb2 / sw2: linear in the between sum of squares (sw2 is estimated on N (m - 1)
    # degrees of freedom), so an average over steps is unbiased
    return np.minimum(sb2 / msw, _LAM_MAX), rho


def _heterogeneity(m2, m, beta_w):
    """The empirical excess spread of the per-sample variances (samples of different
    scale, or spatial correlation inside a sample) beyond what the model allows, kept
    only where a one-sided 99% chi-square test finds it (needs N >= 3)."""
    big_n = m2.shape[0]
    w = m2 * (1.0 / m)
    wbar = w.mean(axis=0)
    w -= wbar
    w *= w
    emp = w.sum(axis=0) / (wbar * wbar) * (1.0 / (big_n - 1.0))
    excess = emp - _cv2_within(beta_w, m)
    het = np.where(emp > (emp - excess) * _chi2_ratio_upper(big_n - 1), excess, 0.0)
    return np.nan_to_num(het, nan=0.0, posinf=0.0)


def within_kurtosis(sub, mu, m2, m_plane, axis):
    """Kurtosis of within-plane values from a subsample, per channel.

    ``sub`` holds k values of each plane along ``axis`` (planes (P, C)), ``mu``/``m2``
    the planes' exact moments over ``m_plane`` values. Each plane's residuals are
    standardized by that plane's own variance (so samples of different scale do not
    look heavy-tailed), the plane kurtosis is bias-corrected (its expectation for normal
    data is 3 (m - 1) / (m + 1)), averaged over planes and shrunk towards 3.
    """
    if m_plane <= 3:
        return np.full(mu.shape[1], 3.0)
    k = sub.shape[axis]
    r = sub - np.expand_dims(mu, axis)
    r *= r
    r *= r
    q = r.sum(axis=axis) / (m2 * m2) * (m_plane * m_plane / k)      # (P, C)
    g = q.mean(axis=0)
    cnt = q.shape[0]
    if not np.isfinite(g.sum()):           # constant or non-finite planes: leave out
        ok = np.isfinite(q)
        cnt = ok.sum(axis=0)
        g = np.where(ok, q, 0.0).sum(axis=0) / cnt
    return shrink_kurtosis(g * ((m_plane + 1.0) / (m_plane - 1.0)), cnt * k)


def strided(n_total, k):
    """A step and count that pick about k of n_total values, spread over all of them."""
    if k >= n_total:
        return 1, n_total
    step = n_total // k
    if step > 1 and step % 2 == 0:
        step -= 1                 # odd: less aliasing with even row lengths
    return step, k


def subsample_planes(data, k):
    """About k values of every plane of data (P, C, S), as float64 (P, C, k').

    Reads chunks of ``_CHUNK`` consecutive values spread evenly over each plane: one
    cache line per chunk instead of one per value, so the subsample costs a small
    fraction of a pass over ``data``.
    """
    s = data.shape[2]
    if k >= s:
        return data.astype(np.float64)
    if s < 4 * _CHUNK or k < _CHUNK:
        step, k = strided(s, k)
        return data[:, :, :step * k:step].astype(np.float64)
    nb = s // _CHUNK
    step, kb = strided(nb, -(-k // _CHUNK))
    blocks = data[:, :, :nb * _CHUNK].reshape(data.shape[0], data.shape[1], nb, _CHUNK)
    sub = blocks[:, :, :step * kb:step, :].astype(np.float64)
    return sub.reshape(data.shape[0], data.shape[1], -1)


def plane_kurtosis(xg):
    """Per plane of ``xg`` (P, G, n): mean, M2 and the sample kurtosis
    ``n * sum(r^4) / M2^2`` (uncorrected), float64 (P, G) each."""
    mean = xg.mean(axis=2)
    r2 = xg - mean[:, :, None]
    r2 *= r2
    m2 = r2.sum(axis=2)
    return mean, m2, xg.shape[2] * (r2 * r2).sum(axis=2) / (m2 * m2)


def per_sample_moments(x, ax):
    """x as float64 (N, C, m), and its per-sample channel means and M2, (N, C) each."""
    xm = np.moveaxis(np.asarray(x, dtype=np.float64), ax, 1)
    n, c = xm.shape[:2]
    xm = xm.reshape(n, c, -1)
    mu = xm.mean(axis=2)
    m2 = ((xm - mu[:, :, None]) ** 2).sum(axis=2)
    return xm, mu, m2


def typical_rho(lam, valid):
    """rho of a typical channel: from the channel average of the unclipped sb2 / sw2
    (each channel's estimate may rest on one degree of freedom; their mean does not,
    and is unbiased where a median of clipped values is not)."""
    lam = np.asarray(lam, dtype=np.float64)[valid]
    lam = lam[np.isfinite(lam)]
    if not lam.size:
        return 0.0
    l_bar = max(float(lam.mean()), 0.0)
    return l_bar / (1.0 + l_bar)


def typical_structure(lam, m, beta_w, het, beta_b, valid):
    """(rho, m, beta_w, het, beta_b) of a typical channel, for ``batch_needed``."""
    def med(a, default):
        a = np.asarray(a, dtype=np.float64)
        return nanmed(a[valid] if a.shape == valid.shape else a, default)
    return (typical_rho(lam, valid), m, med(beta_w, 3.0), med(het, 0.0), med(beta_b, 3.0))


def batch_needed(structure, thr, current, limit=4096):
    """Smallest batch whose expected noise (typical channel) is under the thresholds,
    None beyond ``limit``. The noise decreases with N: doubling, then bisection."""
    rho, m, beta_w, het, beta_b = structure
    args = (np.array([beta_w]), np.array([het]), np.array([beta_b]))

    def ok(big_n):
        _, mse, vse, _ = expected_noise(np.array([rho]), m, big_n, *args)
        return vse[0] <= thr.max_var_rel_se and mse[0] <= thr.max_mean_rel_se

    lo, hi = max(1, current), max(2, current + 1)
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi
