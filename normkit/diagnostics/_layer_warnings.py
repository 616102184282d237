"""The text of the layers' warnings, and how they are issued.

Causes are listed in order of what to fix first: non-finite values (they make every
other number meaningless), near-constant channels, then the noise of the statistics.
A line is printed only when it has something to say (no empty fields).
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from types import FrameType

import numpy as np

from . import _advice as advice
from . import _noise_model as noise
from ._config import UnstableBatchStatisticsWarning

# normkit's own folder: frames in it are skipped when attributing a warning
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_NOISE_CAUSES = ("noisy", "few_values", "single_sample")


def emit(message):
    """Warn, attributed to the first caller outside normkit (the user's forward call)."""
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_PKG_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UnstableBatchStatisticsWarning, stacklevel=level)


def training_message(layer, step, shape, thr, due, causes, details, pool, num_channels):
    """The warning of one training step. ``causes`` maps cause -> channel mask (or
    True), ``due`` the causes whose rate limit lets them through, ``details`` the full
    analysis of this step (None on cheap-check steps), ``pool`` the pooled structure."""
    label = advice.layer_label(layer)
    where = f"(step {step}; input {shape})"
    if type(layer).__name__ == "InstanceNorm":
        head = (f"{label}: per-instance statistics (each sample's own mean and variance "
                f"per channel) in training mode cannot be trusted {where}:")
        lines, rec = _instance_lines(due, causes, details, thr, layer.eps, num_channels)
    else:
        head = f"{label}: batch statistics in training mode cannot be trusted {where}:"
        lines, rec = _batch_lines(due, causes, details, pool, thr, layer.eps, num_channels)
    lines.insert(0, head)
    if rec:
        lines.append(f"  recommendation: {rec}")
    lines.append(_rate_limit_note(thr))
    return "\n".join(lines)


def eval_message(layer, reasons, recommendation):
    return (f"{advice.layer_label(layer)} in eval mode: running statistics do not fit "
            "this batch or have not converged:\n" + "\n".join(f"  - {r}" for r in reasons)
            + f"\n  recommendation: {recommendation}")


def _rate_limit_note(thr):
    if thr.warn_every is None:
        return "  (reported once per layer and cause)"
    return (f"  (repeated at most every {thr.warn_every} steps per cause; "
            "normkit.diagnostics.configure(...) or diagnostics= on the layer to change "
            "or silence)")


def _flag_lines(due, causes, thr, eps, where):
    """Lines for the non-finite and near-zero-variance causes; ``where`` formats a mask."""
    lines = []
    if "nonfinite" in due:
        lines.append("  - non-finite statistics: NaN/Inf in the input in "
                     + where(causes["nonfinite"]))
    if "zero_var" in due:
        lines.append(f"  - near-zero variance (<= {thr.near_zero_var} * eps = "
                     f"{thr.near_zero_var * eps:.3g}) in {where(causes['zero_var'])}: "
                     "eps dominates their normalization")
    return lines


def _channels(mask):
    return f"channels {advice.fmt_channels(np.flatnonzero(mask))}"


def _instances(mask):
    pairs = np.argwhere(mask)
    return (f"{len(pairs)} of {mask.size} instances, e.g. (sample, channel) "
            f"{advice.fmt_pairs(pairs)}")


def _batch_lines(due, causes, d, pool, thr, eps, c):
    lines = _flag_lines(due, causes, thr, eps, _channels)
    noise_due = d is not None and any(cz in due for cz in _NOISE_CAUSES)
    structure = None
    if noise_due:
        more, structure = _batch_noise_lines(due, d, pool, thr)
        lines += more
    rec = advice.for_batch(c, d["n_samples"] if noise_due else 0, d["m"] if noise_due else 1,
                           structure, thr, "zero_var" in due, "nonfinite" in due, noise_due)
    return lines, rec


def _batch_noise_lines(due, d, pool, thr):
    """Lines on the noise of BatchNorm statistics, and the typical structure (None when
    it cannot be measured) for the batch-size advice."""
    valid, m, n = d["valid"], d["m"], d["n"]
    measured = valid.any()
    unknown = d["n_samples"] == 1 and not np.isfinite(pool["lam"]).any()
    rho_t = noise.typical_rho(pool["lam"], valid)
    lines = []
    if unknown:
        lines.append(f"  - a single sample of {m} values per channel: the batch statistics "
                     "are its own (instance) statistics, and how much samples differ (rho) "
                     "cannot be measured")
    elif m > 1 and measured:
        lines.append(f"  - n = {n} values per channel ({advice.count(d['n_samples'], 'sample')}"
                     f" x {m}), but n_eff = {n / (1 + (m - 1) * rho_t):.3g} (intra-sample "
                     f"correlation rho = {rho_t:.2f}, channel average)")
    elif m > 1:
        lines.append(f"  - n = {n} values per channel ({advice.count(d['n_samples'], 'sample')}"
                     f" x {m})")
    else:
        lines.append(f"  - n = {n} values per channel (one per sample)")
    if measured and not unknown:
        lines.append(_noisy_channels_line(d, thr))
        if "single_sample" in due:
            lines.append(f"  - a single sample: the batch statistics are its own (instance) "
                         f"statistics; with rho = {rho_t:.2f} measured on earlier batches "
                         f"the variance is about {-noise.nanmed(d['bias'][valid], 0.0):.0%} "
                         "too small")
    if "few_values" in due:
        lines.append(f"  - only {n} values per channel (min_values = {thr.min_values})")
    structure = None
    if measured and not unknown:
        structure = noise.typical_structure(pool["lam"], m, pool["beta_w"], pool["het"],
                                            pool["beta_b"], valid)
    return lines, structure


def _noisy_channels_line(d, thr):
    vse, mse, n_eff, valid, noisy = d["vse"], d["mse"], d["n_eff"], d["valid"], d["noisy"]
    worst = advice.worst_first(vse, noisy if noisy.any() else valid)
    return (f"  - var_rel_se = {noise.nanmed(vse[valid], math.nan):.2f} (median; threshold "
            f"{thr.max_var_rel_se}), mean_rel_se = {noise.nanmed(mse[valid], math.nan):.2f} "
            f"(threshold {thr.max_mean_rel_se}); noisy in {int(noisy.sum())} of "
            f"{int(valid.sum())} channels; worst channels: "
            + ", ".join(f"{i} (var_rel_se {vse[i]:.2f}, n_eff {n_eff[i]:.3g})"
                        for i in worst[:5]))


def _instance_lines(due, causes, d, thr, eps, c):
    lines = _flag_lines(due, causes, thr, eps, _instances)
    noise_due = d is not None and ("noisy" in due or "few_values" in due)
    if noise_due:
        # the median over the finite instances; with none, over all channels (their
        # kurtosis then defaults to the normal 3): a number that holds for n values
        vse = noise.nanmed(d["vse"][d["valid"]], noise.nanmed(d["vse"], math.nan))
        var_part = ("" if math.isnan(vse) else
                    f"var_rel_se = {vse:.2f} (threshold {thr.max_var_rel_se}), ")
        lines.append(f"  - only n = {d['n']} values per instance: {var_part}mean_rel_se = "
                     f"{float(d['mse'][0]):.2f} (threshold {thr.max_mean_rel_se})")
    n = d["n"] if d else 1
    rec = advice.for_per_sample(c, c, n, n, noise_due, "zero_var" in due, "nonfinite" in due)
    return lines, rec
