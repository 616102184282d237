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
    np.testing.assert_allclose(outs[0], rm, rtol=1e-12)
    np.testing.assert_allclose(outs[1], rq, rtol=1e-9)
    cm, cq = ref.channels_last_moments(d["nhwc"])
    np.testing.assert_allclose(outs[2], cm, rtol=1e-12)
    np.testing.assert_allclose(outs[3], cq, rtol=1e-9)


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
        # the child may run the serial twins (different chunking): equal to rounding
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
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
            ok = all(np.allclose(g, e, rtol=1e-5, atol=1e-5) for g, e in zip(got, expected))
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
    assert ours <= max(theirs, 1e-9), (ours, theirs)

    # LayerNorm output on the same hard rows
    w = np.ones(shape[1], np.float32)
    b = np.zeros(shape[1], np.float32)
    out = np.empty_like(x)
    nb.rows_forward(x, w, b, 1e-5, False, out)
    exact = np.empty(shape)
    ref.rows_forward(x, w, b, 1e-5, False, exact)
    tout = torch.nn.functional.layer_norm(torch.from_numpy(x), (shape[1],), eps=1e-5).numpy()
    assert np.abs(out - exact).max() <= max(np.abs(tout - exact).max(), 1e-6)


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
        for key, fn in nb._dispatchers.items():
            s = fn.stats
            stats[key[0] + ("_par" if key[2] else "_ser")] = [sum(s.cache_hits.values()),
                                                               sum(s.cache_misses.values())]
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
    """The fused GroupNorm forward: one item per block gives bit-identical results on
    1 and on all threads; a single huge block (split across threads, partials merged
    with Chan's formula) agrees to rounding."""
    rng = np.random.default_rng(6)
    old = nb._S.threads
    try:
        for shape, g, exact in (((8, 64, 3136), 32, True), ((1, 2, 300000), 1, False)):
            x = (rng.standard_normal(shape) * 2 + 1e3).astype(np.float32)
            w = rng.standard_normal(shape[1]).astype(np.float32)
            res = []
            for n in (1, nb._MAX_THREADS):
                nb.set_num_threads(n)
                out = np.empty_like(x)
                res.append(list(nb.channels_first_group_forward(x, g, w, w, 1e-5, out)) + [out])
            for a, b in zip(*res):
                if exact:
                    np.testing.assert_array_equal(a, b)
                else:
                    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    finally:
        nb.set_num_threads(old)


# ---------------------------------------------------------------- thread-count independence
def _every_kernel_outputs(dtype):
    """Every kernel on inputs big enough for the parallel twin (and for split pieces)."""
    rng = np.random.default_rng(11)

    def a(*shape):
        return (rng.standard_normal(shape) * 2 + 1e3).astype(dtype)

    planes, nchw, nhwc = a(6, 200000), a(4, 16, 9000), a(2, 9000, 16)
    rows, w, p = a(700, 384), a(384), [a(1, 16) for _ in range(4)]
    outs = list(nb.plane_moments(planes)) + list(nb.channels_last_moments(nhwc))
    y = np.empty_like(rows)
    mean, rstd = nb.rows_forward(rows, w, w, 1e-5, False, y)
    dx = np.empty_like(rows)
    outs += [y, mean, rstd, dx, *nb.rows_backward(rows, rows, mean, rstd, w, False, dx)]
    for layout, x in (("first", nchw), ("last", nhwc)):
        o1, o2, o3 = (np.empty_like(x) for _ in range(3))
        getattr(nb, f"channels_{layout}_affine")(x, *p[:3], o1)
        getattr(nb, f"channels_{layout}_affine_act")(x, *p[:3], x, True, o2)
        getattr(nb, f"channels_{layout}_grad_apply")(x, x, *p, o3)
        outs += [o1, o2, o3, *getattr(nb, f"channels_{layout}_grad_sums")(x, x, p[0])]
    for shape, g in (((8, 64, 3136), 32), ((1, 2, 300000), 1)):
        x = a(*shape)
        out = np.empty_like(x)
        outs += [out, *nb.channels_first_group_forward(x, g, a(shape[1]), a(shape[1]),
                                                       1e-5, out)]
    return outs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
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
    assert len(serial) == len(parallel) == 26
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
    # one float32 rounding of a value |v| < 2 on top of float64 work: 2**-23 relative
    np.testing.assert_allclose(out, want, rtol=2.0 ** -22, atol=0)
    x3 = x.reshape(2, 2, 8)
    mean, m2 = nb.plane_moments(x3.reshape(4, 8))
    shift = mean.reshape(2, 2).astype(np.float32)
    scale = (1 / np.sqrt(m2.reshape(2, 2) / 8)).astype(np.float32)
    out3 = np.empty_like(x3)
    nb.channels_first_affine(x3, shift, scale, np.zeros((2, 2), np.float32), out3)
    assert np.isfinite(out3).all()
    np.testing.assert_allclose(out3, want.reshape(2, 2, 8), rtol=1e-6)
