"""``batch_stats_report`` on a Dask array, without pulling the array into memory.

The report needs moments, not data (``normkit.diagnostics._from_moments``):

* ``kind="batch"``: per-(sample, channel) count, mean and M2, the exact tree reduction
  of ``_reduce.population_moments`` (Chan's merge across chunks of the spatial axes),
  and the kurtosis subsample: the same strided positions ``noise.subsample_planes``
  reads, gathered with ``vindex`` (at most ``kurtosis_sample * 16`` values per channel);
* ``kind="instance"`` / ``"group"``: the per-(sample, channel) moments merged over the
  channels of a group, then one more lazy pass for the fourth powers of the deviations
  from each group's mean.

What is held in memory is O(N * C) (the per-sample statistics), never x. With one value
per sample and channel (2-D (N, C) input, or the channels on axis 0) the per-sample
"means" are the values themselves: that report holds N * C float64 (docs/dask.md).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import _moments
from ..diagnostics import _checks as checks
from ..diagnostics import _from_moments as fm
from ..diagnostics import _noise_model as noise
from ..diagnostics._config import Thresholds
from ..diagnostics._report import BatchStatsReport
from ._common import compute, known_chunks, stand_in
from ._reduce import population_moments


@checks.quiet_floating_point
def batch_stats_report(x: Any, *, axis: int = 1, kind: str = "batch",
                       num_groups: int | None = None, eps: float = 1e-5,
                       thresholds: Thresholds | dict | None = None,
                       backend: str | None = None) -> BatchStatsReport:
    """:func:`normkit.diagnostics.batch_stats_report` of a Dask array, computed by blocks.

    Same arguments and result; ``backend`` picks the kernels of the moment reduction.
    """
    # the in-memory checks and messages, on a stand-in with x's shape and dtype
    # (float16, bfloat16, float32, float64)
    x_like = checks.as_data(stand_in(x))
    known_chunks(x)
    ax, kind, groups, eps, thr = fm.check_arguments(x_like, axis, kind, num_groups, eps,
                                                    thresholds)
    if kind == "batch":
        mu, m2, m, sub = _batch_moments(x, ax, thr, backend)
        return fm.batch_report(x.shape, mu, m2, m, sub, eps, thr)
    c = x.shape[ax]
    mean, m2, r4, n = _group_moments(x, ax, groups, backend)
    g = n * r4 / (m2 * m2)                     # the sample kurtosis, as plane_kurtosis
    return fm.per_sample_report(x.shape, c, kind, groups, mean, m2, g, n, eps, thr)


def _batch_moments(x, ax, thr, backend):
    """(mu, m2) (N, C), m and the kurtosis subsample (N, C, k), float64."""
    if ax == 0:       # no sample structure: every value is a sample (m = 1)
        import dask.array as da
        mu = da.moveaxis(x, 0, -1).reshape(-1, x.shape[0]).astype(np.float64).compute()
        return mu, np.zeros_like(mu), 1, np.empty(mu.shape + (0,))
    xm_shape = (x.shape[0], x.shape[ax]) + tuple(d for i, d in enumerate(x.shape)
                                                 if i not in (0, ax))
    m = int(np.prod(xm_shape[2:], dtype=np.int64))
    lazy = [population_moments(x, (0, ax), backend=backend)]
    if m > 3:         # within_kurtosis reads the subsample only then
        lazy.append(_subsample(x, ax, xm_shape, fm.subsample_size(thr, x.shape[0], m)))
    done = compute(*lazy)
    mom = done[0]
    sub = np.moveaxis(done[1], 0, -1) if m > 3 else np.empty(mom.shape + (0,))
    return mom["mean"], mom["m2"], m, sub


def _subsample(x, ax, xm_shape, k):
    """Lazily, the positions ``noise.subsample_planes`` picks of each (N, C) plane, as
    float64 (k', N, C): the same flat positions, found by running it on their indices."""
    import dask.array as da
    spatial = xm_shape[2:]
    m = int(np.prod(spatial, dtype=np.int64))
    flat = noise.subsample_planes(np.arange(m, dtype=np.float64).reshape(1, 1, m), k)
    where = np.unravel_index(flat.reshape(-1).astype(np.intp), spatial)
    xm = da.moveaxis(x, ax, 1)
    return xm.vindex[(slice(None), slice(None)) + where].astype(np.float64)


def _group_moments(x, ax, groups, backend):
    """Per (sample, group): mean, M2 and the sum of fourth powers of the deviations
    from that mean, float64 (N, G), and the number of values n behind each."""
    import dask.array as da
    n_samples, c = x.shape[0], x.shape[ax]
    per = c // groups
    (mom,) = compute(population_moments(x, (0, ax), backend=backend))
    m = x.size // (n_samples * c)
    mean, m2 = _moments.merge_equal(mom["mean"].reshape(n_samples, groups, per),
                                    mom["m2"].reshape(n_samples, groups, per), m, axis=2)
    # second pass: deviations from the group mean, broadcast over the channels
    centre = np.repeat(mean, per, axis=1).reshape(
        tuple(n_samples if i == 0 else c if i == ax else 1 for i in range(x.ndim)))
    centre_d = da.from_array(centre, chunks=tuple(
        x.chunks[i] if i in (0, ax) else (1,) for i in range(x.ndim)))
    dev2 = (x.astype(np.float64) - centre_d) ** 2
    spatial = tuple(i for i in range(x.ndim) if i not in (0, ax))
    (r4,) = compute((dev2 * dev2).sum(axis=spatial))         # (N, C)
    r4 = r4.reshape(n_samples, groups, per).sum(axis=2)
    return mean, m2, r4, m * per
