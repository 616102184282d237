"""What to do about unstable statistics: the recommendations, as text.

Shared by the reports and the layer warnings, so both give the same advice. The
non-finite advice comes first: NaN/Inf make every other number meaningless.
"""
from __future__ import annotations

import numpy as np

from . import _noise_model as noise


def suggest_groups(num_channels, values_per_channel_sample, min_values=64):
    """A GroupNorm group count: as in Wu & He (2018) at most 32 groups, at least two
    channels per group, and at least ``min_values`` values per (sample, group).
    None when no group count gives enough values (use LayerNorm then)."""
    c, m = int(num_channels), int(values_per_channel_sample)
    for g in range(min(32, c), 0, -1):
        if c % g == 0 and (c // g >= 2 or c == 1) and (c // g) * m >= min_values:
            return g
    return None


def recalibration_hint():
    import normkit
    if hasattr(normkit, "recalibrate"):
        return "normkit.recalibrate(model_forward, batches): exact statistics over many batches"
    return ("training-mode forwards without weight updates, momentum=None for an "
            "equal-weight average over >= 100 batches")


_NONFINITE_BATCH = ("find where the NaN/Inf come from (learning rate, overflow in "
                    "float16, bad inputs); in training they also poison the running "
                    "statistics: reset them (reset_running_stats()) once fixed")
_ZERO_BATCH = ("check the near-constant channels (dead ReLUs, constant padding, masked "
               "inputs); their outputs are scaled by up to 1/sqrt(eps)")


def for_batch(c, big_n, m, structure, thr, zero, nonfinite, noisy):
    """Advice for BatchNorm statistics. ``structure`` as from
    ``noise.typical_structure`` (None: unknown), for the batch size that would do."""
    parts = []
    if nonfinite:
        parts.append(_NONFINITE_BATCH)
    if zero:
        parts.append(_ZERO_BATCH)
    if noisy:
        parts += _for_noisy_batch(c, big_n, m, structure, thr)
    return "; ".join(parts)


def _for_noisy_batch(c, big_n, m, structure, thr):
    g = suggest_groups(c, m)
    if g is not None:
        parts = [f"use GroupNorm(num_groups={g}, num_channels={c}): per-sample statistics "
                 f"over {c // g * m} values, independent of the batch size"]
    else:
        parts = [f"use LayerNorm or GroupNorm(1, {c}): per-sample statistics over the "
                 f"{c * m} values of each sample, independent of the batch size"]
    need = noise.batch_needed(structure, thr, big_n) if structure is not None else None
    if need is None:
        parts.append("or a larger batch")
    else:
        at = f"at rho = {structure[0]:.2f}, " if m > 1 else ""
        parts.append(f"or a batch of at least {need} samples ({at}the expected var_rel_se "
                     f"and mean_rel_se are then under {thr.max_var_rel_se} and "
                     f"{thr.max_mean_rel_se})")
    parts.append("or, if the batch cannot grow, freeze the statistics (keep a pretrained "
                 "BatchNorm in eval mode while fine-tuning) or recalibrate the running "
                 f"statistics on large batches after training ({recalibration_hint()}), or "
                 "use batch renormalization (BatchNorm(..., renorm=True), Ioffe 2017)")
    return parts


def for_per_sample(c, groups, s, n, noisy, zero, nonfinite):
    """Advice for per-sample (instance or group) statistics of ``n`` values each, from
    ``groups`` groups of ``c`` channels with ``s`` values per (sample, channel)."""
    parts = []
    if nonfinite:
        parts.append("find where the NaN/Inf come from")
    if zero:
        parts.append("constant regions (padding, masks, saturated activations) give "
                     "near-zero variances: raise eps or exclude them")
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
    return "; ".join(parts)


# ---------------------------------------------------------------- formatting
def with_reasons(lines, reasons, recommendation):
    """A report's text: its ``lines``, then one line a reason, then the advice."""
    lines = lines + [f"  - {r}" for r in reasons]
    if recommendation:
        lines.append(f"  recommendation: {recommendation}")
    return "\n".join(lines)


def fmt_channels(idx, values=None, k=5, fmt="{:.2f}"):
    """Up to ``k`` channel indices (with their values), and how many there are in all."""
    idx = list(idx)
    if not idx:
        return "none"
    shown = idx[:k]
    if values is None:
        s = ", ".join(str(i) for i in shown)
    else:
        s = ", ".join(f"{i} ({fmt.format(values[i])})" for i in shown)
    return s + (f", ... ({len(idx)} in all)" if len(idx) > k else "")


def fmt_pairs(pairs, k=4):
    """Up to ``k`` (sample, channel) index pairs, and how many there are in all."""
    s = ", ".join(f"({int(a)}, {int(b)})" for a, b in pairs[:k])
    return s + (f", ... ({len(pairs)} in all)" if len(pairs) > k else "")


def worst_first(values, mask):
    """Indices where ``mask`` holds, largest value first (NaN counts as largest)."""
    idx = np.flatnonzero(mask)
    order = np.argsort(-np.nan_to_num(values[idx], nan=np.inf))
    return [int(i) for i in idx[order]]


def count(k, what):
    return f"{k} {what}" + ("" if k == 1 else "s")


def layer_label(layer):
    kind = type(layer).__name__
    c = getattr(layer, "num_features", "?")
    name = getattr(layer, "name", None)
    return f"{kind} {name!r} ({c} channels)" if name else f"{kind}({c})"
