"""The batch statistics report built from moments instead of from the data itself.

``batch_stats_report`` needs, of its input, only

* ``kind="batch"``: the per-(sample, channel) mean and M2 over the ``m`` positions of a
  sample (the one-way random-effects structure), and a strided subsample of each plane
  for the within-sample kurtosis (``subsample_size`` values a plane at most);
* ``kind="instance"`` / ``"group"``: the per-(sample, statistic) mean, M2 and sample
  kurtosis (from the sum of fourth powers of the deviations from that mean).

An input that is not in memory (a Dask array: ``normkit.dask._report``) computes those
by blocks and calls the functions here; the report is then the one the in-memory path
gives on the same data, up to float64 rounding of the moments.
"""
from __future__ import annotations

import math

import numpy as np

from . import _advice as advice
from . import _checks as checks
from . import _noise_model as noise
from . import _report as rep
from ._config import Thresholds, as_thresholds


def check_arguments(x: np.ndarray, axis: object, kind: object, num_groups: object,
                    eps: object, thresholds: object) -> tuple:
    """``batch_stats_report``'s checks of everything but the data, on ``x`` or a stand-in
    with its shape: ``(ax, kind, groups, eps, thresholds)``, ``groups`` None for
    ``kind="batch"`` (C for "instance")."""
    ax = checks.as_axis(axis, x.shape)
    kind = checks.as_kind(kind)
    eps = checks.as_eps(eps)
    thr = as_thresholds(thresholds)
    if kind != "group" and num_groups is not None:
        raise ValueError(f"num_groups: only used with kind='group', got num_groups="
                         f"{num_groups!r} with kind={kind!r}")
    if kind == "batch":
        return ax, kind, None, eps, thr
    if ax == 0:
        raise ValueError(f"axis: kind={kind!r} expects the channels on an axis other than "
                         f"the batch axis 0, got axis={axis!r}")
    c = x.shape[ax]
    groups = c if kind == "instance" else checks.as_num_groups(num_groups, c)
    return ax, kind, groups, eps, thr


def subsample_size(thr: Thresholds, num_samples: int, m: int) -> int:
    """Values per plane the kurtosis subsample takes (``noise.subsample_planes``' k):
    ``kurtosis_sample`` chunks of 16 values over the whole batch, at least one a plane."""
    return max(1, -(-min(thr.kurtosis_sample * 16, num_samples * m) // num_samples))


def batch_report(shape: tuple, mu: np.ndarray, m2: np.ndarray, m: int, sub: np.ndarray,
                 eps: float, thr: Thresholds) -> rep.BatchStatsReport:
    """The ``kind="batch"`` report from per-sample moments.

    ``mu``, ``m2``: (N, C) float64 mean and M2 of each sample's ``m`` values of each
    channel; ``sub``: (N, C, k) float64, ``noise.subsample_planes`` of the (N, C, m)
    planes with ``k = subsample_size(thr, N, m)`` (unused, may be empty, when m <= 3).
    """
    big_n, c = mu.shape
    beta_w = noise.within_kurtosis(sub, mu, m2, m, 2)
    st = noise.Structure(mu, m2, m, beta_w)
    n_eff, mse, vse, bias = st.noise()
    single = big_n == 1 and m > 1
    if single:                       # the between-sample part cannot be measured
        n_eff, mse = np.full(c, np.nan), np.full(c, np.nan)
    fin, zero = rep._finite_and_zero(st.mean, st.var, eps, thr)
    valid = fin & ~zero
    n = big_n * m
    reasons = rep._flag_reasons(fin, zero, eps, thr, "channel")
    noisy, noise_reasons = rep._noise_reasons(n, mse, vse, valid, thr, "channel")
    reasons += noise_reasons
    if single:
        reasons.append("a single sample: the batch statistics are this sample's own "
                       "(instance) statistics and the between-sample variation cannot be "
                       "measured; the variance is biased low by the unknown share rho")
    rec = ""
    if reasons:
        typical = (noise.typical_structure(st.lam, m, st.beta_w, st.het, st.beta_b, valid)
                   if valid.any() and (big_n > 1 or m == 1) else None)
        rec = advice.for_batch(c, big_n, m, typical, thr, zero.any(), not fin.all(),
                               noisy.any() or n < thr.min_values or single)
    return rep.BatchStatsReport(
        kind="batch", shape=tuple(shape), values_per_channel=n, num_samples=big_n,
        values_per_sample=m, n_eff=n_eff, n_eff_var=rep._n_eff_var(vse), rho=st.rho,
        mean_rel_se=mse, var_rel_se=vse, var_rel_bias=bias, kurtosis=beta_w,
        mean=st.mean, var=st.var, noisy=np.array(advice.worst_first(vse, noisy), np.intp),
        zero_var=np.flatnonzero(zero), nonfinite=np.flatnonzero(~fin),
        unstable=bool(reasons), reasons=reasons, recommendation=rec, thresholds=thr)


def per_sample_report(shape: tuple, c: int, kind: str, groups: int, mean: np.ndarray,
                      m2: np.ndarray, g: np.ndarray, n: int, eps: float,
                      thr: Thresholds) -> rep.BatchStatsReport:
    """The ``kind="instance"`` / ``"group"`` report from (N, G) float64 moments over the
    ``n`` values of each statistic: mean, M2 and the sample kurtosis
    ``g = n * sum(r^4) / M2^2`` (``noise.plane_kurtosis``)."""
    var = m2 / n
    if n > 3:         # bias-corrected, shrunk towards the normal 3
        beta = noise.shrink_kurtosis(g * (n + 1.0) / (n - 1.0), n)
    else:
        beta = np.full_like(mean, 3.0)
    vse = noise.per_statistic_cv(beta, n)
    mse = np.full_like(mean, 1.0 / math.sqrt(n))
    fin, zero = rep._finite_and_zero(mean, var, eps, thr)
    valid = fin & ~zero
    label = "(sample, channel)" if kind == "instance" else "(sample, group)"
    reasons = rep._flag_reasons(fin, zero, eps, thr, label)
    noisy, noise_reasons = rep._noise_reasons(n, mse, vse, valid, thr, label)
    reasons += noise_reasons
    rec = ""
    if reasons:
        rec = advice.for_per_sample(c, groups, n // (c // groups), n,
                                    noisy.any() or n < thr.min_values, zero.any(),
                                    not fin.all())
    return rep.BatchStatsReport(
        kind=kind, shape=tuple(shape), values_per_channel=n, num_samples=1,
        values_per_sample=n, n_eff=np.full_like(mean, float(n)), n_eff_var=rep._n_eff_var(vse),
        rho=np.full_like(mean, np.nan), mean_rel_se=mse, var_rel_se=vse,
        var_rel_bias=np.full_like(mean, -1.0 / n), kurtosis=beta, mean=mean, var=var,
        noisy=np.array(advice.worst_first(vse.ravel(), noisy.ravel()), dtype=np.intp),
        zero_var=np.flatnonzero(zero), nonfinite=np.flatnonzero(~fin),
        unstable=bool(reasons), reasons=reasons, recommendation=rec, thresholds=thr)
