"""Fixtures of the benchmark suite.

Two modes, chosen by pytest-benchmark's own switch:

* **smoke** (the default: ``addopts`` has ``--benchmark-disable``): every benchmark runs
  its implementation once, on the case's *smoke* shapes (batch <= 2, spatial <= 6x6,
  sequence <= 4; channel counts and row lengths kept, so the same kernel paths run), and
  checks the result against the float64 truth (normkit's ``numpy`` backend on float64
  copies of the same inputs). The whole directory takes
  well under a minute.
* **measure** (``--benchmark-enable``): the real shapes, timed by pytest-benchmark after
  one warm-up call, one group per case, ``extra_info`` with the bytes moved and GB/s.

Threads: ``--bench-threads N`` (default ``normkit.get_num_threads()``) is given to
normkit, torch and ONNX Runtime alike.
"""
from __future__ import annotations

import importlib.util

import pytest

import normkit
from normkit import _bench
from normkit import _bench_columns as cols
from normkit import _bench_data as D
from normkit._bench_op_base import NotApplicable


def pytest_addoption(parser):
    group = parser.getgroup("normkit benchmarks")
    group.addoption("--bench-threads", type=int, default=None,
                    help="threads for normkit, torch and ONNX Runtime "
                         "(default: normkit.get_num_threads())")


class BenchEnv:
    """Session state: the mode, the threads, the peers (imported once) and the data of
    the current case (kept for one case at a time: the full shapes are large)."""

    def __init__(self, config):
        self.smoke = bool(config.getoption("benchmark_disable")
                          and not config.getoption("benchmark_enable"))
        self.threads = config.getoption("bench_threads") or normkit.get_num_threads()
        normkit.set_num_threads(self.threads)
        # measure mode: keep freed memory in the process, as `normkit bench` does
        self.malloc = None if self.smoke else _bench.tune_malloc()
        self._impls = {}
        self._data_key = None
        self._data = None

    def data(self, case):
        """(units, bytes, reference arrays) of ``case`` in the current mode."""
        key = (case.name, self.smoke)
        if key != self._data_key:
            self._data = None                     # free the previous case first
            units = D.make_data(case, smoke=self.smoke)
            self._data = (units, D.case_bytes(case, units), D.truth(case, units))
            self._data_key = key
        return self._data

    def impl(self, impl_id):
        """The implementation, or pytest.skip with the reason it is not available."""
        if impl_id in self._impls:
            impl = self._impls[impl_id]
        else:
            impl = self._impls[impl_id] = self._make(impl_id)
        if isinstance(impl, str):
            pytest.skip(impl)
        return impl

    def _make(self, impl_id):
        from normkit.backends import KNOWN_BACKENDS, backend_status
        if impl_id in KNOWN_BACKENDS:
            status = backend_status()[impl_id]
            return cols.backend_impl(impl_id) if status == "available" else (
                f"backend {impl_id} not available: {status}")
        if impl_id == "copy":
            return cols.copy_impl()
        if impl_id == "plain-numpy":
            return cols.plain_impl()
        if impl_id == "torch":
            if importlib.util.find_spec("torch") is None:
                return "torch not installed"
            return cols.torch_impl(self.threads)
        if impl_id == "onnxruntime":
            missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
            if missing:
                return f"{' and '.join(missing)} not installed"
            return cols.ort_impl(self.threads)
        raise ValueError(impl_id)


@pytest.fixture(scope="session")
def bench_env(request):
    return BenchEnv(request.config)


@pytest.fixture
def run_case(benchmark, bench_env):
    """``run_case(case, impl_id)``: benchmark one implementation on one case, then check
    its result against the float64 truth."""

    def run(case, impl_id):
        impl = bench_env.impl(impl_id)
        units, nbytes, ref = bench_env.data(case)
        try:
            fn, fetch = impl.prepare(case, units)
        except NotApplicable as exc:
            pytest.skip(f"{impl_id}: {exc}")
        benchmark.group = case.name
        benchmark.extra_info.update({"case": case.name, "impl": impl_id, "bytes": nbytes,
                                     "threads": bench_env.threads,
                                     "malloc": bench_env.malloc,
                                     "mode": "smoke" if bench_env.smoke else "measure"})
        # warm-up (JIT compilation, page faults) and the result to check: every unit's
        # output (a timed call of a real-model case keeps only the last one)
        try:
            result = D.run_for_check(fn)
        except TypeError as exc:
            why = cols.unsupported_dtype(impl, case, exc)
            if why is None:
                raise
            pytest.skip(f"{impl_id}: unsupported: {why}")
        benchmark(fn)
        if benchmark.stats is not None:
            median = benchmark.stats.stats.median
            benchmark.extra_info["GB/s"] = round(nbytes / median / 1e9, 3) if median else None
        if fetch is not None:
            err = D.max_rel_error(fetch(result), ref)
            benchmark.extra_info["max_rel_error"] = err
            if err > case.tol() and impl.kind == "peer" and case.data != "normal":
                # hard data (mean 1e4, std 1) is where peers lose accuracy; the bench
                # table reports it, this suite only checks normkit on it
                pytest.xfail(f"{impl_id} on {case.name}: error {err:.3g} above the "
                             f"tolerance {case.tol():.1g} on hard data")
            assert err <= case.tol(), (
                f"{impl_id} on {case.name}: max relative error {err:.3g} vs the float64 "
                f"truth exceeds the tolerance {case.tol():.1g}")
    return run
