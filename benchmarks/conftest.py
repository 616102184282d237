"""Fixtures of the benchmark suite.

Two modes, chosen by pytest-benchmark's own switch:

* **smoke** (the default: ``addopts`` has ``--benchmark-disable``): every benchmark runs
  its implementation once, on the case's *smoke* shapes (batch <= 2, spatial <= 6x6,
  sequence <= 4; channel counts and row lengths kept, so the same kernel paths run), and
  checks the result against the normkit ``numpy`` backend. The whole directory takes
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
from normkit import _bench_cases as C


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
            units = C.make_data(case, smoke=self.smoke)
            ref = C.to_arrays(C.run_for_check(C.normkit_runner(case, units, "numpy")))
            self._data, self._data_key = (units, C.case_bytes(case, units), ref), key
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
            return _bench._backend_impl(impl_id) if status == "available" else (
                f"backend {impl_id} not available: {status}")
        if impl_id == "copy":
            return _bench._copy_impl()
        if impl_id == "plain-numpy":
            return _bench._plain_impl()
        if impl_id == "torch":
            if importlib.util.find_spec("torch") is None:
                return "torch not installed"
            return _bench._torch_impl(self.threads)
        if impl_id == "onnxruntime":
            missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
            if missing:
                return f"{' and '.join(missing)} not installed"
            return _bench._ort_impl(self.threads)
        raise ValueError(impl_id)


@pytest.fixture(scope="session")
def bench_env(request):
    return BenchEnv(request.config)


@pytest.fixture
def run_case(benchmark, bench_env):
    """``run_case(case, impl_id)``: benchmark one implementation on one case, then check
    its result against the normkit numpy backend."""

    def run(case, impl_id):
        impl = bench_env.impl(impl_id)
        units, nbytes, ref = bench_env.data(case)
        try:
            fn, fetch = impl.prepare(case, units)
        except C.NotApplicable as exc:
            pytest.skip(f"{impl_id}: {exc}")
        benchmark.group = case.name
        benchmark.extra_info.update({"case": case.name, "impl": impl_id, "bytes": nbytes,
                                     "threads": bench_env.threads,
                                     "malloc": bench_env.malloc,
                                     "mode": "smoke" if bench_env.smoke else "measure"})
        # warm-up (JIT compilation, page faults) and the result to check: every unit's
        # output (a timed call of a real-model case keeps only the last one)
        result = C.run_for_check(fn)
        benchmark(fn)
        if benchmark.stats is not None:
            median = benchmark.stats.stats.median
            benchmark.extra_info["GB/s"] = round(nbytes / median / 1e9, 3) if median else None
        if fetch is not None:
            err = C.max_rel_error(fetch(result), ref)
            assert err <= case.tol(), (
                f"{impl_id} on {case.name}: max relative error {err:.3g} vs the normkit "
                f"numpy backend exceeds the tolerance {case.tol():.1g}")
    return run
