"""Partial moments (count, mean, M2) and Chan's exact merge of them, in float64.

This is the one place the Python side merges statistics. Every caller that has
per-chunk / per-plane / per-block partial moments -- BatchNorm's per-plane statistics,
GroupNorm on channels-last data, the diagnostics, Dask's tree reduction -- merges them
here. (The compiled backends have their own in-kernel merge, one per backend.)

M2 is the centered sum of squared deviations, so merging never forms E[x^2] - E[x]^2:
float32 data with a mean of 1e4 and a standard deviation of 1 keeps its digits.
Chan, Golub & LeVeque (1979): for parts a, b with n = na + nb, d = mean_b - mean_a,
    mean = mean_a + d * nb / n,   M2 = M2_a + M2_b + d^2 * na * nb / n.
For K parts of equal count m that is mean = mean_k.mean(), M2 = sum M2_k + m * sum
(mean_k - mean)^2, which is what ``merge_equal`` computes in one vectorised step.
"""
from __future__ import annotations

import numpy as np

__all__ = ["merge_equal", "merge_pair", "combine"]


def merge_equal(mean, m2, count, axis=-1):
    """Merge partial moments that each cover ``count`` values, along ``axis``.

    Returns ``(mean, m2)`` with ``axis`` removed, float64. NaN/Inf propagate.
    (On the per-call path of small training BatchNorm: keepdims and in-place squaring
    keep it to a few array operations.)
    """
    mean = np.asarray(mean, dtype=np.float64)
    # ufunc reductions, not .mean()/np.sum: their Python wrappers cost more than the
    # arithmetic at the sizes of this path
    with np.errstate(invalid="ignore", over="ignore"):
        gmean = np.add.reduce(mean, axis=axis, keepdims=True) / mean.shape[axis]
        dev = mean - gmean
        dev *= dev
        gm2 = np.add.reduce(m2, axis=axis, dtype=np.float64) + count * np.add.reduce(dev, axis=axis)
    return gmean.squeeze(axis), gm2


def merge_pair(na, mean_a, m2_a, nb, mean_b, m2_b):
    """Chan's merge of two sets of partial moments with (broadcastable) counts.

    A part with count 0 contributes nothing (its mean and M2 are ignored).
    Returns ``(n, mean, m2)``, float64.
    """
    na = np.asarray(na, dtype=np.float64)
    nb = np.asarray(nb, dtype=np.float64)
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        d = np.asarray(mean_b, np.float64) - np.asarray(mean_a, np.float64)
        wb = np.where(n > 0, nb / np.where(n > 0, n, 1.0), 0.0)
        mean = np.where(nb > 0, np.where(na > 0, mean_a + d * wb, mean_b), mean_a)
        cross = np.where((na > 0) & (nb > 0), d * d * na * wb, 0.0)
        m2 = (np.where(na > 0, m2_a, 0.0) + np.where(nb > 0, m2_b, 0.0) + cross)
    return n, mean.astype(np.float64), m2.astype(np.float64)


def combine(counts, means, m2s, axis=0):
    """Merge any number of partials (unequal counts allowed) along ``axis``.

    Weighted by count: mean = sum(n_k mean_k) / n, M2 = sum M2_k + sum n_k (mean_k - mean)^2,
    the K-way form of Chan's merge (exact in exact arithmetic, centered in float).
    Returns ``(n, mean, m2)``; where n == 0 the mean and M2 are NaN.
    """
    counts = np.asarray(counts, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    m2s = np.asarray(m2s, dtype=np.float64)
    counts = np.broadcast_to(counts, np.broadcast_shapes(counts.shape, means.shape))
    n = counts.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        safe = np.where(counts > 0, means, 0.0)
        mean = (counts * safe).sum(axis=axis) / n
        dev = np.where(counts > 0, means - np.expand_dims(mean, axis), 0.0)
        m2 = np.where(counts > 0, m2s, 0.0).sum(axis=axis) + (counts * dev * dev).sum(axis=axis)
    return n, mean, m2
