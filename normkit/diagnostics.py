"""Small-batch diagnostics: when batch statistics are too noisy to trust, in numbers.

What this module measures (formulas, assumptions and limits: ``docs/diagnostics.md``)
---------------------------------------------------------------------------------
A BatchNorm channel is normalized with the mean and the (biased) variance of the
``n = N * m`` values it sees in one batch: ``N`` samples with ``m`` values each (the
spatial positions). Values of one sample are correlated, so the batch is treated as a
one-way random-effects design, ``x_ij = mu + a_i + e_ij`` with a between-sample
component ``sb2 = Var(a_i)`` and a within-sample component ``sw2 = Var(e_ij)``:

* intra-sample correlation ``rho = sb2 / (sb2 + sw2)`` by one-way ANOVA on the
  per-sample channel means and M2 (the forward pass already has them), clipped to [0, 1];
* ``n_eff = n / (1 + (m - 1) * rho)`` (Kish's design effect), and
  ``mean_rel_se = 1 / sqrt(n_eff)``: the standard error of the batch mean in units of
  the channel's standard deviation (exact under the model);
* ``var_rel_se``: the standard deviation of the batch variance over batches, relative to
  its expected value. The batch variance splits exactly into a within part ``W`` (mean
  of the per-sample variances) and a between part ``B`` (variance of the per-sample
  means); ``B`` rests on N - 1 degrees of freedom only, whatever ``m`` is, which is why
  the variance is noisier than the Kish ``n_eff`` suggests when N is small and ``rho``
  is large, and *less* noisy than ``sqrt(2 / (n_eff - 1))`` otherwise. The within part
  uses a kurtosis estimated on a strided subsample (corrected and shrunk towards 3), and
  an empirical term for samples whose variances differ more than the model allows.

Layers: ``BatchNorm`` and ``InstanceNorm`` (input statistics) call into this module in
training mode and warn with :class:`UnstableBatchStatisticsWarning`. The cheap checks
(non-finite values, near-zero variances) run on every step from the statistics the
forward returns; the full analysis runs on the first ``warmup_checks`` steps, every
``check_every`` steps after that and whenever the batch shape changes, so its cost is
amortized. Repeated warnings of one layer and cause are rate-limited
(``warn_every``). ``configure`` sets thresholds globally, ``diagnostics=`` on a layer
per layer (``False`` turns it off: no extra work at all).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings

import numpy as np

__all__ = [
    "UnstableBatchStatisticsWarning", "Thresholds", "BatchStatsReport",
    "RunningStatsReport", "batch_stats_report", "check_running_stats", "configure",
    "get_config", "reset_config",
]


class UnstableBatchStatisticsWarning(UserWarning):
    """Batch statistics computed in training mode are too noisy to trust."""


# ====================================================================== thresholds
@dataclasses.dataclass(frozen=True)
class Thresholds:
    """When statistics count as unstable, and how often layers check and warn.

    Attributes
    ----------
    enabled : bool
        Layers run the diagnostics in training mode (default True; the environment
        variable ``NORMKIT_DIAGNOSTICS=0`` turns the global default off).
    max_var_rel_se : float
        A channel is noisy when the relative standard error of its batch variance is
        above this (0.4: about 13 independent normal values).
    max_mean_rel_se : float
        ... or when the standard error of its batch mean, in units of its standard
        deviation, is above this (0.25: n_eff below 16).
    min_values : int
        Fewer values per statistic than this is always reported.
    channel_fraction : float
        The noise causes are reported when more than this fraction of the (finite,
        non-constant) channels is noisy. Non-finite and near-zero-variance channels
        are reported when there is any.
    near_zero_var : float or None
        A channel whose variance is ``<= near_zero_var * eps`` is dominated by eps
        (None: not checked).
    warn_every : int or None
        Steps (training forward calls of that layer) between two warnings of the same
        layer and cause; None warns once per layer and cause.
    check_every : int
        Steps between two full analyses once the warm-up is over.
    warmup_checks : int
        The first this-many training steps of a layer are all fully analysed.
    ema : float
        Weight of the newest analysis in the per-layer pooled estimates of ``rho`` and
        the kurtosis (the first ``1 / ema`` analyses are averaged equally).
    kurtosis_sample : int
        Values per channel of the strided subsample the kurtosis is estimated on.
    drift_mean : float
        Eval check: a channel drifts when its batch mean is more than this many
        running standard deviations from the running mean ...
    drift_var_ratio : float
        ... or its variance is more than this factor above or below the running one,
    drift_z : float
        ... and the difference is this many standard errors of the batch's own
        statistics away (so a noisy small batch alone does not count as drift).
    converge_tol : float
        Eval check: the running statistics count as converged when the weight left on
        their initial values, ``(1 - momentum) ** num_batches_tracked``, is below this.
    """

    enabled: bool = True
    max_var_rel_se: float = 0.4
    max_mean_rel_se: float = 0.25
    min_values: int = 8
    channel_fraction: float = 0.25
    near_zero_var: float | None = 1.0
    warn_every: int | None = 1000
    check_every: int = 100
    warmup_checks: int = 10
    ema: float = 0.1
    kurtosis_sample: int = 1024
    drift_mean: float = 0.5
    drift_var_ratio: float = 2.0
    drift_z: float = 3.0
    converge_tol: float = 0.05

    def __post_init__(self):
        for name in ("max_var_rel_se", "max_mean_rel_se", "drift_mean", "drift_z"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.channel_fraction < 1:
            raise ValueError(f"channel_fraction must be in [0, 1), got {self.channel_fraction!r}")
        if not 0 < self.ema <= 1:
            raise ValueError(f"ema must be in (0, 1], got {self.ema!r}")
        if not 0 < self.converge_tol < 1:
            raise ValueError(f"converge_tol must be in (0, 1), got {self.converge_tol!r}")
        if not self.drift_var_ratio > 1:
            raise ValueError(f"drift_var_ratio must be > 1, got {self.drift_var_ratio!r}")
        if self.near_zero_var is not None and not self.near_zero_var >= 0:
            raise ValueError(f"near_zero_var must be >= 0 or None, got {self.near_zero_var!r}")
        for name in ("min_values", "check_every", "warmup_checks", "kurtosis_sample"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 or (
                    v == 0 and name in ("check_every", "kurtosis_sample")):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.warn_every is not None and (isinstance(self.warn_every, bool) or not
                                            isinstance(self.warn_every, (int, np.integer))
                                            or self.warn_every < 1):
            raise ValueError(f"warn_every must be a positive int or None, got {self.warn_every!r}")

    def replace(self, **changes) -> "Thresholds":
        _check_keys(changes)
        return dataclasses.replace(self, **changes)


_FIELDS = frozenset(f.name for f in dataclasses.fields(Thresholds))


def _check_keys(changes):
    unknown = sorted(set(changes) - _FIELDS)
    if unknown:
        raise TypeError(f"unknown diagnostics setting(s) {unknown}; known: {sorted(_FIELDS)}")


def _env_default() -> Thresholds:
    env = os.environ.get("NORMKIT_DIAGNOSTICS", "").strip().lower()
    return Thresholds(enabled=env not in ("0", "off", "false", "no"))


_DEFAULT = _env_default()
_config = _DEFAULT


class _Restore:
    """What ``configure`` returns: use it as a context manager to undo the change."""

    def __init__(self, previous):
        self.previous = previous

    def __enter__(self):
        return get_config()

    def __exit__(self, *exc):
        global _config
        _config = self.previous
        return False

    def __repr__(self):
        return f"<diagnostics configuration; previous: {self.previous!r}>"


def configure(**changes) -> _Restore:
    """Change the global thresholds (the fields of :class:`Thresholds`).

    Layers created with ``diagnostics=None`` (the default) follow the global setting,
    live. Returns an object that undoes the change when used as a context manager::

        normkit.diagnostics.configure(max_var_rel_se=0.3)          # from now on
        with normkit.diagnostics.configure(enabled=False):          # only inside
            ...
    """
    global _config
    previous = _config
    _config = previous.replace(**changes)
    return _Restore(previous)


def get_config() -> Thresholds:
    """The current global thresholds."""
    return _config


def reset_config() -> None:
    """Back to the defaults (and the ``NORMKIT_DIAGNOSTICS`` environment variable)."""
    global _config
    _config = _DEFAULT


def check_setting(setting):
    """Validate a layer's ``diagnostics=`` argument; returns it (dicts are copied)."""
    if setting is None or isinstance(setting, (bool, Thresholds)):
        return setting
    if isinstance(setting, dict):
        _check_keys(setting)
        _config.replace(**setting)          # values are validated now, not at step 1000
        return dict(setting)
    raise TypeError("diagnostics must be None (follow normkit.diagnostics.configure), "
                    "True, False, a dict of Thresholds fields or a Thresholds, got "
                    f"{type(setting).__name__}")


def _resolve(setting) -> Thresholds:
    if setting is None:
        return _config
    if setting is True:
        return _config if _config.enabled else _config.replace(enabled=True)
    if setting is False:
        return _config.replace(enabled=False)
    if isinstance(setting, Thresholds):
        return setting
    return _config.replace(**{"enabled": True, **setting})


# ====================================================================== statistics
_KURT_PRIOR = 8.0       # shrinkage towards 3: Var(kurtosis_hat) ~ 24 / K, prior variance 3
_KURT_MAX = 50.0
_LAM_MAX = 1e6          # sb2 / sw2 beyond this is rho = 1 for all purposes


def _shrink_kurtosis(beta_hat, count):
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


def _expected_noise(rho, m, n_samples, beta_w, het, beta_b):
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


class _Structure:
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
        d2 = mu - mean
        d2 *= d2
        sdd = d2.sum(axis=0)                                 # sum of (mu_i - mean)^2
        ssw = m2.sum(axis=0)                                 # within sum of squares
        var = (ssw + m * sdd) * (1.0 / (big_n * m))          # the biased batch variance
        self.mean, self.var = mean, var
        if m > 1:
            msw = ssw * (1.0 / (big_n * (m - 1.0)))
            if big_n > 1:                   # Var(per-sample means) - its within share
                sb2 = sdd * (1.0 / (big_n - 1.0)) - msw * (1.0 / m)
                pos = np.maximum(sb2, 0.0)
                self.rho = np.minimum(pos / (pos + msw), 1.0)
            else:
                sb2 = np.full_like(sdd, np.nan)
                self.rho = sb2
            # sb2 / sw2: linear in the between sum of squares (sw2 is estimated on
            # N (m - 1) degrees of freedom), so an average over steps is unbiased
            self.lam = np.minimum(sb2 / msw, _LAM_MAX)
        else:                               # one value per sample: no within part
            self.lam = np.full_like(sdd, _LAM_MAX)
            self.rho = np.full_like(sdd, np.nan)
        # per-sample variances spread more than the model allows (samples of different
        # scale, or spatial correlation inside a sample): the empirical term
        if m > 1 and big_n >= 3:
            w = m2 * (1.0 / m)
            wbar = w.mean(axis=0)
            w -= wbar
            w *= w
            emp = w.sum(axis=0) / (wbar * wbar) * (1.0 / (big_n - 1.0))
            excess = emp - _cv2_within(beta_w, m)
            het = np.where(emp > (emp - excess) * _chi2_ratio_upper(big_n - 1), excess, 0.0)
            self.het = np.nan_to_num(het, nan=0.0, posinf=0.0)
        else:
            self.het = np.zeros_like(sdd)
        # tails of the per-sample means (only measurable with enough samples)
        self.has_beta_b = big_n >= 8
        if self.has_beta_b:
            d2 *= d2
            g = d2.sum(axis=0) / (sdd * sdd) * big_n
            self.beta_b = _shrink_kurtosis(g * ((big_n + 1.0) / (big_n - 1.0)), big_n)
        else:
            self.beta_b = np.full_like(sdd, 3.0)

    def noise(self):
        return _expected_noise(self.rho, self.m, self.n_samples, self.beta_w, self.het,
                               self.beta_b)


def _within_kurtosis(sub, mu, m2, m_plane, axis):
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
    return _shrink_kurtosis(g * ((m_plane + 1.0) / (m_plane - 1.0)), cnt * k)


def _strided(n_total, k):
    """A step and count that pick about k of n_total values, spread over all of them."""
    if k >= n_total:
        return 1, n_total
    step = n_total // k
    if step > 1 and step % 2 == 0:
        step -= 1                 # odd: less aliasing with even row lengths
    return step, k


_CHUNK = 16      # values read together by the subsample: one 64-byte line of float32


def _subsample_planes(data, k):
    """About k values of every plane of data (P, C, S), as float64 (P, C, k').

    Reads chunks of ``_CHUNK`` consecutive values spread evenly over each plane: one
    cache line per chunk instead of one per value, so the subsample costs a small
    fraction of a pass over ``data``.
    """
    s = data.shape[2]
    if k >= s:
        return data.astype(np.float64)
    if s < 4 * _CHUNK or k < _CHUNK:
        step, k = _strided(s, k)
        return data[:, :, :step * k:step].astype(np.float64)
    nb = s // _CHUNK
    step, kb = _strided(nb, -(-k // _CHUNK))
    blocks = data[:, :, :nb * _CHUNK].reshape(data.shape[0], data.shape[1], nb, _CHUNK)
    sub = blocks[:, :, :step * kb:step, :].astype(np.float64)
    return sub.reshape(data.shape[0], data.shape[1], -1)


def _per_sample_moments(x, ax):
    """x as float64 (N, C, m), and its per-sample channel means and M2, (N, C) each."""
    xm = np.moveaxis(np.asarray(x, dtype=np.float64), ax, 1)
    n, c = xm.shape[:2]
    xm = xm.reshape(n, c, -1)
    with np.errstate(all="ignore"):
        mu = xm.mean(axis=2)
        m2 = ((xm - mu[:, :, None]) ** 2).sum(axis=2)
    return xm, mu, m2


# ====================================================================== reports
def _fmt_channels(idx, values=None, k=5, fmt="{:.2f}"):
    idx = list(idx)
    if not idx:
        return "none"
    shown = idx[:k]
    if values is None:
        s = ", ".join(str(i) for i in shown)
    else:
        s = ", ".join(f"{i} ({fmt.format(values[i])})" for i in shown)
    return s + (f", ... ({len(idx)} in all)" if len(idx) > k else "")


def _worst_first(values, mask):
    idx = np.flatnonzero(mask)
    order = np.argsort(-np.nan_to_num(values[idx], nan=np.inf))
    return [int(i) for i in idx[order]]


def suggest_groups(num_channels, values_per_channel_sample, min_values=64):
    """A GroupNorm group count: as in Wu & He (2018) at most 32 groups, at least two
    channels per group, and at least ``min_values`` values per (sample, group).
    None when no group count gives enough values (use LayerNorm then)."""
    c, m = int(num_channels), int(values_per_channel_sample)
    for g in range(min(32, c), 0, -1):
        if c % g == 0 and (c // g >= 2 or c == 1) and (c // g) * m >= min_values:
            return g
    return None


def _batch_needed(struct_med, thr, current, limit=4096):
    """Smallest batch whose expected noise (typical channel) is under the thresholds,
    None beyond ``limit``. The noise decreases with N: doubling, then bisection."""
    rho, m, beta_w, het, beta_b = struct_med
    args = (np.array([beta_w]), np.array([het]), np.array([beta_b]))

    def ok(big_n):
        _, mse, vse, _ = _expected_noise(np.array([rho]), m, big_n, *args)
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


@dataclasses.dataclass(repr=False)
class BatchStatsReport:
    """How far the statistics a normalization layer computes from one batch can be trusted.

    Per-statistic arrays have shape (C,) for ``kind="batch"`` and (N, C) / (N, G) for
    ``kind="instance"`` / ``"group"``.
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
        med = lambda a: float(np.nanmedian(a)) if np.isfinite(a).any() else float("nan")  # noqa: E731
        lines = [f"batch statistics report ({self.kind}, input {self.shape}): "
                 + ("UNSTABLE" if self.unstable else "ok"),
                 f"  values per statistic n = {self.values_per_channel}"
                 + (f" ({self.num_samples} samples x {self.values_per_sample})"
                    if self.kind == "batch" else ""),
                 f"  n_eff (mean) median {med(self.n_eff):.4g}, min {np.nanmin(self.n_eff) if np.isfinite(self.n_eff).any() else float('nan'):.4g}"
                 f"; n_eff (variance) median {med(self.n_eff_var):.4g}",
                 f"  intra-sample correlation rho median {med(self.rho):.3f}",
                 f"  mean_rel_se median {med(self.mean_rel_se):.3f}, max "
                 f"{np.nanmax(self.mean_rel_se) if np.isfinite(self.mean_rel_se).any() else float('nan'):.3f}",
                 f"  var_rel_se  median {med(self.var_rel_se):.3f}, max "
                 f"{np.nanmax(self.var_rel_se) if np.isfinite(self.var_rel_se).any() else float('nan'):.3f}"
                 f"  (bias of the variance {med(self.var_rel_bias):+.1%})",
                 f"  kurtosis median {med(self.kurtosis):.2f}"]
        for r in self.reasons:
            lines.append(f"  - {r}")
        if self.recommendation:
            lines.append(f"  recommendation: {self.recommendation}")
        return "\n".join(lines)

    __str__ = summary

    def __repr__(self):
        return (f"<BatchStatsReport {self.kind} n={self.values_per_channel} "
                f"unstable={self.unstable} reasons={len(self.reasons)}>")


def _noise_reasons(n, mean_rel_se, var_rel_se, valid, thr, label):
    """(noisy mask, reasons) under the channel_fraction rule."""
    noisy = valid & ((var_rel_se > thr.max_var_rel_se) | (mean_rel_se > thr.max_mean_rel_se))
    reasons = []
    n_valid = int(valid.sum())
    if n < thr.min_values:
        reasons.append(f"too few values per {label}: n = {n} < min_values = {thr.min_values}")
    if n_valid and noisy.sum() > thr.channel_fraction * n_valid:
        flat = var_rel_se.ravel()
        worst = _worst_first(flat, noisy.ravel())
        if var_rel_se.ndim == 1:
            where = _fmt_channels(worst, flat)
        else:
            where = ", ".join(f"{tuple(int(v) for v in np.unravel_index(i, var_rel_se.shape))}"
                              f" ({flat[i]:.2f})" for i in worst[:5])
            where += f", ... ({len(worst)} in all)" if len(worst) > 5 else ""
        reasons.append(
            f"noisy statistics in {int(noisy.sum())} of {n_valid} {label} statistics: "
            f"var_rel_se median {np.nanmedian(var_rel_se[valid]):.2f} (threshold "
            f"{thr.max_var_rel_se}), mean_rel_se median "
            f"{np.nanmedian(mean_rel_se[valid]):.2f} (threshold {thr.max_mean_rel_se}); "
            f"worst (var_rel_se): {where}")
    return noisy, reasons


def batch_stats_report(x, *, axis=1, kind="batch", num_groups=None, eps=1e-5,
                       thresholds=None) -> BatchStatsReport:
    """Diagnose the statistics a normalization layer would compute from ``x``.

    Parameters
    ----------
    x : ndarray
        A batch, channels on ``axis``, samples on axis 0.
    axis : int
        Channel axis (1 for NCHW, -1 for channels-last).
    kind : {"batch", "instance", "group"}
        ``"batch"``: BatchNorm statistics, per channel over samples and positions.
        ``"instance"``: per (sample, channel); ``"group"``: per (sample, group) with
        ``num_groups``.
    eps : float
        The layer's eps, for the near-zero-variance check.
    thresholds : Thresholds or dict, optional
        Default: the global configuration.

    Returns
    -------
    BatchStatsReport
        ``values_per_channel``, ``n_eff``, ``mean_rel_se``, ``var_rel_se``,
        ``unstable``, ``reasons``, ``recommendation`` and more; ``print()`` it.
    """
    thr = _config if thresholds is None else (
        thresholds if isinstance(thresholds, Thresholds) else _config.replace(**thresholds))
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"x must be a float array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (N, C, ...), got shape {x.shape}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for input of shape {x.shape}")
    ax = axis % x.ndim
    if kind not in ("batch", "instance", "group"):
        raise ValueError(f"kind must be 'batch', 'instance' or 'group', got {kind!r}")
    if x.size == 0:
        raise ValueError(f"x is empty (shape {x.shape})")
    if kind == "batch":
        with np.errstate(all="ignore"):
            return _report_batch(x, ax, eps, thr)
    if ax == 0:
        raise ValueError(f"kind={kind!r}: the channel axis cannot be the batch axis 0")
    c = x.shape[ax]
    if kind == "instance":
        groups = c
    else:
        if num_groups is None or c % int(num_groups):
            raise ValueError(f"kind='group' needs num_groups dividing the {c} channels, "
                             f"got {num_groups!r}")
        groups = int(num_groups)
    with np.errstate(all="ignore"):
        return _report_per_sample(x, ax, kind, groups, eps, thr)


def _report_batch(x, ax, eps, thr):
    shape = x.shape
    c = shape[ax]
    if ax == 0:       # channels on the batch axis: no sample structure, every value alone
        xm = np.moveaxis(np.asarray(x, np.float64), 0, -1).reshape(-1, 1, c)
        xm = np.moveaxis(xm, 2, 1)
    else:
        xm = None
    if xm is None:
        xm, mu, m2 = _per_sample_moments(x, ax)
    else:
        mu = xm[:, :, 0]
        m2 = np.zeros_like(mu)
    big_n, _, m = xm.shape
    k = max(1, -(-min(thr.kurtosis_sample * 16, big_n * m) // big_n))
    beta_w = _within_kurtosis(_subsample_planes(xm, k), mu, m2, m, 2)
    st = _Structure(mu, m2, m, beta_w)
    n_eff, mse, vse, bias = st.noise()
    if big_n == 1 and m > 1:
        n_eff = np.full(c, np.nan)
        mse = np.full(c, np.nan)
    mean, var = st.mean, st.var
    fin = np.isfinite(mean) & np.isfinite(var)
    zero = fin & (var <= (thr.near_zero_var * eps)) if thr.near_zero_var is not None else np.zeros(c, bool)
    valid = fin & ~zero
    n = big_n * m
    noisy, reasons = _noise_reasons(n, mse, vse, valid, thr, "channel")
    if big_n == 1 and m > 1:
        reasons.append("a single sample: the batch statistics are this sample's own "
                       "(instance) statistics and the between-sample variation cannot be "
                       "measured; the variance is biased low by the unknown share rho")
    if zero.any():
        reasons.append(f"near-zero variance (<= {thr.near_zero_var} * eps = "
                       f"{(thr.near_zero_var or 0) * eps:.3g}) in channels "
                       f"{_fmt_channels(np.flatnonzero(zero))}: eps dominates their "
                       "normalization (dead or constant channels?)")
    if not fin.all():
        reasons.append(f"non-finite values (NaN/Inf) in channels "
                       f"{_fmt_channels(np.flatnonzero(~fin))}")
    with np.errstate(divide="ignore", invalid="ignore"):
        n_eff_var = 1.0 + 2.0 / (vse * vse)
    rec = ""
    if reasons:
        med = _median_structure(st, valid) if big_n > 1 or m == 1 else None
        rec = _recommend_batch(c, big_n, m, med, thr, zero.any(), not fin.all(), noisy.any()
                               or n < thr.min_values or (big_n == 1 and m > 1))
    return BatchStatsReport(
        kind="batch", shape=shape, values_per_channel=n, num_samples=big_n,
        values_per_sample=m, n_eff=n_eff, n_eff_var=n_eff_var, rho=st.rho,
        mean_rel_se=mse, var_rel_se=vse, var_rel_bias=bias, kurtosis=beta_w, mean=mean,
        var=var, noisy=np.array(_worst_first(vse, noisy), dtype=np.intp),
        zero_var=np.flatnonzero(zero), nonfinite=np.flatnonzero(~fin),
        unstable=bool(reasons), reasons=reasons, recommendation=rec, thresholds=thr)


def _typical_rho(lam, valid):
    """rho of a typical channel: from the channel average of the unclipped sb2 / sw2
    (each channel's estimate may rest on one degree of freedom; their mean does not,
    and is unbiased where a median of clipped values is not)."""
    lam = np.asarray(lam, dtype=np.float64)[valid]
    lam = lam[np.isfinite(lam)]
    if not lam.size:
        return 0.0
    l_bar = max(float(lam.mean()), 0.0)
    return l_bar / (1.0 + l_bar)


def _median_structure(st, valid):
    def med(a, default):
        a = np.asarray(a, dtype=np.float64)
        a = a[valid & np.isfinite(a)] if a.shape == valid.shape else a
        return float(np.median(a)) if a.size else default
    return (_typical_rho(st.lam, valid), st.m, med(st.beta_w, 3.0), med(st.het, 0.0),
            med(st.beta_b, 3.0))


def _recal_hint():
    import normkit
    if hasattr(normkit, "recalibrate"):
        return "normkit.recalibrate(model_forward, batches): exact statistics over many batches"
    return ("training-mode forwards without weight updates, momentum=None for an "
            "equal-weight average over >= 100 batches")


def _recommend_batch(c, big_n, m, med, thr, zero, nonfinite, noisy):
    parts = []
    if noisy:
        g = suggest_groups(c, m)
        if g is not None:
            parts.append(f"use GroupNorm(num_groups={g}, num_channels={c}): per-sample "
                         f"statistics over {c // g * m} values, independent of the batch size")
        else:
            parts.append(f"use LayerNorm or GroupNorm(1, {c}): per-sample statistics over "
                         f"the {c * m} values of each sample, independent of the batch size")
        need = _batch_needed(med, thr, big_n) if med is not None else None
        if need is None:
            parts.append("or a larger batch")
        else:
            at = f"at rho = {med[0]:.2f}, " if m > 1 else ""
            parts.append(f"or a batch of at least {need} samples ({at}the expected "
                         f"var_rel_se and mean_rel_se are then under "
                         f"{thr.max_var_rel_se} and {thr.max_mean_rel_se})")
        parts.append("or, if the batch cannot grow, freeze the statistics (keep a "
                     "pretrained BatchNorm in eval mode while fine-tuning) or recalibrate "
                     f"the running statistics on large batches after training "
                     f"({_recal_hint()}), or use batch renormalization "
                     "(BatchNorm(..., renorm=True), Ioffe 2017)")
    if zero:
        parts.append("check the near-constant channels (dead ReLUs, constant padding, "
                     "masked inputs); their outputs are scaled by up to 1/sqrt(eps)")
    if nonfinite:
        parts.append("find where the NaN/Inf come from (learning rate, overflow in "
                     "float16, bad inputs); in training they also poison the running "
                     "statistics: reset them (reset_running_stats()) once fixed")
    return "; ".join(parts)


def _report_per_sample(x, ax, kind, groups, eps, thr):
    shape = x.shape
    xm = np.moveaxis(np.asarray(x, np.float64), ax, 1)
    big_n, c = xm.shape[:2]
    xg = xm.reshape(big_n, groups, -1)
    n = xg.shape[2]
    with np.errstate(all="ignore"):
        mean = xg.mean(axis=2)
        r = xg - mean[:, :, None]
        r2 = r * r
        m2 = r2.sum(axis=2)
        var = m2 / n
        g = n * (r2 * r2).sum(axis=2) / (m2 * m2)
        beta_hat = g * (n + 1.0) / (n - 1.0) if n > 1 else np.full_like(mean, 3.0)
    beta = _shrink_kurtosis(beta_hat, n) if n > 3 else np.full_like(mean, 3.0)
    if n > 1:
        c_b = (beta * (n - 1.0) - (n - 3.0)) / (n * (n - 1.0))
        vse = np.sqrt(c_b)
    else:
        vse = np.full_like(mean, np.inf)
    mse = np.full_like(mean, 1.0 / math.sqrt(n))
    fin = np.isfinite(mean) & np.isfinite(var)
    zero = fin & (var <= (thr.near_zero_var * eps)) if thr.near_zero_var is not None else np.zeros_like(fin)
    valid = fin & ~zero
    label = "channel" if kind == "instance" else "group"
    noisy, reasons = _noise_reasons(n, mse, vse, valid, thr, f"(sample, {label})")
    if zero.any():
        reasons.append(f"near-zero variance (<= {thr.near_zero_var} * eps) in "
                       f"{int(zero.sum())} of {zero.size} (sample, {label}) "
                       f"statistics, e.g. {_fmt_pairs(np.argwhere(zero))}: eps dominates them")
    if not fin.all():
        reasons.append(f"non-finite values (NaN/Inf) in {int((~fin).sum())} statistics, "
                       f"e.g. {_fmt_pairs(np.argwhere(~fin))}")
    rec = ""
    if reasons:
        rec = _recommend_per_sample(kind, c, groups, n // (c // groups), n,
                                    noisy.any() or n < thr.min_values, zero.any(), not fin.all())
    with np.errstate(divide="ignore", invalid="ignore"):
        n_eff_var = 1.0 + 2.0 / (vse * vse)
    return BatchStatsReport(
        kind=kind, shape=shape, values_per_channel=n, num_samples=1, values_per_sample=n,
        n_eff=np.full_like(mean, float(n)), n_eff_var=n_eff_var,
        rho=np.full_like(mean, np.nan), mean_rel_se=mse, var_rel_se=vse,
        var_rel_bias=np.full_like(mean, -1.0 / n), kurtosis=beta, mean=mean, var=var,
        noisy=np.array(_worst_first(vse.ravel(), noisy.ravel()), dtype=np.intp),
        zero_var=np.flatnonzero(zero), nonfinite=np.flatnonzero(~fin),
        unstable=bool(reasons), reasons=reasons, recommendation=rec, thresholds=thr)


def _fmt_pairs(pairs, k=4):
    s = ", ".join(f"({int(a)}, {int(b)})" for a, b in pairs[:k])
    return s + (f", ... ({len(pairs)} in all)" if len(pairs) > k else "")


def _recommend_per_sample(kind, c, groups, s, n, noisy, zero, nonfinite):
    parts = []
    if noisy:
        fewer = [g for g in range(groups - 1, 0, -1) if c % g == 0 and groups % g == 0
                 and (c // g) * s >= 64]
        if fewer:
            parts.append(f"normalize over more values per statistic: GroupNorm(num_groups="
                         f"{fewer[0]}, num_channels={c}) uses {c // fewer[0] * s}")
        else:
            parts.append(f"per-sample statistics over {n} values are too few: use "
                         f"LayerNorm over (C, ...) / GroupNorm(1, {c}), or BatchNorm if "
                         "the batches are large")
    if zero:
        parts.append("constant regions (padding, masks, saturated activations) give "
                     "near-zero variances: raise eps or exclude them")
    if nonfinite:
        parts.append("find where the NaN/Inf come from")
    return "; ".join(parts)


# ====================================================================== eval check
def _normal_cdf(z):
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def _betacf(a, b, x):
    """Continued fraction of the regularized incomplete beta (Numerical Recipes)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-12:
            break
    return h


def _t_cdf(t, df):
    """CDF of Student's t with df degrees of freedom (no SciPy needed)."""
    x = df / (df + t * t)
    a, b = df / 2.0, 0.5
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(math.log(x) * a + math.log1p(-x) * b + lbeta)
    if x < (a + 1.0) / (a + b + 2.0):
        ib = front * _betacf(a, b, x) / a
    else:
        ib = 1.0 - front * _betacf(b, a, 1.0 - x) / b
    return 1.0 - 0.5 * ib if t > 0 else 0.5 * ib


def _t_quantile(p, df):
    """Quantile of Student's t (bisection on the CDF); inf for df < 1."""
    if df < 1:
        return math.inf
    if df > 1e6:
        lo, hi = 0.0, 40.0
        f = _normal_cdf
    else:
        lo, hi = 0.0, 1.0
        f = lambda t: _t_cdf(t, df)  # noqa: E731
        while f(hi) < p:
            hi *= 2.0
            if hi > 1e12:
                return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclasses.dataclass(repr=False)
class RunningStatsReport:
    """Eval-time check of a layer's running statistics against one batch."""

    layer: str
    mean_shift: np.ndarray        #: (batch mean - running mean) / running std
    var_ratio: np.ndarray         #: batch variance (unbiased) / running variance
    mean_z: np.ndarray            #: mean_shift in standard errors of the batch mean
    var_z: np.ndarray             #: log(var_ratio) in standard errors of the batch variance
    drifting: np.ndarray          #: channel indices, worst first
    z_threshold: float            #: z beyond which a difference exceeds the batch's own noise
    num_batches_tracked: int | None
    momentum: float | None
    init_weight: float | None     #: weight still on the initial (0, 1) statistics
    batches_needed: int | None    #: num_batches_tracked needed to converge
    converged: bool | None
    running_var_rel_se: float | None  #: noise of the running variance (from training checks)
    batch: BatchStatsReport
    unstable: bool
    reasons: list
    recommendation: str

    def summary(self) -> str:
        lines = [f"running statistics check of {self.layer}: "
                 + ("UNSTABLE" if self.unstable else "ok"),
                 (f"  batches tracked {self.num_batches_tracked}, momentum {self.momentum}, "
                  f"weight left on the initial values {self.init_weight:.3g}"
                  if self.init_weight is not None else
                  "  convergence: not tracked (no num_batches_tracked, as torch's InstanceNorm)"),
                 f"  |mean shift| median {np.nanmedian(np.abs(self.mean_shift)):.3f} running std, "
                 f"max {np.nanmax(np.abs(self.mean_shift)):.3f}",
                 f"  variance ratio median {np.nanmedian(self.var_ratio):.3f}, range "
                 f"[{np.nanmin(self.var_ratio):.3f}, {np.nanmax(self.var_ratio):.3f}]"]
        if self.running_var_rel_se is not None:
            lines.append(f"  relative noise of the running variance ~ {self.running_var_rel_se:.3f}")
        lines += [f"  - {r}" for r in self.reasons]
        if self.recommendation:
            lines.append(f"  recommendation: {self.recommendation}")
        return "\n".join(lines)

    __str__ = summary

    def __repr__(self):
        return f"<RunningStatsReport {self.layer} unstable={self.unstable}>"


def _layer_label(layer):
    kind = type(layer).__name__
    c = getattr(layer, "num_features", "?")
    name = getattr(layer, "name", None)
    return f"{kind} {name!r} ({c} channels)" if name else f"{kind}({c})"


def check_running_stats(layer, x, *, warn=True) -> RunningStatsReport:
    """Eval-time check: do ``layer``'s running statistics fit the batch ``x``, and have
    they seen enough batches to have converged?

    Works on ``BatchNorm`` and ``InstanceNorm`` layers that track running statistics.
    Drift: per channel, the batch mean's distance from the running mean (in running
    standard deviations) and the ratio of variances, counted only when both material
    (``drift_mean``, ``drift_var_ratio``) and beyond the batch's own noise
    (``drift_z`` standard errors, from the batch's n_eff). Convergence: the weight the
    exponential average still gives its initial values, ``(1 - momentum) **
    num_batches_tracked``, against ``converge_tol``.

    With ``warn=True`` an unstable result also warns with
    :class:`UnstableBatchStatisticsWarning` (rate-limited per layer and cause, like the
    training-time warnings).
    """
    rm, rv = getattr(layer, "running_mean", None), getattr(layer, "running_var", None)
    if rm is None or rv is None:
        raise ValueError(f"{_layer_label(layer)} does not track running statistics "
                         "(track_running_stats=False): it normalizes with batch "
                         "statistics in eval mode too; use batch_stats_report instead")
    thr = _resolve(getattr(layer, "diagnostics", None)).replace(enabled=True)
    eps = float(getattr(layer, "eps", 1e-5))
    ax = getattr(layer, "axis", 1)
    x = np.asarray(x)
    c = x.shape[ax]
    if c != rm.shape[0]:
        raise ValueError(f"x has {c} channels on axis {ax}, the layer {rm.shape[0]} "
                         f"(input shape {x.shape})")
    rm64, rv64 = rm.astype(np.float64), rv.astype(np.float64)
    instance = type(layer).__name__ == "InstanceNorm"
    big_n = x.shape[0]
    state = getattr(layer, "_diag_state", None)
    pool = None if state is None else state.pool
    # The standard errors below rest on N - 1 degrees of freedom (between samples), so
    # the z threshold becomes a Student-t quantile; with the variance structure pooled
    # over training steps (diagnostics on while training) it stays a normal quantile.
    z_crit = _t_quantile(_normal_cdf(thr.drift_z), big_n - 1)
    if instance:
        rep = batch_stats_report(x, axis=ax, kind="instance", eps=eps, thresholds=thr)
        n = rep.values_per_channel
        with np.errstate(all="ignore"):
            means, uvars = rep.mean, rep.var * n / max(n - 1, 1)
            bmean, bvar = means.mean(axis=0), uvars.mean(axis=0)
            se_mean = means.std(axis=0, ddof=1) / math.sqrt(big_n) if big_n > 1 else np.full(c, np.nan)
            se_logvar = (uvars.std(axis=0, ddof=1) / math.sqrt(big_n) / bvar
                         if big_n > 1 else np.full(c, np.nan))
    else:
        rep = batch_stats_report(x, axis=ax, kind="batch", eps=eps, thresholds=thr)
        n = rep.values_per_channel
        mse, vse = rep.mean_rel_se, rep.var_rel_se
        if pool is not None and pool["lam"].shape == (c,) and ax != 0:
            _, mse, vse, _ = _expected_noise(state.pooled_rho(), rep.values_per_sample,
                                             big_n, pool["beta_w"], pool["het"],
                                             pool["beta_b"])
            z_crit = thr.drift_z
        with np.errstate(all="ignore"):
            bmean = rep.mean
            bvar = rep.var * n / max(n - 1, 1)
            se_mean = mse * np.sqrt(bvar)
            se_logvar = vse
    with np.errstate(all="ignore"):
        rstd_run = np.sqrt(rv64 + eps)
        shift = (bmean - rm64) / rstd_run
        ratio = (bvar + eps) / (rv64 + eps)
        mean_z = (bmean - rm64) / se_mean
        var_z = np.log(ratio) / se_logvar
        z_ok_m = np.abs(mean_z) > z_crit
        z_ok_v = np.abs(var_z) > z_crit
        drift = (((np.abs(shift) > thr.drift_mean) & z_ok_m)
                 | ((np.abs(np.log(ratio)) > math.log(thr.drift_var_ratio)) & z_ok_v))
        drift &= np.isfinite(shift) & np.isfinite(ratio)
    score = np.maximum(np.abs(shift) / thr.drift_mean,
                       np.abs(np.log(ratio)) / math.log(thr.drift_var_ratio))
    drifting = _worst_first(score, drift)
    reasons, rec = [], []
    causes = set()
    if not (np.isfinite(rm64).all() and np.isfinite(rv64).all()):
        bad = np.flatnonzero(~(np.isfinite(rm64) & np.isfinite(rv64)))
        reasons.append(f"non-finite running statistics in channels {_fmt_channels(bad)}")
        rec.append("reset the running statistics (reset_running_stats()) and recalibrate them")
        causes.add("nonfinite")
    valid = int((np.isfinite(shift) & np.isfinite(ratio)).sum())
    if drifting and len(drifting) > thr.channel_fraction * max(valid, 1):
        reasons.append(
            f"drift in {len(drifting)} of {valid} channels between this batch and the "
            f"running statistics; worst channels: "
            + ", ".join(f"{i} (mean shift {shift[i]:+.2f} std, variance x{ratio[i]:.2f})"
                        for i in drifting[:5]))
        rec.append(f"recalibrate the running statistics on data like this ({_recal_hint()}), "
                   "or check that eval preprocessing matches training")
        causes.add("drift")
    nbt = getattr(layer, "num_batches_tracked", None)
    momentum = getattr(layer, "momentum", None)
    init_w = needed = converged = None
    if nbt is not None and not instance:
        if momentum is None:
            init_w = 0.0 if nbt >= 1 else 1.0
            needed = 1
        elif momentum <= 0:
            init_w, needed = 1.0, None
        elif momentum >= 1:
            init_w, needed = (0.0 if nbt >= 1 else 1.0), 1
        else:
            init_w = (1.0 - momentum) ** nbt
            needed = math.ceil(math.log(thr.converge_tol) / math.log(1.0 - momentum))
        converged = init_w < thr.converge_tol
        if not converged:
            reasons.append(
                f"running statistics not converged: {nbt} batches tracked; with momentum "
                f"{momentum} the initial values (mean 0, variance 1) still weigh "
                f"{init_w:.0%} (converged below {thr.converge_tol:.0%} after "
                f"{needed if needed is not None else 'never'} batches)")
            rec.append(f"train for more batches before evaluating, or recalibrate "
                       f"({_recal_hint()})")
            causes.add("unconverged")
    run_se = None
    if state is not None and state.last_var_rel_se is not None and not instance:
        mom = 1.0 / max(nbt or 1, 1) if momentum is None else momentum
        run_se = float(state.last_var_rel_se * math.sqrt(mom / (2.0 - mom)))
    report = RunningStatsReport(
        layer=_layer_label(layer), mean_shift=shift, var_ratio=ratio, mean_z=mean_z,
        var_z=var_z, drifting=np.array(drifting, dtype=np.intp), z_threshold=z_crit,
        num_batches_tracked=nbt,
        momentum=momentum, init_weight=init_w, batches_needed=needed, converged=converged,
        running_var_rel_se=run_se, batch=rep, unstable=bool(reasons), reasons=reasons,
        recommendation="; ".join(rec))
    if warn and reasons:
        st = _state(layer)
        st.eval_checks += 1
        due = [cz for cz in sorted(causes) if st.due("eval:" + cz, st.eval_checks, thr)]
        if due:
            _emit(f"{_layer_label(layer)} in eval mode: running statistics do not fit "
                  "this batch or have not converged:\n" + "\n".join(f"  - {r}" for r in reasons)
                  + f"\n  recommendation: {report.recommendation}")
    return report


# ====================================================================== layer hooks
_PKG_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _emit(message):
    """Warn, attributed to the first caller outside normkit (the user's forward call)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PKG_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UnstableBatchStatisticsWarning, stacklevel=level)


_functional = None


def _F():
    global _functional
    if _functional is None:
        from . import functional
        _functional = functional
    return _functional


def start(layer, x):
    """Called by a layer at the start of a training forward; None means no diagnostics.

    Returns the layer's state object, whose ``release()`` must run after the forward
    (also when it raised) and ``check(mean, rstd)`` after a successful one. With the
    layer's diagnostics off, the cost is this call and one attribute test.
    """
    setting = layer.diagnostics
    if setting is False:
        return None
    state = layer._diag_state
    if state is None:
        state = layer._diag_state = _LayerState(layer)
    thr = state.thr
    if state.src is not setting or state.cfg is not _config:
        thr = state.resolve(setting)
    if not thr.enabled:
        return None
    state.step = step = state.step + 1
    shape = getattr(x, "shape", None)
    full = (step <= thr.warmup_checks or (step - thr.warmup_checks) % thr.check_every == 0
            or shape != state.last_shape)
    state.full, state.x = full, x
    if full and state.capture:
        cap = _F()._capture
        cap.on, cap.value = True, None
    return state


def _state(layer):
    st = getattr(layer, "_diag_state", None)
    if st is None:
        st = _LayerState(layer)
        layer._diag_state = st
    return st


class _LayerState:
    """Per-layer diagnostics: step counter, rate limits, pooled structure, and the
    step in progress (a layer's forward is not re-entrant, so one object serves)."""

    def __init__(self, layer):
        self.layer = layer
        self.capture = type(layer).__name__ != "InstanceNorm"
        self.src = self.cfg = self.thr = None
        self.step = 0
        self.checks = 0
        self.eval_checks = 0
        self.last_shape = None        # input shape of the last full check
        self.warned = {}              # cause -> step of the last warning
        self.pool = None              # pooled per-channel structure arrays
        self.last_vse = None          # per-channel var_rel_se of the last full check
        self.gate = (None, None)      # (eps, rstd^2 sum gate)
        self.full, self.x = False, None

    # ---------------------------------------------------------------- settings
    def resolve(self, setting):
        self.src, self.cfg = setting, _config
        self.thr = _resolve(setting)
        self.gate = (None, None)
        return self.thr

    @property
    def last_var_rel_se(self):
        v = self.last_vse
        return None if v is None else _nanmed(v, None)

    def due(self, cause, step, thr):
        last = self.warned.get(cause)
        if last is not None and (thr.warn_every is None or step - last < thr.warn_every):
            return False
        self.warned[cause] = step
        return True

    # ---------------------------------------------------------------- per step
    def release(self):
        """Stop capturing the forward's per-sample moments (also when it raised)."""
        if self.full and self.capture:
            _F()._capture.on = False

    def _zero_limit(self, eps):
        """rstd at or above this means var <= near_zero_var * eps."""
        f = self.thr.near_zero_var
        if f is None or not eps > 0:
            return math.inf
        return 1.0 / math.sqrt((1.0 + f) * eps)

    def check(self, mean, rstd):
        """After the forward: cheap checks every step, the full analysis on check steps."""
        thr, eps = self.thr, self.layer.eps
        gate_eps, gate = self.gate
        if gate_eps != eps:
            gate = self._zero_limit(eps) ** 2
            self.gate = (eps, gate)
        # One small reduction covers both cheap checks: NaN/Inf in the input make rstd
        # NaN (and the sum with it), a near-constant channel makes rstd^2 >= the gate.
        r = rstd.reshape(-1)
        causes = {}
        if not r.dot(r) < gate:
            with np.errstate(all="ignore"):
                bad = ~np.isfinite(mean) | np.isnan(rstd)     # rstd = inf: eps = 0, var = 0
                if bad.any():
                    causes["nonfinite"] = bad
                if thr.near_zero_var is not None:
                    zero = ~bad & (rstd >= self._zero_limit(eps))
                    if zero.any():
                        causes["zero_var"] = zero
        kind = "batch" if mean.ndim == 1 else "instance"
        details = None
        if self.full:
            with np.errstate(all="ignore"):
                details = (self._full_batch(causes) if kind == "batch"
                           else self._full_instance(causes))
        x, self.x = self.x, None
        if not causes:
            return
        due = [cz for cz in causes if self.due(cz, self.step, thr)]
        if due:
            _emit(self._message(kind, due, causes, details, mean, x))

    # ---------------------------------------------------------------- full analyses
    def _full_batch(self, causes):
        cap = _F()._capture
        captured, cap.value = getattr(cap, "value", None), None
        if captured is None:            # empty input: nothing was computed
            return None
        be, view, pmean, pm2 = captured
        thr, big_n = self.thr, self.x.shape[0]
        c = view.c
        if view.layout == "first" and view.n % big_n == 0:
            p, m_plane = view.n, view.s
            sub = _subsample_planes(view.data, max(1, -(-thr.kurtosis_sample // p)))
            beta_w = _within_kurtosis(sub, pmean, pm2, m_plane, 2)
            if p != big_n:                           # several planes per sample: merge
                g = p // big_n
                mu, m2 = _merge(pmean.reshape(big_n, g, c), pm2.reshape(big_n, g, c), m_plane)
                m = g * m_plane
            else:
                mu, m2, m = pmean, pm2, m_plane
        else:
            if view.layout == "last" and big_n > 1 and view.s % big_n == 0 and view.s > big_n:
                # channels last: per-sample moments cost one extra reduction here
                m = view.s // big_n
                data = view.data.reshape(big_n, m, c)
                mu, m2 = be.channels_last_moments(data)
            else:                                    # (N, C) input, or channels on axis 0
                flat = (view.data.reshape(-1, c) if view.layout == "last"
                        else view.data.reshape(c, -1).T)
                data = flat.reshape(-1, 1, c)
                m = 1
                mu = flat.astype(np.float64)
                m2 = np.zeros_like(mu)
            step, k = _strided(m, max(1, -(-thr.kurtosis_sample // data.shape[0])))
            beta_w = (_within_kurtosis(data[:, :step * k:step, :].astype(np.float64), mu, m2,
                                       m, 1) if m > 3 else np.full(c, 3.0))
        n_samples = mu.shape[0]
        st = _Structure(mu, m2, m, beta_w)
        self.checks += 1
        self.last_shape = self.x.shape
        self.update_pool(st, thr.ema)
        pool = self.pool
        rho = self.pooled_rho()
        n_eff, mse, vse, bias = _expected_noise(rho, m, n_samples, pool["beta_w"],
                                                pool["het"], pool["beta_b"])
        valid = np.isfinite(st.var)
        if "zero_var" in causes:
            valid &= ~causes["zero_var"]
        self.last_vse = np.where(valid, vse, np.nan)
        n = n_samples * m
        noisy = valid & ((vse > thr.max_var_rel_se) | (mse > thr.max_mean_rel_se))
        if n < thr.min_values:
            causes["few_values"] = True
        n_noisy = np.count_nonzero(noisy)
        if n_noisy and n_noisy > thr.channel_fraction * np.count_nonzero(valid):
            causes["noisy"] = noisy
        if n_samples == 1 and m > 1:
            causes["single_sample"] = True
        return dict(n=n, n_samples=n_samples, m=m, n_eff=n_eff, mse=mse, vse=vse,
                    bias=bias, rho=rho, valid=valid, noisy=noisy, pool=pool)

    def _full_instance(self, causes):
        layer, thr, x = self.layer, self.thr, np.asarray(self.x)
        ax = layer.axis % x.ndim
        big_n, c = x.shape[0], x.shape[ax]
        s = x.size // (big_n * c)
        self.checks += 1
        self.last_shape = x.shape
        # kurtosis per channel from a strided subsample of each instance
        if x.flags.c_contiguous and ax == 1:
            sub = _subsample_planes(x.reshape(big_n, c, s),
                                    max(4, -(-thr.kurtosis_sample // big_n)))
        else:
            xm = np.moveaxis(x, ax, 1)
            sl = (slice(None), slice(None)) + tuple(
                slice(None, None, max(1, d // 8)) for d in xm.shape[2:])
            sub = np.asarray(xm[sl], dtype=np.float64).reshape(big_n, c, -1)
        kk = sub.shape[2]
        if kk > 3 and s > 3:
            r = sub - sub.mean(axis=2, keepdims=True)
            r *= r
            q2 = r.mean(axis=2)
            g = (r * r).mean(axis=2) / (q2 * q2)
            ok = np.isfinite(g)
            gm = np.where(ok, g, 0.0).sum(axis=0) / ok.sum(axis=0)
            beta = _shrink_kurtosis(gm * (kk + 1.0) / (kk - 1.0), big_n * kk)
        else:
            beta = np.full(c, 3.0)
        if s > 1:
            vse = np.sqrt((beta * (s - 1.0) - (s - 3.0)) / (s * (s - 1.0)))
        else:
            vse = np.full(c, np.inf)
        mse = np.full(c, 1.0 / math.sqrt(s))
        valid = np.ones(c, bool)
        if "nonfinite" in causes:
            valid &= ~causes["nonfinite"].any(axis=0)
        self.last_vse = np.where(valid, vse, np.nan)
        if s < thr.min_values:
            causes["few_values"] = True
        noisy = valid & ((vse > thr.max_var_rel_se) | (mse > thr.max_mean_rel_se))
        n_noisy = np.count_nonzero(noisy)
        if n_noisy and n_noisy > thr.channel_fraction * np.count_nonzero(valid):
            causes["noisy"] = noisy
        return dict(n=s, vse=vse, mse=mse, valid=valid, noisy=noisy)

    # ---------------------------------------------------------------- pooling
    def update_pool(self, st, a):
        """Fold one batch's structure into the per-layer pooled estimates (an EMA with
        weight ``a``, an equal-weight mean over the first 1 / a checks)."""
        new = {"lam": st.lam, "beta_w": st.beta_w, "het": st.het}
        if st.has_beta_b:
            new["beta_b"] = st.beta_b
        p = self.pool
        if p is None or p["lam"].shape != st.lam.shape:
            nan = np.full_like(st.lam, np.nan)
            p = self.pool = {"lam": nan, "beta_w": np.full_like(nan, 3.0),
                             "het": np.zeros_like(nan), "beta_b": np.full_like(nan, 3.0),
                             "n": 0}
        p["n"] += 1
        a = max(a, 1.0 / p["n"])
        for key, val in new.items():
            old = p[key]
            upd = old + a * (val - old)
            if not np.isfinite(upd.sum()):   # NaN channels: keep the old, or take the new
                upd = np.where(np.isfinite(val), np.where(np.isfinite(old), upd, val), old)
            p[key] = upd

    def pooled_rho(self):
        lam = np.maximum(self.pool["lam"], 0.0)
        return lam / (1.0 + lam)

    # ---------------------------------------------------------------- message
    def _message(self, kind, due, causes, d, mean, x):
        layer, thr = self.layer, self.thr
        label = _layer_label(layer)
        lines = [f"{label}: batch statistics in training mode cannot be trusted "
                 f"(step {self.step}; input {np.shape(x)}):"]
        recs = []
        if kind == "batch":
            c = mean.shape[0]
            if d is not None and ("noisy" in due or "few_values" in due or "single_sample" in due):
                vse, mse, n_eff = d["vse"], d["mse"], d["n_eff"]
                valid = d["valid"]
                worst = _worst_first(vse, d["noisy"] if d["noisy"].any() else valid)
                unknown = d["n_samples"] == 1 and not np.isfinite(self.pool["lam"]).any()
                if unknown:
                    lines.append(f"  - a single sample of {d['m']} values per channel: "
                                 "the batch statistics are its own (instance) statistics, "
                                 "and how much samples differ (rho) cannot be measured")
                elif d["m"] > 1:
                    rho_t = _typical_rho(self.pool["lam"], valid)
                    lines.append(
                        f"  - n = {d['n']} values per channel ({_count(d['n_samples'], 'sample')} x "
                        f"{d['m']}), but n_eff = {d['n'] / (1 + (d['m'] - 1) * rho_t):.3g} "
                        f"(intra-sample correlation rho = {rho_t:.2f}, channel average)")
                else:
                    lines.append(f"  - n = {d['n']} values per channel (one per sample)")
                if not unknown:
                    lines.append(
                        f"  - var_rel_se = {_nanmed(vse[valid], float('nan')):.2f} (median; "
                        f"threshold {thr.max_var_rel_se}), mean_rel_se = "
                        f"{_nanmed(mse[valid], float('nan')):.2f} (threshold "
                        f"{thr.max_mean_rel_se}); noisy in {int(d['noisy'].sum())} of "
                        f"{int(valid.sum())} channels; worst channels: "
                        + ", ".join(f"{i} (var_rel_se {vse[i]:.2f}, n_eff {n_eff[i]:.3g})"
                                    for i in worst[:5]))
                if "single_sample" in due and not unknown:
                    lines.append(f"  - a single sample: the batch statistics are its own "
                                 f"(instance) statistics; with rho = "
                                 f"{_typical_rho(self.pool['lam'], valid):.2f} measured on earlier "
                                 f"batches the variance is about "
                                 f"{-_nanmed(d['bias'][valid], 0.0):.0%} too small")
                if "few_values" in due:
                    lines.append(f"  - only {d['n']} values per channel (min_values = "
                                 f"{thr.min_values})")
                m = d["m"]
                pool, v = d["pool"], valid
                med = None if unknown else (
                    _typical_rho(pool["lam"], v), m, _nanmed(pool["beta_w"][v], 3.0),
                    _nanmed(pool["het"][v], 0.0), _nanmed(pool["beta_b"][v], 3.0))
                recs.append(_recommend_batch(c, d["n_samples"], m, med, thr, False,
                                             False, True))
            if "zero_var" in due:
                idx = np.flatnonzero(causes["zero_var"])
                lines.append(f"  - near-zero variance (<= {thr.near_zero_var} * eps = "
                             f"{thr.near_zero_var * layer.eps:.3g}) in channels "
                             f"{_fmt_channels(idx)}: eps dominates their normalization")
                recs.append(_recommend_batch(c, 0, 1, None, thr, True, False, False))
            if "nonfinite" in due:
                idx = np.flatnonzero(causes["nonfinite"])
                lines.append(f"  - non-finite batch statistics (NaN/Inf in the input) in "
                             f"channels {_fmt_channels(idx)}")
                recs.append(_recommend_batch(c, 0, 1, None, thr, False, True, False))
        else:
            c = mean.shape[1]
            if d is not None and ("noisy" in due or "few_values" in due):
                lines.append(
                    f"  - only n = {d['n']} values per instance: var_rel_se = "
                    f"{float(np.median(d['vse'])):.2f} (threshold {thr.max_var_rel_se}), "
                    f"mean_rel_se = {float(d['mse'][0]):.2f} (threshold "
                    f"{thr.max_mean_rel_se})")
            if "zero_var" in due:
                pairs = np.argwhere(causes["zero_var"])
                lines.append(f"  - near-zero variance (<= {thr.near_zero_var} * eps) in "
                             f"{len(pairs)} of {causes['zero_var'].size} instances, e.g. "
                             f"(sample, channel) {_fmt_pairs(pairs)}")
            if "nonfinite" in due:
                pairs = np.argwhere(causes["nonfinite"])
                lines.append(f"  - non-finite statistics (NaN/Inf in the input) in "
                             f"{len(pairs)} instances, e.g. {_fmt_pairs(pairs)}")
            recs.append(_recommend_per_sample(
                "instance", c, c, d["n"] if d else 1, d["n"] if d else 1,
                "noisy" in due or "few_values" in due, "zero_var" in due,
                "nonfinite" in due))
        rec = "; ".join(r for r in recs if r)
        if rec:
            lines.append(f"  recommendation: {rec}")
        if thr.warn_every is None:
            lines.append("  (reported once per layer and cause)")
        else:
            lines.append(f"  (repeated at most every {thr.warn_every} steps per cause; "
                         "normkit.diagnostics.configure(...) or diagnostics= on the layer "
                         "to change or silence)")
        return "\n".join(lines)


def _count(k, what):
    return f"{k} {what}" + ("" if k == 1 else "s")


def _nanmed(a, default):
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else default


def _merge(mean, m2, count):
    """Chan's merge of equal-count partial moments along axis 1: (N, G, C) -> (N, C)."""
    gmean = mean.mean(axis=1)
    with np.errstate(all="ignore"):
        gm2 = m2.sum(axis=1) + count * ((mean - gmean[:, None, :]) ** 2).sum(axis=1)
    return gmean, gm2
