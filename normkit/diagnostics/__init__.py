"""Small-batch diagnostics: when batch statistics are too noisy to trust, in numbers.

A BatchNorm channel is normalized with the mean and the (biased) variance of the
``n = N * m`` values it sees in one batch: ``N`` samples with ``m`` values each. Values
of one sample are correlated, so the batch is treated as a one-way random-effects
design; from the per-sample means and M2 the diagnostics estimate the intra-sample
correlation ``rho``, the effective sample size ``n_eff = n / (1 + (m - 1) rho)`` and the
relative standard errors of the batch mean and variance. Formulas, assumptions, limits
and the Monte Carlo validation: ``docs/diagnostics.md``; the API: ``docs/api.md``.

Where each part lives:

* ``_config``: the warning category, :class:`Thresholds`, ``configure`` and friends;
* ``_noise_model``: variance components, kurtosis, the expected noise;
* ``_report``: :func:`batch_stats_report` and :class:`BatchStatsReport`;
* ``_running_stats``: :func:`check_running_stats` (eval-time drift and convergence);
* ``_layer_state``: the per-layer hooks BatchNorm and InstanceNorm call in training;
* ``_layer_warnings`` / ``_advice``: the warning texts and the recommendations;
* ``_checks``: argument checks of the public entry points.
"""
from __future__ import annotations

from ._config import (
    Thresholds,
    UnstableBatchStatisticsWarning,
    configure,
    get_config,
    reset_config,
)
from ._config import check_setting as _check_setting  # noqa: F401 - layers' hook
from ._layer_state import start as _start  # noqa: F401 - layers' hook
from ._report import BatchStatsReport, batch_stats_report
from ._running_stats import RunningStatsReport, check_running_stats

__all__ = [
    "UnstableBatchStatisticsWarning", "Thresholds", "BatchStatsReport",
    "RunningStatsReport", "batch_stats_report", "check_running_stats", "configure",
    "get_config", "reset_config",
]

# The public objects print as normkit.diagnostics.X (as before the split into modules),
# which is also where pickle and the docs find them.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
