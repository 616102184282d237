"""``batch_stats_report``: how far the statistics of one batch can be trusted."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from numpy.typing import ArrayLike

from ..dask import _hook as dask_hook
from . import _advice as advice
from . import _checks as checks
from . import _from_moments as from_moments
from . import _noise_model as noise
from ._config import Thresholds


@dataclasses.dataclass(repr=False)
class BatchStatsReport:
    """How far the statistics a normalization layer computes from one batch can be trusted.

    Per-statistic arrays are float64, of shape (C,) for ``kind="batch"`` and (N, C) /
    (N, G) for ``kind="instance"`` / ``"group"``.
    """

    kind: str
    shape: tuple
    values_per_channel: int          #: n: values behind one statistic
    num_samples: int                 #: N (batch) / 1 (instance, group)
    values_per_sample: int           #: m: values of one sample in one statistic
    n_eff: np.ndarray                #: Kish effective sample size of the mean
    n_eff_var: np.ndarray            #: i.i.d. normal values with the same var_rel_se
    rho: np.ndarray                  #: intra-sample correlation (NaN where undefined)
    mean_rel_se: np.ndarray          #: SE of the mean / channel std
    var_rel_se: np.ndarray           #: SD of the variance / its expectation
    var_rel_bias: np.ndarray         #: E[batch variance] / population variance - 1
    kurtosis: np.ndarray             #: within-sample kurtosis used (3 = normal)
    mean: np.ndarray                 #: the statistics themselves
    var: np.ndarray
    noisy: np.ndarray                #: indices (flat) of noisy statistics, worst first
    zero_var: np.ndarray             #: indices (flat) with variance <= near_zero_var * eps
    nonfinite: np.ndarray            #: indices (flat) with NaN/Inf
    unstable: bool
    reasons: list
    recommendation: str
    thresholds: Thresholds

    def summary(self) -> str:
        """The report as text (also what ``str()`` and ``print()`` give)."""
        def med(a):
            return noise.finite_stat(np.median, a)

        def top(a):
            return noise.finite_stat(np.max, a)
        per = (f" ({self.num_samples} samples x {self.values_per_sample})"
               if self.kind == "batch" else "")
        lines = [f"batch statistics report ({self.kind}, input {self.shape}): "
                 + ("UNSTABLE" if self.unstable else "ok"),
                 f"  values per statistic n = {self.values_per_channel}{per}",
                 f"  n_eff (mean) median {med(self.n_eff):.4g}, min "
                 f"{noise.finite_stat(np.min, self.n_eff):.4g}; n_eff (variance) median "
                 f"{med(self.n_eff_var):.4g}",
                 f"  intra-sample correlation rho median {med(self.rho):.3f}",
                 f"  mean_rel_se median {med(self.mean_rel_se):.3f}, max "
                 f"{top(self.mean_rel_se):.3f}",
                 f"  var_rel_se  median {med(self.var_rel_se):.3f}, max "
                 f"{top(self.var_rel_se):.3f}  (bias of the variance "
                 f"{med(self.var_rel_bias):+.1%})",
                 f"  kurtosis median {med(self.kurtosis):.2f}"]
        return advice.with_reasons(lines, self.reasons, self.recommendation)

    __str__ = summary

    def __repr__(self):
        return (f"<BatchStatsReport {self.kind} n={self.values_per_channel} "
                f"unstable={self.unstable} reasons={len(self.reasons)}>")


@checks.quiet_floating_point
def batch_stats_report(x: ArrayLike, *, axis: int = 1, kind: str = "batch",
                       num_groups: int | None = None, eps: float = 1e-5,
                       thresholds: Thresholds | dict | None = None) -> BatchStatsReport:
    """Diagnose the statistics a normalization layer would compute from ``x``.

    Parameters
    ----------
    x : array_like
        A batch, channels on ``axis``, samples on axis 0: float16, bfloat16, float32 or
        float64 (the statistics are computed in float64). Masked, complex, integer and
        object arrays are rejected with a TypeError.
    axis : int
        Channel axis (1 for NCHW, -1 for channels-last).
    kind : {"batch", "instance", "group"}
        ``"batch"``: BatchNorm statistics, per channel over samples and positions.
        ``"instance"``: per (sample, channel); ``"group"``: per (sample, group) with
        ``num_groups``.
    num_groups : int, optional
        The number of groups, for ``kind="group"`` only; must divide the channels.
    eps : float
        The layer's eps (>= 0), for the near-zero-variance check.
    thresholds : Thresholds or dict, optional
        Default: the global configuration.

    Returns
    -------
    BatchStatsReport
        ``values_per_channel``, ``n_eff``, ``mean_rel_se``, ``var_rel_se``,
        ``unstable``, ``reasons``, ``recommendation`` and more; ``print()`` it.
    """
    if dask_hook.is_dask(x):     # by blocks, from exact moments; x stays where it is
        from ..dask._report import batch_stats_report as by_blocks
        return by_blocks(x, axis=axis, kind=kind, num_groups=num_groups, eps=eps,
                         thresholds=thresholds)
    x = checks.as_data(x)
    ax, kind, groups, eps, thr = from_moments.check_arguments(x, axis, kind, num_groups,
                                                              eps, thresholds)
    if kind == "batch":
        return _report_batch(x, ax, eps, thr)
    return _report_per_sample(x, ax, kind, groups, eps, thr)


def _batch_planes(x, ax):
    """x as float64 (N, C, m) with per-sample means and M2. Channels on axis 0 leave no
    sample structure: every value is a sample of its own (m = 1)."""
    if ax != 0:
        return noise.per_sample_moments(x, ax)
    c = x.shape[0]
    xm = np.moveaxis(np.asarray(x, np.float64), 0, -1).reshape(-1, 1, c)
    xm = np.moveaxis(xm, 2, 1)
    mu = xm[:, :, 0]
    return xm, mu, np.zeros_like(mu)


def _finite_and_zero(mean, var, eps, thr):
    """Masks: finite statistics, and finite ones whose variance eps dominates."""
    fin = np.isfinite(mean) & np.isfinite(var)
    if thr.near_zero_var is None:
        return fin, np.zeros_like(fin)
    return fin, fin & (var <= thr.near_zero_var * eps)


def _n_eff_var(vse):
    """The number of i.i.d. normal values whose variance is as noisy."""
    return 1.0 + 2.0 / (vse * vse)


def _report_batch(x, ax, eps, thr):
    xm, mu, m2 = _batch_planes(x, ax)
    big_n, _, m = xm.shape
    sub = noise.subsample_planes(xm, from_moments.subsample_size(thr, big_n, m))
    return from_moments.batch_report(x.shape, mu, m2, m, sub, eps, thr)


def _where(mask, label):
    """The flagged statistics: channel indices (1-D) or (sample, channel/group) pairs."""
    if mask.ndim == 1:
        return f"channels {advice.fmt_channels(np.flatnonzero(mask))}"
    return (f"{int(mask.sum())} of {mask.size} {label} statistics, e.g. "
            f"{advice.fmt_pairs(np.argwhere(mask))}")


def _flag_reasons(fin, zero, eps, thr, label):
    """Reasons for non-finite (first: they void every other number) and near-zero
    variance statistics."""
    reasons = []
    if not fin.all():
        reasons.append(f"non-finite values (NaN/Inf) in {_where(~fin, label)}")
    if zero.any():
        reasons.append(f"near-zero variance (<= {thr.near_zero_var} * eps = "
                       f"{thr.near_zero_var * eps:.3g}) in {_where(zero, label)}: eps "
                       "dominates their normalization ("
                       + ("dead or constant channels?)" if zero.ndim == 1 else
                          "constant planes or groups?)"))
    return reasons


def _noise_reasons(n, mean_rel_se, var_rel_se, valid, thr, label):
    """(noisy mask, reasons) under the channel_fraction rule."""
    noisy = valid & ((var_rel_se > thr.max_var_rel_se) | (mean_rel_se > thr.max_mean_rel_se))
    reasons = []
    n_valid = int(valid.sum())
    if n < thr.min_values:
        reasons.append(f"too few values per {label}: n = {n} < min_values = {thr.min_values}")
    if n_valid and noisy.sum() > thr.channel_fraction * n_valid:
        flat = var_rel_se.ravel()
        worst = advice.worst_first(flat, noisy.ravel())
        if var_rel_se.ndim == 1:
            where = advice.fmt_channels(worst, flat)
        else:
            where = ", ".join(f"{tuple(int(v) for v in np.unravel_index(i, var_rel_se.shape))}"
                              f" ({flat[i]:.2f})" for i in worst[:5])
            where += f", ... ({len(worst)} in all)" if len(worst) > 5 else ""
        reasons.append(
            f"noisy statistics in {int(noisy.sum())} of {n_valid} {label} statistics: "
            f"var_rel_se median {noise.nanmed(var_rel_se[valid], math.nan):.2f} (threshold "
            f"{thr.max_var_rel_se}), mean_rel_se median "
            f"{noise.nanmed(mean_rel_se[valid], math.nan):.2f} (threshold "
            f"{thr.max_mean_rel_se}); worst (var_rel_se): {where}")
    return noisy, reasons


def _report_per_sample(x, ax, kind, groups, eps, thr):
    xm = np.moveaxis(np.asarray(x, np.float64), ax, 1)
    xg = xm.reshape(xm.shape[0], groups, -1)
    mean, m2, g = noise.plane_kurtosis(xg)
    return from_moments.per_sample_report(x.shape, x.shape[ax], kind, groups, mean, m2, g,
                                          xg.shape[2], eps, thr)
