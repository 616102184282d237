"""Session settings shared by ``tests/`` and ``benchmarks/`` (pytest loads this file
before both).

``pyproject.toml`` runs the suite on pytest-xdist workers (``-n auto --dist loadfile``:
each file stays in one worker, so a module's fixtures -- the docs build, the compiled
Numba kernels it warms -- are made once). On the 2-core CI machine the full suite took
15 min 48 s on two workers against 26 min in one process (cold Numba cache; most of
the time is single-threaded Numba compilation). ``-n0`` runs everything in this process.
"""
import os
from pathlib import Path

# Workers beyond this cost each ~1 GB (torch, Numba) and compile the same kernels again.
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
    """Workers for ``-n auto``: none (this process) where they would not help -- a
    pytest-benchmark measure run (``--benchmark-enable``: timings need the cores to
    themselves) or a single file (``--dist loadfile`` gives it one worker anyway) --
    else one per CPU this process may use, at most MAX_WORKERS."""
    if config.getoption("benchmark_enable", False):
        return 0
    paths = [a.split("::")[0] for a in config.args]
    if len(paths) == 1 and Path(paths[0]).is_file():
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_WORKERS, cpus or 1))
