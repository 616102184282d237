"""normkit on Dask arrays: lazy normalization and exact population statistics.

Nothing here imports Dask until a Dask array is actually handed to normkit: the public
functions of ``normkit.functional``, the layers and ``normkit.recalibrate`` carry a
small hook (``normkit.dask._hook``) that only looks for ``dask.array`` in
``sys.modules``. The implementations live in

* ``_functional``: the functional API on Dask arrays (lazy results);
* ``_blocks``: what runs inside one task (normkit's kernels on one NumPy block, with
  the caller's backend and a per-task thread count);
* ``_reduce``: the exact (count, mean, M2) tree reduction, merged by ``normkit._moments``;
* ``_layers``: layers and ``recalibrate`` on Dask input;
* ``_report``: ``batch_stats_report`` from moments reduced by blocks.

Install with ``pip install "normkit[dask]"``; the guide is ``docs/dask.md``.
"""
from __future__ import annotations

from ._hook import get_task_threads, is_dask, set_task_threads

__all__ = [
    "batch_stats_report",
    "get_task_threads",
    "is_dask",
    "population_moments",
    "recalibrate",
    "set_task_threads",
]


def __getattr__(name):
    # the Dask-importing parts load on first use only
    if name == "population_moments":
        from ._reduce import population_moments
        return population_moments
    if name == "batch_stats_report":
        from ._report import batch_stats_report
        return batch_stats_report
    if name == "recalibrate":
        from ._layers import recalibrate
        return recalibrate
    raise AttributeError(f"module 'normkit.dask' has no attribute {name!r}")
