"""The Numba backend at run time: threads, fork, thread counts, the on-disk cache.

tests/test_kernels.py checks what each kernel computes; this file checks how the
backend behaves in a real process: many Python threads calling parallel kernels at
once, a child forked after the parent used the thread pool, ``set_num_threads`` seen
from other threads, tiny inputs that must not start the pool, NaN/Inf through the
parallel (fastmath-reassociated) reductions, and a warm cache that skips compilation.
Anything that could hang runs in a child process with a timeout.
"""
import json
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

pytest.importorskip("numba")
nb = pytest.importorskip("normkit.backends.numba_backend")
import _cases as C  # noqa: E402

from normkit.backends import numpy_ref as ref  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240   # generous: a cold cache compiles kernels in the child


def _run_py(code, env=None, timeout=TIMEOUT):
    """Run python code in a fresh interpreter; return the last stdout line parsed as JSON."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- a workload
def _inputs(dtype=np.float32, seed=0):
    """Inputs big enough for the parallel path, plus a tiny one for the serial path."""
    rng = np.random.default_rng(seed)

    def a(*shape):
        return (rng.standard_normal(shape) * 2 + 3).astype(dtype)

    return dict(
        planes=a(96, 3000),
        nhwc=a(1, 4000, 24),
        rows=a(300, 384), w=a(384), b=a(384), dy_rows=a(300, 384),
        nchw=a(4, 24, 1000), dy_nchw=a(4, 24, 1000),
        p1=a(1, 24), p2=a(1, 24), p3=a(1, 24), p4=a(1, 24),
        tiny=a(1, 8), tw=a(8), tb=a(8),
    )


def _workload(d):
    """Call every kernel once; return every output (a flat list of arrays)."""
    outs = []
    outs += nb.plane_moments(d["planes"])
    outs += nb.channels_last_moments(d["nhwc"])
    y = np.empty_like(d["rows"])
    mean, rstd = nb.rows_forward(d["rows"], d["w"], d["b"], 1e-5, False, y)
    outs += [y, mean, rstd]
    dx = np.empty_like(d["rows"])
    outs += nb.rows_backward(d["dy_rows"], d["rows"], mean, rstd, d["w"], False, dx)
    outs.append(dx)
    y3 = np.empty_like(d["nchw"])
    nb.channels_first_affine(d["nchw"], d["p1"], d["p2"], d["p3"], y3)
    outs.append(y3)
    outs += nb.channels_first_grad_sums(d["dy_nchw"], d["nchw"], d["p1"])
    dx3 = np.empty_like(d["nchw"])
    nb.channels_first_grad_apply(d["dy_nchw"], d["nchw"], d["p1"], d["p2"], d["p3"], d["p4"], dx3)
    outs.append(dx3)
    last = np.ascontiguousarray(d["nchw"].transpose(0, 2, 1))
    dlast = np.ascontiguousarray(d["dy_nchw"].transpose(0, 2, 1))
    y4 = np.empty_like(last)
    nb.channels_last_affine(last, d["p1"], d["p2"], d["p3"], y4)
    outs.append(y4)
    outs += nb.channels_last_grad_sums(dlast, last, d["p1"])
    dx4 = np.empty_like(last)
    nb.channels_last_grad_apply(dlast, last, d["p1"], d["p2"], d["p3"], d["p4"], dx4)
    outs.append(dx4)
    yt = np.empty_like(d["tiny"])
    outs += nb.rows_forward(d["tiny"], d["tw"], d["tb"], 1e-5, False, yt)
    outs.append(yt)
    return outs


def _check_against_ref(d, outs):
    """The first few outputs against the NumPy oracle (the rest are covered elsewhere)."""
    rm, rq = ref.plane_moments(d["planes"])
    C.assert_within(outs[0], rm, C.bound_mean(d["planes"], 1), "plane mean")
    C.assert_within(outs[1], rq, C.bound_m2(d["planes"], 1), "plane m2")
    cm, cq = ref.channels_last_moments(d["nhwc"])
    C.assert_within(outs[2], cm, C.bound_mean(d["nhwc"], 1), "channels-last mean")
    C.assert_within(outs[3], cq, C.bound_m2(d["nhwc"], 1), "channels-last m2")


@pytest.fixture(scope="module")
def baseline():
    d = _inputs()
    nb.set_num_threads(nb._MAX_THREADS)
    outs = _workload(d)
    _check_against_ref(d, outs)
    return d, outs


# ---------------------------------------------------------------- threads
def test_eight_python_threads_concurrently(baseline):
    d, expected = baseline
    n_threads, n_iter = 8, 6
    barrier = threading.Barrier(n_threads)
    errors = []

    def worker():
        try:
            barrier.wait()
            for _ in range(n_iter):
                got = _workload(d)
                for g, e in zip(got, expected):
                    np.testing.assert_array_equal(g, e)   # same chunking: bit-identical
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, errors[0]


def test_workqueue_layer_serializes_concurrent_calls():
    """workqueue aborts on concurrent parallel calls; the backend must lock around them."""
    out = _run_py("""
        import json, threading, numpy as np
        from normkit.backends import numba_backend as nb
        nb._S.par_min = 1 << 12          # make sure these inputs take the parallel path
        x = np.random.default_rng(0).standard_normal((64, 4000)).astype(np.float32)
        want = nb.plane_moments(x)
        bad = []
        def work():
            for _ in range(20):
                m, q = nb.plane_moments(x)
                if not (np.array_equal(m, want[0]) and np.array_equal(q, want[1])):
                    bad.append(1)
        ts = [threading.Thread(target=work) for _ in range(8)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print(json.dumps({"layer": nb.info()["threading_layer"], "bad": len(bad),
                          "locked": nb.info()["parallel_calls_serialized"]}))
    """, env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert out == {"layer": "workqueue", "bad": 0, "locked": True}


def test_set_num_threads_applies_in_every_thread_and_is_clamped():
    # NUMBA_NUM_THREADS=4 launches 4 workers even on a 2-core machine, so 3 is observable.
    out = _run_py("""
        import json, threading, numba, numpy as np
        from normkit.backends import numba_backend as nb
        x = np.ones((64, 4000), np.float32)
        seen = {}
        def probe(key):
            nb.plane_moments(x)                      # parallel path applies the count
            seen[key] = numba.get_num_threads()
        nb.set_num_threads(3)
        t = threading.Thread(target=probe, args=("thread_3",)); t.start(); t.join()
        probe("main_3")
        nb.set_num_threads(2)
        t = threading.Thread(target=probe, args=("thread_2",)); t.start(); t.join()
        probe("main_2")
        nb.set_num_threads(99)
        probe("main_99")
        seen["info_threads"] = nb.info()["threads"]
        print(json.dumps(seen))
    """, env={"NUMBA_NUM_THREADS": "4"})
    assert out == {"thread_3": 3, "main_3": 3, "thread_2": 2, "main_2": 2,
                   "main_99": 4, "info_threads": 4}


def test_registry_set_num_threads_reaches_backend():
    import normkit
    from normkit.backends import resolve
    be = resolve("numba")
    old = normkit.get_num_threads()
    try:
        normkit.set_num_threads(1)
        assert be.info()["threads"] == 1
        d = _inputs(seed=3)
        outs = _workload(d)              # runs every kernel on the serial twins
        _check_against_ref(d, outs)
    finally:
        normkit.set_num_threads(old)


# ---------------------------------------------------------------- fork
def _child_compute(queue):
    try:
        d = _inputs()
        outs = _workload(d)
        queue.put(("ok", [o.tolist() for o in outs], nb.info()["serial_only"]))
    except Exception as exc:  # noqa: BLE001
        queue.put(("error", repr(exc), None))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_multiprocessing_fork_child_after_parent_used_pool(baseline):
    d, expected = baseline
    assert nb.info()["threading_layer"] in ("omp", "tbb", "workqueue")   # pool started
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_compute, args=(queue,))
    proc.start()
    try:
        status, payload, serial_only = queue.get(timeout=TIMEOUT)
    except Exception:  # noqa: BLE001 - queue.Empty: the child hung or died
        proc.kill()
        proc.join()
        pytest.fail(f"forked child hung or died (exitcode {proc.exitcode})")
    proc.join(timeout=TIMEOUT)
    assert status == "ok", payload
    assert proc.exitcode == 0
    for got, want in zip(payload, expected):
        # the child may run the serial twins: the work split depends on the shape only,
        # so they compute the same partials in the same order -- bit-identical
        np.testing.assert_array_equal(np.asarray(got, want.dtype), want)
    if nb.info()["threading_layer"] == "omp":
        from numba.np.ufunc import omppool
        if omppool.openmp_vendor == "GNU":
            assert serial_only


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_raw_os_fork_child_does_not_hang(baseline):
    d, expected = baseline
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            got = _workload(d)
            ok = all(np.array_equal(g, e) for g, e in zip(got, expected))  # shape-only split
            code = 0 if ok else 2
        finally:
            os.write(w, bytes([code]))
            os._exit(code)
    os.close(w)
    import select
    ready, _, _ = select.select([r], [], [], TIMEOUT)
    if not ready:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("forked child hung")
    status = os.read(r, 1)
    os.close(r)
    _, wstatus = os.waitpid(pid, 0)
    assert status == b"\x00" and os.WIFEXITED(wstatus) and os.WEXITSTATUS(wstatus) == 0


def test_fork_before_pool_start_keeps_child_parallel():
    """A parent that only imported and configured the backend leaves the child free."""
    out = _run_py("""
        import json, os, numpy as np
        from normkit.backends import numba_backend as nb
        nb.set_num_threads(2)
        y = np.empty((1, 8), np.float32)
        nb.rows_forward(np.ones((1, 8), np.float32), np.ones(8, np.float32),
                        np.zeros(8, np.float32), 1e-5, False, y)   # tiny: serial, no pool
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            x = np.ones((64, 4000), np.float32)
            nb.plane_moments(x)
            os.write(w, json.dumps({"serial_only": nb.info()["serial_only"],
                                    "layer": nb.info()["threading_layer"]}).encode())
            os._exit(0)
        os.close(w)
        data = os.read(r, 4096)
        os.waitpid(pid, 0)
        print(data.decode())
    """)
    assert out["serial_only"] is False
    assert out["layer"] in ("omp", "tbb", "workqueue")


# ---------------------------------------------------------------- small inputs, import
def test_tiny_inputs_do_not_start_the_pool_and_import_is_lazy():
    out = _run_py("""
        import json, sys, numpy as np
        import normkit
        lazy = "numba" not in sys.modules
        from normkit.backends import numba_backend as nb
        from numba.np.ufunc import parallel
        y = np.empty((1, 8), np.float32)
        nb.rows_forward(np.ones((1, 8), np.float32), np.ones(8, np.float32),
                        np.zeros(8, np.float32), 1e-5, False, y)
        nb.plane_moments(np.ones((3, 17)))
        print(json.dumps({"lazy": lazy, "pool_started": parallel._is_initialized,
                          "info_layer": nb.info()["threading_layer"]}))
    """)
    assert out["lazy"] is True
    assert out["pool_started"] is False
    assert out["info_layer"].startswith("not started")


# ---------------------------------------------------------------- NaN / Inf, hard data
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_inf_propagate_through_parallel_reductions(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 40000)).astype(dtype)        # parallel and chunked rows
    x[2, 12345] = np.nan
    x[5, 39999] = np.inf
    mean, m2 = nb.plane_moments(x)
    assert np.isnan(m2[2]) and np.isnan(m2[5]) and np.isfinite(m2[[0, 1, 3, 4, 6, 7]]).all()
    assert np.isnan(mean[2]) and not np.isfinite(mean[5])

    xl = rng.standard_normal((1, 40000, 8)).astype(dtype)    # BN NHWC: S split
    xl[0, 777, 3] = np.nan
    xl[0, 30000, 6] = -np.inf
    mean, m2 = nb.channels_last_moments(xl)
    assert np.isnan(m2[0, 3]) and np.isnan(m2[0, 6]) and np.isfinite(m2[0, [0, 1, 2, 4, 5, 7]]).all()

    xr = rng.standard_normal((64, 1024)).astype(dtype)
    xr[7, 5] = np.nan
    xr[9, 1000] = np.inf
    out = np.empty_like(xr)
    want = np.empty(xr.shape)
    ones, zeros = np.ones(1024, dtype), np.zeros(1024, dtype)
    for rms in (False, True):
        nb.rows_forward(xr, ones, zeros, 1e-5, rms, out)
        ref.rows_forward(xr, ones, zeros, 1e-5, rms, want)
        # the same non-finite pattern as the oracle (RMSNorm: rstd = 0 on the Inf row)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
        np.testing.assert_array_equal(np.isfinite(out), np.isfinite(want))
        assert np.isnan(out[7]).all() and np.isnan(out[9, 1000])
        assert np.isfinite(np.delete(out, [7, 9], axis=0)).all()

    dy = rng.standard_normal((4, 8, 5000)).astype(dtype)
    x3 = rng.standard_normal((4, 8, 5000)).astype(dtype)
    dy[1, 2, 100] = np.nan
    s1, s2 = nb.channels_first_grad_sums(dy, x3, np.zeros((1, 8), dtype))
    assert np.isnan(s1[1, 2]) and np.isnan(s2[1, 2])
    assert np.isfinite(np.delete(s1.ravel(), 1 * 8 + 2)).all()


def _var_errors(x64, var):
    return np.abs(var - x64.var(axis=1)).max()


@pytest.mark.parametrize("kind", ["offset", "constant"])
def test_hard_data_no_worse_than_torch(kind):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    shape = (64, 50000)
    if kind == "offset":
        x = (rng.standard_normal(shape) + 1e4).astype(np.float32)
    else:
        x = np.full(shape, 1234.0, np.float32)
    x64 = x.astype(np.float64)
    mean, m2 = nb.plane_moments(x)
    ours = _var_errors(x64, m2 / shape[1])
    tv = torch.var(torch.from_numpy(x), dim=1, unbiased=False).double().numpy()
    theirs = _var_errors(x64, tv)
    # floor for data where torch is exact (constant rows): the M2 error bound over n
    floor = (C.bound_m2(x64, 1) / shape[1]).max()
    assert ours <= max(theirs, floor), (ours, theirs, floor)

    # LayerNorm output on the same hard rows
    w = np.ones(shape[1], np.float32)
    b = np.zeros(shape[1], np.float32)
    out = np.empty_like(x)
    nb.rows_forward(x, w, b, 1e-5, False, out)
    exact = np.empty(shape)
    ref.rows_forward(x, w, b, 1e-5, False, exact)
    tout = torch.nn.functional.layer_norm(torch.from_numpy(x), (shape[1],), eps=1e-5).numpy()
    floor = C.bound_normalized(x, 1, 1e-5, w, b, np.float32).max()
    assert np.abs(out - exact).max() <= max(np.abs(tout - exact).max(), floor)


# ---------------------------------------------------------------- the on-disk cache
def test_info_reports_the_runtime():
    info = nb.info()
    for key in ("numba", "threading_layer", "threads", "max_threads", "serial_only",
                "compiled_kernels", "cache_dir", "parallel_threshold_elements"):
        assert key in info
    json.dumps(info)


@pytest.mark.slow
def test_cold_then_warm_cache(tmp_path):
    """A second process loads the compiled kernels from NUMBA_CACHE_DIR, compiling nothing."""
    code = """
        import json, time, numpy as np
        t0 = time.perf_counter()
        from normkit.backends import numba_backend as nb
        x = np.ones((64, 4000), np.float32)
        nb.plane_moments(x)                       # parallel twin
        nb.plane_moments(x[:2, :10].copy())       # serial twin
        t1 = time.perf_counter()
        stats = {}
        nb.plane_moments(x[:2, :10].astype(np.float16))   # 16-bit (int16 view) twin
        for (name, dtype, par, ro), fn in nb._dispatchers.items():
            s = fn.stats
            stats[f"{name}_{dtype}_{'par' if par else 'ser'}_{ro}"] = [
                sum(s.cache_hits.values()), sum(s.cache_misses.values())]
        print(json.dumps({"seconds": t1 - t0, "stats": stats}))
    """
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    cold = _run_py(code, env=env)
    warm = _run_py(code, env=env)
    assert all(miss == 1 and hit == 0 for hit, miss in cold["stats"].values()), cold
    assert all(hit == 1 and miss == 0 for hit, miss in warm["stats"].values()), warm
    assert warm["seconds"] < cold["seconds"]
    assert any(tmp_path.rglob("*.nbi"))


def test_row_statistics_do_not_depend_on_thread_count():
    """Short rows are pipelined per thread block; each row's sum still takes one code path."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3000, 384)) * 2 + 1e3).astype(np.float32)
    w = rng.standard_normal(384).astype(np.float32)
    old = nb._S.threads
    results = []
    try:
        for n in (1, nb._MAX_THREADS):
            nb.set_num_threads(n)
            out = np.empty_like(x)
            results.append(list(nb.rows_forward(x, w, w, 1e-5, False, out)) + [out]
                           + list(nb.plane_moments(x)))
    finally:
        nb.set_num_threads(old)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_workqueue_layer_fork_child_stays_parallel():
    """workqueue is fork-safe: a child forked after the parent used it keeps its pool."""
    out = _run_py("""
        import json, os, numpy as np
        from normkit.backends import numba_backend as nb
        nb._S.par_min = 1 << 12
        x = np.random.default_rng(0).standard_normal((64, 4000)).astype(np.float32)
        want = nb.plane_moments(x)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            got = nb.plane_moments(x)
            ok = bool(np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]))
            os.write(w, json.dumps({"ok": ok, "serial_only": nb.info()["serial_only"]}).encode())
            os._exit(0)
        os.close(w)
        data = os.read(r, 4096)
        os.waitpid(pid, 0)
        print(data.decode())
    """, env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert out == {"ok": True, "serial_only": False}


def test_group_forward_does_not_depend_on_thread_count():
    """The fused GroupNorm forward: one item per block, and a single huge block split
    into pieces (partials merged with Chan's formula in a fixed order), both give
    bit-identical results on 1 and on all threads (the split depends on the shape)."""
    rng = np.random.default_rng(6)
    old = nb._S.threads
    try:
        for shape, g in (((8, 64, 3136), 32), ((1, 2, 300000), 1)):
            x = (rng.standard_normal(shape) * 2 + 1e3).astype(np.float32)
            w = rng.standard_normal(shape[1]).astype(np.float32)
            res = []
            for n in (1, nb._MAX_THREADS):
                nb.set_num_threads(n)
                out = np.empty_like(x)
                res.append(list(nb.channels_first_group_forward(x, g, w, w, 1e-5, out)) + [out])
            for a, b in zip(*res):
                np.testing.assert_array_equal(a, b)
    finally:
        nb.set_num_threads(old)


# ---------------------------------------------------------------- thread-count independence
def _every_kernel_outputs(dtype):
    """Every kernel on inputs big enough for the parallel twin (and for split pieces)."""
    rng = np.random.default_rng(11)
    param = np.float64 if dtype == np.float64 else np.float32

    def a(*shape, dt=dtype):
        return (rng.standard_normal(shape) * 2 + 1e3).astype(dt)

    planes, nchw, nhwc = a(6, 200000), a(4, 16, 9000), a(2, 9000, 16)
    rows, w, p = a(700, 384), a(384, dt=param), [a(1, 16, dt=param) for _ in range(4)]
    outs = list(nb.plane_moments(planes)) + list(nb.channels_last_moments(nhwc))
    y = np.empty_like(rows)
    mean, rstd = nb.rows_forward(rows, w, w, 1e-5, False, y)
    dx = np.empty_like(rows)
    outs += [y, mean, rstd, dx, *nb.rows_backward(rows, rows, mean, rstd, w, False, dx)]
    for layout, x in (("first", nchw), ("last", nhwc)):
        o1, o2, o3 = (np.empty_like(x) for _ in range(3))
        getattr(nb, f"channels_{layout}_affine")(x, *p[:3], o1)
        getattr(nb, f"channels_{layout}_affine_act")(x, *p[:3], x, True, o2)
        getattr(nb, f"channels_{layout}_grad_apply")(x, x, p[0], *p[1:], o3)
        outs += [o1, o2, o3, *getattr(nb, f"channels_{layout}_grad_sums")(x, x, p[0])]
    for shape, g in (((8, 64, 3136), 32), ((1, 2, 300000), 1)):
        x = a(*shape)
        out = np.empty_like(x)
        outs += [out, *nb.channels_first_group_forward(x, g, a(shape[1], dt=param),
                                                       a(shape[1], dt=param), 1e-5, out)]
    out = np.empty_like(nchw)
    outs += [out, *nb.channels_first_batch_forward(nchw, p[1][0], p[2][0], 1e-5, out)]
    return outs


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, C.np_dtype("bfloat16")],
                         ids=["float32", "float64", "float16", "bfloat16"])
def test_every_kernel_bit_identical_on_one_and_two_threads(dtype):
    """The work split depends on the shape only: 1 thread (the serial twin) and 2
    threads (the parallel twin) compute the same partials in the same order."""
    old = nb._S.threads
    try:
        nb.set_num_threads(1)
        serial = _every_kernel_outputs(dtype)
        nb.set_num_threads(2)
        parallel = _every_kernel_outputs(dtype)
    finally:
        nb.set_num_threads(old)
    assert len(serial) == len(parallel) == 29
    for i, (s, p) in enumerate(zip(serial, parallel)):
        np.testing.assert_array_equal(s, p, err_msg=f"output {i}")


# ---------------------------------------------------------------- IEEE edge cases (issue 15)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_and_negative_eps_give_nan_not_exceptions(dtype):
    """error_model='numpy': 1/sqrt(0) = Inf, sqrt(<0) = NaN, as the other backends."""
    x = np.full((3, 16), 2.5, dtype)
    ones, zeros = np.ones(16, dtype), np.zeros(16, dtype)
    for eps in (0.0, -1.0):
        for rms in (False, True):
            out = np.empty_like(x)
            want = np.empty(x.shape)
            with np.errstate(all="ignore"):
                ref.rows_forward(x, ones, zeros, eps, rms, want)
            nb.rows_forward(x, ones, zeros, eps, rms, out)
            np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
        xg = np.full((2, 4, 10), 7.0, dtype)
        out = np.empty_like(xg)
        _, rstd = nb.channels_first_group_forward(xg, 2, np.ones(4, dtype),
                                                      np.zeros(4, dtype), eps, out)
        assert np.isnan(out).all()
        assert np.isinf(rstd).all() if eps == 0 else np.isnan(rstd).all()


def test_float32_near_max_stays_finite():
    """3e38 mixed with -3e38: x - mean would overflow float32; computed in float64 it
    does not, and the normalized values (about +-1.22) are representable."""
    x = np.tile(np.array([3e38, -3e38, 3e38, 3e38], np.float32), (2, 4))
    ones, zeros = np.ones(16, np.float32), np.zeros(16, np.float32)
    out = np.empty_like(x)
    want = np.empty(x.shape)
    ref.rows_forward(x, ones, zeros, 1e-5, False, want)
    nb.rows_forward(x, ones, zeros, 1e-5, False, out)
    assert np.isfinite(want).all() and np.isfinite(out).all()
    C.assert_within(out, want, C.bound_normalized(x, 1, 1e-5, ones, zeros, np.float32),
                    "rows_forward near the float32 maximum")
    x3 = x.reshape(2, 2, 8)
    mean, m2 = nb.plane_moments(x3.reshape(4, 8))
    shift = mean.reshape(2, 2).astype(np.float32)
    scale = (1 / np.sqrt(m2.reshape(2, 2) / 8)).astype(np.float32)
    out3 = np.empty_like(x3)
    nb.channels_first_affine(x3, shift, scale, np.zeros((2, 2), np.float32), out3)
    assert np.isfinite(out3).all()
    # a few float32 operations on (x - shift) * scale, whose float64 value is ``want``;
    # the statistics' own error (float64, 8 values) is far below that
    C.assert_within(out3, want.reshape(2, 2, 8),
                    C.bound_elementwise(np.float32, want.reshape(2, 2, 8)), "affine near max")


# ---------------------------------------------------------------- float16 / bfloat16 (issue 13)
from normkit.backends import numba_convert as conv  # noqa: E402

BF16 = C.np_dtype("bfloat16")


def _dense_float32_bits():
    """float32 bit patterns covering every rounding case of both 16-bit narrowings:
    each float16 tie / neighbour (all 2**19 sign+exponent+10-bit prefixes with the 13
    dropped bits at 0, 1, just below / at / above the half-way point, all ones),
    each bfloat16 one (all 2**16 prefixes, 16 dropped bits likewise), and every
    1021st pattern of the whole range (subnormals, overflow, Inf, NaN payloads)."""
    u = np.uint32
    f16 = (np.arange(1 << 19, dtype=u)[:, None] << u(13)) | np.array(
        [0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF], u)
    bf16 = (np.arange(1 << 16, dtype=u)[:, None] << u(16)) | np.array(
        [0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], u)
    stride = np.arange(0, 1 << 32, 1021, dtype=np.uint64).astype(u)
    return np.concatenate([f16.ravel(), bf16.ravel(), stride]).view(np.float32)


def test_narrowing_equals_numpy_and_ml_dtypes_bit_for_bit():
    f = _dense_float32_bits()
    got = np.empty(f.size, np.int16)
    conv.convert(f, got)
    with np.errstate(over="ignore", invalid="ignore"):
        want = f.astype(np.float16).view(np.int16)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [hex(b) for b in f.view(np.uint32)[bad[:5]]]
    got = np.empty(f.size, np.uint16)
    conv.convert(f, got)
    with np.errstate(over="ignore", invalid="ignore"):
        want = f.astype(BF16).view(np.uint16)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [hex(b) for b in f.view(np.uint32)[bad[:5]]]


def test_widening_exact_for_every_16_bit_pattern():
    """Both float16 paths (software, and F16C where the host has it) and bfloat16. F16C
    quiets a signalling NaN, so there NaN patterns must only stay NaN."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    got = np.empty(bits.size, np.float32)
    conv.widen_f16_software(bits.view(np.int16), got)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    conv.convert(bits.view(np.int16), got)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    conv.convert(bits, got)
    np.testing.assert_array_equal(got.view(np.uint32),
                                  bits.view(BF16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("par", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("n", C.ODD_SIZES)
def test_16_bit_identity_affine_round_trips_and_narrows_once(dtype, par, n):
    """(x - 0) * 1 + 0 is x (NaN, +-Inf, subnormals included), out of place and
    in place; x * 1000 narrows once (float16 overflows to Inf, as NumPy's cast)."""
    old, nb._S.par_min = nb._S.par_min, (1 if par else 1 << 62)
    try:
        zeros, ones = np.zeros((1, 3), np.float32), np.ones((1, 3), np.float32)
        for layout, shape in (("first", (2, 3, n)), ("last", (2, n, 3))):
            bits = np.random.default_rng(n).integers(0, 1 << 16, shape, dtype=np.uint16)
            x = bits.view(dtype)
            affine = getattr(nb, f"channels_{layout}_affine")
            out = np.empty_like(x)
            affine(x, zeros, ones, zeros, out)
            # equal values (-0 + +0 offset is +0) and NaN where x is NaN
            xf, of = x.astype(np.float32), out.astype(np.float32)
            assert ((of == xf) | (np.isnan(xf) & np.isnan(of))).all()
            keep = (xf != 0) & ~np.isnan(xf)              # and the same bits elsewhere
            np.testing.assert_array_equal(out.view(np.uint16)[keep], bits[keep])
            inplace = x.copy()
            affine(inplace, zeros, ones, zeros, inplace)
            np.testing.assert_array_equal(inplace.view(np.uint16), out.view(np.uint16))
            big = np.full(shape, 100.0, np.float32)
            scale = np.full((1, 3), 1000.0, np.float32)
            affine(big.astype(dtype), zeros, scale, zeros, out)
            with np.errstate(over="ignore"):
                want = (big * scale[0, 0]).astype(dtype)
            np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))
    finally:
        nb._S.par_min = old


def test_16_bit_rows_forward_against_float64_reference():
    """One call per 16-bit dtype, serial and parallel: statistics accumulate like float32
    (float64 sums of exactly widened values), output within the float32 bound plus one
    final rounding to the 16-bit dtype."""
    for dtype in (np.float16, BF16):
        x = C.make((300, 1023), dtype, "normal", seed=4)
        w, b = (C.make(1023, np.float32, "normal", seed=s) for s in (5, 6))
        want = np.empty(x.shape)
        rmean, rrstd = ref.rows_forward(x, w, b, 1e-5, False, want)
        for par_min in (1, 1 << 62):
            old, nb._S.par_min = nb._S.par_min, par_min
            try:
                out = np.empty_like(x)
                mean, rstd = nb.rows_forward(x, w, b, 1e-5, False, out)
            finally:
                nb._S.par_min = old
            C.assert_within(mean, rmean, C.bound_mean(x, 1), "16-bit mean")
            C.assert_within(rstd, rrstd, C.bound_rstd(x, 1, 1e-5), "16-bit rstd")
            # final narrowing: u of the 16-bit dtype, relative (plus half the smallest
            # float16 subnormal spacing, 2**-25, absolute)
            narrowing = C.unit_roundoff(dtype) * np.abs(want) * (1 + 2 ** -10) + 2.0 ** -25
            bound = C.bound_normalized(x, 1, 1e-5, w, b, np.float32) + narrowing
            C.assert_within(out, want, bound, f"16-bit rows_forward {np.dtype(dtype).name}")


def test_16_bit_data_with_wrong_parameter_dtype_names_the_argument():
    x, p, r = np.ones((2, 3, 4), np.float16), np.ones((1, 3), np.float32), np.ones((2, 8), BF16)
    with pytest.raises(TypeError, match=r"'shift'.*float32.*float16 data, got .*float64"):
        nb.channels_first_affine(x, p.astype(np.float64), p, p, np.empty_like(x))
    with pytest.raises(TypeError, match=r"'out'.*bfloat16.*got .*float16"):
        nb.channels_first_affine(x.astype(BF16), p, p, p, np.empty_like(x))
    with pytest.raises(TypeError, match=r"'weight'.*float32.*got .*bfloat16"):
        nb.rows_forward(r, r[0], r[0].astype(np.float32), 1e-5, False, np.empty_like(r))
    with pytest.raises(TypeError, match=r"'x'.*float32, float64, float16 or bfloat16.*int32"):
        nb.plane_moments(np.ones((2, 8), np.int32))
