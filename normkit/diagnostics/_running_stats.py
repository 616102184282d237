"""``check_running_stats``: eval-time drift and convergence of a layer's running statistics."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from . import _advice as advice
from . import _checks as checks
from . import _layer_state as layer_state
from . import _noise_model as noise
from ._config import resolve
from ._report import BatchStatsReport, batch_stats_report


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
        """The check as text (also what ``str()`` and ``print()`` give)."""
        shift, ratio = np.abs(self.mean_shift), self.var_ratio
        med, low, top = (functools.partial(noise.finite_stat, fn)
                         for fn in (np.median, np.min, np.max))
        lines = [f"running statistics check of {self.layer}: "
                 + ("UNSTABLE" if self.unstable else "ok"),
                 (f"  batches tracked {self.num_batches_tracked}, momentum {self.momentum}, "
                  f"weight left on the initial values {self.init_weight:.3g}"
                  if self.init_weight is not None else
                  "  convergence: not tracked (no num_batches_tracked, as torch's InstanceNorm)"),
                 f"  |mean shift| median {med(shift):.3f} running std, max {top(shift):.3f}",
                 f"  variance ratio median {med(ratio):.3f}, range [{low(ratio):.3f}, "
                 f"{top(ratio):.3f}]"]
        if self.running_var_rel_se is not None:
            lines.append("  relative noise of the running variance ~ "
                         f"{self.running_var_rel_se:.3f}")
        return advice.with_reasons(lines, self.reasons, self.recommendation)

    __str__ = summary

    def __repr__(self):
        return f"<RunningStatsReport {self.layer} unstable={self.unstable}>"


def drift_threshold(drift_z, df):
    """The |z| a batch whose standard errors rest on ``df`` degrees of freedom must
    exceed: the Student-t quantile at the normal level Phi(drift_z); inf for df < 1."""
    if df < 1:
        return math.inf
    # imported here, not with normkit: it takes ~0.5 s and only this check needs it
    from scipy import special
    return float(special.stdtrit(df, special.ndtr(drift_z)))


@checks.quiet_floating_point
def check_running_stats(layer: Any, x: ArrayLike, *, warn: bool = True) -> RunningStatsReport:
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
    warn = checks.as_flag(warn, "warn")
    rm, rv, eps, ax = _running_layer(layer)
    x = checks.as_data(x)
    ax = checks.as_axis(ax, x.shape, "the layer's axis")
    if x.shape[ax] != rm.shape[0]:
        raise ValueError(f"x: expected {rm.shape[0]} channels on axis {ax} (the layer's "
                         f"num_features), got {x.shape[ax]} (input shape {x.shape})")
    thr = resolve(getattr(layer, "diagnostics", None)).replace(enabled=True)
    instance = type(layer).__name__ == "InstanceNorm"
    batch = (_instance_batch if instance else _batch_batch)(layer, x, ax, eps, thr)
    drift = _drift(batch, rm.astype(np.float64), rv.astype(np.float64), eps, thr)
    report = _assemble(layer, thr, instance, batch, drift)
    if warn and report.unstable:
        layer_state.warn_eval(layer, thr, report.reasons, report.recommendation,
                              drift["causes"])
    return report


def _running_layer(layer):
    """(running_mean, running_var, eps, axis) of a layer with running statistics."""
    if not all(hasattr(layer, a) for a in ("running_mean", "running_var", "eps")):
        raise TypeError("layer: expected a normkit BatchNorm or InstanceNorm layer, got "
                        f"{type(layer).__name__}")
    rm, rv = layer.running_mean, layer.running_var
    if rm is None or rv is None:
        raise ValueError(f"layer: {advice.layer_label(layer)} does not track running "
                         "statistics (track_running_stats=False): it normalizes with batch "
                         "statistics in eval mode too; use batch_stats_report instead")
    return rm, rv, checks.as_eps(layer.eps, "layer.eps"), getattr(layer, "axis", 1)


def _instance_batch(layer, x, ax, eps, thr):
    """The batch average of the instance statistics, with standard errors across the
    N instances (N - 1 degrees of freedom: Student-t threshold)."""
    big_n, c = x.shape[0], x.shape[ax]
    rep = batch_stats_report(x, axis=ax, kind="instance", eps=eps, thresholds=thr)
    n = rep.values_per_channel
    means, uvars = rep.mean, rep.var * n / max(n - 1, 1)
    bvar = uvars.mean(axis=0)
    if big_n > 1:
        se_mean = means.std(axis=0, ddof=1) / math.sqrt(big_n)
        se_logvar = uvars.std(axis=0, ddof=1) / math.sqrt(big_n) / bvar
    else:
        se_mean = se_logvar = np.full(c, np.nan)
    return dict(rep=rep, mean=means.mean(axis=0), var=bvar, se_mean=se_mean,
                se_logvar=se_logvar, z_crit=drift_threshold(thr.drift_z, big_n - 1))


def _batch_batch(layer, x, ax, eps, thr):
    """The batch statistics with their standard errors: from the structure pooled in
    training when the layer has one (normal threshold), else from this batch alone
    (its between-sample part rests on N - 1 degrees of freedom: Student-t threshold)."""
    big_n, c = x.shape[0], x.shape[ax]
    rep = batch_stats_report(x, axis=ax, kind="batch", eps=eps, thresholds=thr)
    n = rep.values_per_channel
    mse, vse = rep.mean_rel_se, rep.var_rel_se
    z_crit = drift_threshold(thr.drift_z, big_n - 1)
    state = getattr(layer, "_diag_state", None)
    pool = None if state is None else state.pool
    if pool is not None and pool["lam"].shape == (c,) and ax != 0:
        _, mse, vse, _ = noise.expected_noise(state.pooled_rho(), rep.values_per_sample,
                                              big_n, pool["beta_w"], pool["het"],
                                              pool["beta_b"])
        z_crit = thr.drift_z
    bvar = rep.var * n / max(n - 1, 1)
    return dict(rep=rep, mean=rep.mean, var=bvar, se_mean=mse * np.sqrt(bvar),
                se_logvar=vse, z_crit=z_crit)


def _drift(b, rm64, rv64, eps, thr):
    """Per-channel shift, variance ratio, z scores, drifting channels and reasons."""
    shift = (b["mean"] - rm64) / np.sqrt(rv64 + eps)
    ratio = (b["var"] + eps) / (rv64 + eps)
    log_ratio = np.log(ratio)
    mean_z = (b["mean"] - rm64) / b["se_mean"]
    var_z = log_ratio / b["se_logvar"]
    drift = (((np.abs(shift) > thr.drift_mean) & (np.abs(mean_z) > b["z_crit"]))
             | ((np.abs(log_ratio) > math.log(thr.drift_var_ratio))
                & (np.abs(var_z) > b["z_crit"])))
    finite = np.isfinite(shift) & np.isfinite(ratio)
    drift &= finite
    score = np.maximum(np.abs(shift) / thr.drift_mean,
                       np.abs(log_ratio) / math.log(thr.drift_var_ratio))
    drifting = advice.worst_first(score, drift)
    reasons, rec, causes = [], [], set()
    if not (np.isfinite(rm64).all() and np.isfinite(rv64).all()):
        bad = np.flatnonzero(~(np.isfinite(rm64) & np.isfinite(rv64)))
        reasons.append(f"non-finite running statistics in channels {advice.fmt_channels(bad)}")
        rec.append("reset the running statistics (reset_running_stats()) and recalibrate them")
        causes.add("nonfinite")
    valid = int(finite.sum())
    if drifting and len(drifting) > thr.channel_fraction * max(valid, 1):
        reasons.append(
            f"drift in {len(drifting)} of {valid} channels between this batch and the "
            f"running statistics; worst channels: "
            + ", ".join(f"{i} (mean shift {shift[i]:+.2f} std, variance x{ratio[i]:.2f})"
                        for i in drifting[:5]))
        rec.append(f"recalibrate the running statistics on data like this "
                   f"({advice.recalibration_hint()}), or check that eval preprocessing "
                   "matches training")
        causes.add("drift")
    return dict(shift=shift, ratio=ratio, mean_z=mean_z, var_z=var_z, drifting=drifting,
                reasons=reasons, rec=rec, causes=causes)


def _initial_weight(nbt, momentum, thr):
    """(weight left on the initial values, batches needed to converge) of the running
    average after ``nbt`` batches with ``momentum`` (None: cumulative average)."""
    if momentum is None or momentum >= 1:
        return (0.0 if nbt >= 1 else 1.0), 1
    if momentum <= 0:
        return 1.0, None
    return ((1.0 - momentum) ** nbt,
            math.ceil(math.log(thr.converge_tol) / math.log(1.0 - momentum)))


def _convergence(layer, thr, instance, drift):
    """(num_batches_tracked, momentum, init weight, batches needed, converged); adds the
    not-converged reason to ``drift``. InstanceNorm does not count batches (as torch)."""
    nbt = getattr(layer, "num_batches_tracked", None)
    momentum = getattr(layer, "momentum", None)
    if nbt is None or instance:
        return nbt, momentum, None, None, None
    init_w, needed = _initial_weight(nbt, momentum, thr)
    converged = init_w < thr.converge_tol
    if not converged:
        drift["reasons"].append(
            f"running statistics not converged: {nbt} batches tracked; with momentum "
            f"{momentum} the initial values (mean 0, variance 1) still weigh "
            f"{init_w:.0%} (converged below {thr.converge_tol:.0%} after "
            f"{needed if needed is not None else 'never'} batches)")
        drift["rec"].append(f"train for more batches before evaluating, or recalibrate "
                            f"({advice.recalibration_hint()})")
        drift["causes"].add("unconverged")
    return nbt, momentum, init_w, needed, converged


def _assemble(layer, thr, instance, b, drift):
    nbt, momentum, init_w, needed, converged = _convergence(layer, thr, instance, drift)
    state = getattr(layer, "_diag_state", None)
    run_se = None
    if state is not None and state.last_var_rel_se is not None and not instance:
        mom = 1.0 / max(nbt or 1, 1) if momentum is None else momentum
        run_se = float(state.last_var_rel_se * math.sqrt(mom / (2.0 - mom)))
    return RunningStatsReport(
        layer=advice.layer_label(layer), mean_shift=drift["shift"], var_ratio=drift["ratio"],
        mean_z=drift["mean_z"], var_z=drift["var_z"],
        drifting=np.array(drift["drifting"], dtype=np.intp), z_threshold=b["z_crit"],
        num_batches_tracked=nbt, momentum=momentum, init_weight=init_w,
        batches_needed=needed, converged=converged, running_var_rel_se=run_se,
        batch=b["rep"], unstable=bool(drift["reasons"]), reasons=drift["reasons"],
        recommendation="; ".join(drift["rec"]))
