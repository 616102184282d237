"""The warning category, the thresholds, and the global and per-layer configuration."""
from __future__ import annotations

import dataclasses
import operator
import os
from typing import Any

import numpy as np


class UnstableBatchStatisticsWarning(UserWarning):
    """Batch statistics computed in training mode are too noisy to trust."""


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
        for name, lo, hi in _RANGES:
            _check_real(name, getattr(self, name), lo, hi)
        if self.near_zero_var is not None:
            _check_real("near_zero_var", self.near_zero_var, "[0", "inf)")
        for name, minimum in _COUNTS:
            _check_count(name, getattr(self, name), minimum)
        if self.warn_every is not None:
            _check_count("warn_every", self.warn_every, 1)
        if not isinstance(self.enabled, (bool, np.bool_)):
            raise TypeError(f"enabled: expected True or False, got {self.enabled!r}")

    def replace(self, **changes) -> Thresholds:
        """A copy with the given fields changed (validated like the constructor)."""
        check_keys(changes)
        return dataclasses.replace(self, **changes)


# (field, lower bound, upper bound): "(" excludes the bound, "[" includes it
_RANGES = [("max_var_rel_se", "(0", "inf)"), ("max_mean_rel_se", "(0", "inf)"),
           ("drift_mean", "(0", "inf)"), ("drift_z", "(0", "inf)"),
           ("channel_fraction", "[0", "1)"), ("ema", "(0", "1]"),
           ("converge_tol", "(0", "1)"), ("drift_var_ratio", "(1", "inf)")]
# (field, smallest allowed value)
_COUNTS = [("min_values", 0), ("warmup_checks", 0), ("check_every", 1),
           ("kurtosis_sample", 1)]


def _check_real(name, value, lo, hi):
    """``value`` a real number inside the interval written as ``lo``, ``hi``."""
    interval = f"{lo}, {hi}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(
            value, "__float__"):
        raise TypeError(f"{name}: expected a number in {interval}, got {value!r}")
    v, low, high = float(value), float(lo[1:]), float(hi[:-1])
    inside = ((v > low if lo[0] == "(" else v >= low)
              and (v < high if hi[-1] == ")" else v <= high))
    if not inside:
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")


def _check_count(name, value, minimum):
    """``value`` an integer (any integral type but bool) of at least ``minimum``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


FIELDS = frozenset(f.name for f in dataclasses.fields(Thresholds))


def check_keys(changes):
    unknown = sorted(set(changes) - FIELDS)
    if unknown:
        raise TypeError(f"unknown diagnostics setting(s) {unknown}; known: {sorted(FIELDS)}")


def _env_default() -> Thresholds:
    env = os.environ.get("NORMKIT_DIAGNOSTICS", "").strip().lower()
    return Thresholds(enabled=env not in ("0", "off", "false", "no"))


_DEFAULT = _env_default()
_current = _DEFAULT


class _Restore:
    """What ``configure`` returns: use it as a context manager to undo the change."""

    def __init__(self, previous):
        self.previous = previous

    def __enter__(self):
        return get_config()

    def __exit__(self, *exc):
        global _current
        _current = self.previous
        return False

    def __repr__(self):
        return f"<diagnostics configuration; previous: {self.previous!r}>"


def configure(**changes: Any) -> _Restore:
    """Change the global thresholds (the fields of :class:`Thresholds`).

    Layers created with ``diagnostics=None`` (the default) follow the global setting,
    live. Returns an object that undoes the change when used as a context manager::

        normkit.diagnostics.configure(max_var_rel_se=0.3)          # from now on
        with normkit.diagnostics.configure(enabled=False):          # only inside
            ...
    """
    global _current
    previous = _current
    _current = previous.replace(**changes)
    return _Restore(previous)


def get_config() -> Thresholds:
    """The current global thresholds."""
    return _current


def reset_config() -> None:
    """Back to the defaults (and the ``NORMKIT_DIAGNOSTICS`` environment variable)."""
    global _current
    _current = _DEFAULT


def check_setting(setting):
    """Validate a layer's ``diagnostics=`` argument; returns it (dicts are copied)."""
    if setting is None or isinstance(setting, (bool, Thresholds)):
        return setting
    if isinstance(setting, dict):
        check_keys(setting)
        _current.replace(**setting)          # values are validated now, not at step 1000
        return dict(setting)
    raise TypeError("diagnostics: expected None (follow normkit.diagnostics.configure), "
                    "True, False, a dict of Thresholds fields or a Thresholds, got "
                    f"{type(setting).__name__}")


def resolve(setting) -> Thresholds:
    """The thresholds a layer setting (as accepted by ``check_setting``) stands for."""
    if setting is None:
        return _current
    if setting is True:
        return _current if _current.enabled else _current.replace(enabled=True)
    if setting is False:
        return _current.replace(enabled=False)
    if isinstance(setting, Thresholds):
        return setting
    return _current.replace(**{"enabled": True, **setting})


def as_thresholds(thresholds) -> Thresholds:
    """The ``thresholds=`` argument of the reports: None, a Thresholds or a dict."""
    if thresholds is None:
        return _current
    if isinstance(thresholds, Thresholds):
        return thresholds
    if isinstance(thresholds, dict):
        return _current.replace(**thresholds)
    raise TypeError("thresholds: expected None, a Thresholds or a dict of its fields, "
                    f"got {type(thresholds).__name__}")
