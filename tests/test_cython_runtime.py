"""The Cython backend's runtime: threads, fork, build record, argument checks, and what
happens when the extension is missing.

tests/test_kernels.py checks every kernel's numbers against the NumPy reference; this
file checks what that cannot: the OpenMP paths (forced on small inputs), results that
do not depend on the thread count, many Python threads at once, a child process forked
after a parallel region (libgomp can hang there), and the error a user sees when the
extension was never built.
"""
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import normkit
from normkit.backends import numpy_ref as ref
from normkit.backends import resolve

try:
    from normkit.backends import cython_backend as cy
except ImportError:
    cy = None

needs_cython = pytest.mark.skipif(cy is None, reason="the Cython extension is not built")
needs_openmp = pytest.mark.skipif(cy is None or not cy.info()["openmp"],
                                  reason="the Cython extension was built without OpenMP")
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")


@pytest.fixture
def parallel_everywhere():
    """Send every call through the OpenMP path, however small; restore afterwards."""
    old_min = cy._ext._set_parallel_min(0)
    old_threads = cy.get_num_threads()
    yield
    cy._ext._set_parallel_min(old_min)
    cy.set_num_threads(old_threads)


# ---------------------------------------------------------------- one call of everything
def _inputs(dtype, seed=0, n=3, c=5, s=2500, rows=40, k=777):
    rng = np.random.default_rng(seed)

    def arr(*shape, loc=0.5):
        a = (rng.standard_normal(shape) * 2 + loc).astype(dtype)
        a.setflags(write=False)
        return a
    d = dict(
        x3=arr(n, c, s, loc=100.0), dy3=arr(n, c, s),
        # channels-last with N == 1 and a long S: the BatchNorm NHWC statistics split
        x3l=arr(1, 9000, c, loc=100.0), dy3l=arr(1, 9000, c),
        x2=arr(rows, k), dy2=arr(rows, k), w=arr(k), b=arr(k),
        p1=arr(1, c), p2=arr(1, c), p3=arr(1, c), p4=arr(1, c),
        pn=arr(n, c), long=arr(2, 70000),
    )
    mean, rstd = ref.rows_forward(d["x2"], d["w"], d["b"], 1e-5, False, np.empty((rows, k)))
    d["mean"], d["rstd"] = mean, rstd
    return d


def _run_all(be, d):
    """Every kernel once (parallel-splittable shapes); returns all outputs."""
    out = []
    out += be.plane_moments(d["x2"])
    out += be.plane_moments(d["long"])
    out += be.channels_last_moments(d["x3l"])
    out += be.channels_last_moments(d["x3"])
    for rms in (False, True):
        y = np.empty_like(d["x2"])
        out += be.rows_forward(d["x2"], d["w"], d["b"], 1e-5, rms, y)
        out.append(y)
        dx = np.empty_like(d["x2"])
        out += be.rows_backward(d["dy2"], d["x2"], d["mean"], d["rstd"], d["w"], rms, dx)
        out.append(dx)
    for x, dy, fn in ((d["x3"], d["dy3"], "channels_first_"), (d["x3l"], d["dy3l"], "channels_last_")):
        for params in ((d["p1"], d["p2"], d["p3"], d["p4"]), (d["pn"],) * 4):
            if fn == "channels_last_" and params[0].shape[0] != 1:
                continue
            y = np.empty_like(x)
            getattr(be, fn + "affine")(x, params[0], params[1], params[2], y)
            out.append(y)
            out += getattr(be, fn + "grad_sums")(dy, x, params[0])
            dx = np.empty_like(x)
            getattr(be, fn + "grad_apply")(dy, x, *params, dx)
            out.append(dx)
            for res, relu in ((None, True), (dy, False), (dy, True)):
                y = np.empty_like(x)
                getattr(be, fn + "affine_act")(x, params[0], params[1], params[2], res, relu, y)
                out.append(y)
    # GroupNorm: many small blocks (one task each), and two long blocks (split into
    # units with merged statistics when several threads run): same numbers either way
    w, b = d["w"][:5], d["b"][:5]
    for x, groups in ((d["x3"], 5), (d["x3"], 1), (d["long"].reshape(2, 1, 70000), 1)):
        c = x.shape[1]
        y = np.empty_like(x)
        out += be.channels_first_group_forward(x, groups, w[:c], b[:c], 1e-5, y)
        out.append(y)
    return out


def _tolerance(dtype):
    """Bound for _run_all's outputs against the float64 reference. The data are
    N(0.5, 2) or N(100, 2) (_inputs); float32 outputs are rounded once to float32 after
    O(1) float32 operations on values up to ~110 (x - shift, * scale, + offset,
    + residual): a few ulp of 110 is ~3e-5 absolute, and the statistics are
    accumulated in double from float32 inputs (relative error ~1e-7 each, summed over
    <= 70000 values by blocks). 2e-4 leaves a 5x margin for FMA contraction or not.
    float64: the reductions run over n <= 70000 values with blockwise pairwise
    accumulation, error <= ~log2(n) * n_block * eps * sum|x| ~ 1e-11 relative;
    1e-9 covers it with and without FMA."""
    if dtype == np.float32:
        return dict(rtol=2e-4, atol=2e-4)
    return dict(rtol=1e-9, atol=1e-9)


def _assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


# ---------------------------------------------------------------- build record
@needs_cython
def test_build_info_reported():
    info = cy.info()
    assert isinstance(info["openmp"], bool)
    assert info["threads"] == cy.get_num_threads()
    flags = info["cflags"]
    assert flags, "the build flags were not recorded (built without normkit's setup.py?)"
    assert "-O3" in flags or "/O2" in flags
    assert not any(f in flags for f in ("-ffast-math", "-ffinite-math-only", "-Ofast"))
    if info["openmp"]:
        assert any("openmp" in f for f in flags)
    else:
        assert "note" in info
    assert info["simd"] in ("sse2", "avx", "avx2", "avx512", "neon", "scalar")
    # the registry exposes the same module
    assert resolve("cython").info()["module"] == info["module"]


@needs_cython
def test_registry_passes_thread_count():
    old = normkit.get_num_threads()
    try:
        normkit.set_num_threads(3)
        assert cy.get_num_threads() == 3 and cy.info()["threads"] == 3
    finally:
        normkit.set_num_threads(old)


@needs_cython
@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_num_threads_rejects(bad):
    with pytest.raises(ValueError):
        cy.set_num_threads(bad)


# ---------------------------------------------------------------- threads
@needs_openmp
def test_set_num_threads_is_respected(parallel_everywhere):
    for n in (1, 2, 3):
        cy.set_num_threads(n)
        assert cy._ext._team_size(10**6) == n
    cy._ext._set_parallel_min(10**9)             # below the threshold: serial
    assert cy._ext._team_size(10**6) == 1


@needs_openmp
def test_set_num_threads_from_another_thread(parallel_everywhere):
    t = threading.Thread(target=cy.set_num_threads, args=(3,))
    t.start()
    t.join()
    assert cy._ext._team_size(10**6) == 3


@needs_cython
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_results_do_not_depend_on_thread_count(parallel_everywhere, dtype):
    d = _inputs(dtype)
    cy.set_num_threads(1)
    serial = _run_all(cy, d)
    for n in (2, 3):
        cy.set_num_threads(n)
        _assert_same(_run_all(cy, d), serial)


@needs_cython
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parallel_paths_match_reference(parallel_everywhere, dtype):
    cy.set_num_threads(2)
    d = _inputs(dtype, seed=1)
    got = _run_all(cy, d)
    want = _run_all(ref, d)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **_tolerance(dtype))


@needs_cython
def test_eight_python_threads(parallel_everywhere):
    cy.set_num_threads(2)
    data = [_inputs(np.float32 if i % 2 else np.float64, seed=i) for i in range(8)]
    expected = [_run_all(cy, d) for d in data]
    results, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def work(i):
        try:
            barrier.wait()
            for _ in range(3):
                results[i] = _run_all(cy, data[i])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert not errors, errors
    for got, want in zip(results, expected):
        _assert_same(got, want)


# ---------------------------------------------------------------- fork
def _child_status(pid, timeout):
    """Wait for a forked child; kill it and fail if it does not finish in time."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child hung for {timeout} s (libgomp after fork?)")


@needs_fork
@needs_openmp
def test_fork_after_parallel_region(parallel_everywhere):
    cy.set_num_threads(2)
    d = _inputs(np.float32)
    assert cy._ext._team_size(10**6) == 2      # a parallel region ran in this process
    expected = _run_all(cy, d)
    pid = os.fork()
    if pid == 0:                                # child: must not hang, must be right
        code = 1
        try:
            got = _run_all(cy, d)
            _assert_same(got, expected)
            info = cy.info()
            code = 0 if info["serial_after_fork"] and "note" in info else 2
        finally:
            os._exit(code)
    assert _child_status(pid, timeout=120) == 0
    assert not cy.info()["serial_after_fork"]   # the parent keeps its threads
    assert cy._ext._team_size(10**6) == 2


@needs_fork
@needs_openmp
def test_multiprocessing_fork_pool(parallel_everywhere):
    cy.set_num_threads(2)
    cy._ext._team_size(10**6)
    x = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        res = pool.map_async(cy.plane_moments, [x, x * 2, x + 1]).get(timeout=120)
    for (m, v), y in zip(res, [x, x * 2, x + 1]):
        rm, rv = ref.plane_moments(y)
        np.testing.assert_allclose(m, rm, rtol=1e-12, atol=1e-12)


@needs_fork
@needs_openmp
def test_fork_before_any_parallel_region_keeps_threads():
    # fresh interpreter: no OpenMP region before the fork, so the child may use threads
    code = textwrap.dedent("""
        import os, sys
        from normkit.backends import cython_backend as cy
        cy.set_num_threads(2)
        cy._ext._set_parallel_min(0)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if cy._ext._team_size(10**6) == 2 and not cy.info()["serial_after_fork"] else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    proc = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- argument checks
@needs_cython
def test_bad_arguments_raise_not_crash():
    x = np.ones((4, 8), np.float32)
    w, b, out = np.ones(8, np.float32), np.zeros(8, np.float32), np.empty((4, 8), np.float32)
    with pytest.raises(TypeError):
        cy.rows_forward(x, w.astype(np.float64), b, 1e-5, False, out)      # mixed dtypes
    with pytest.raises(TypeError):
        cy.plane_moments(x.astype(np.int32))
    with pytest.raises(TypeError):
        cy.plane_moments(x.tolist())
    with pytest.raises(ValueError):
        cy.plane_moments(np.ones((8, 4), np.float32).T)                     # not C-contiguous
    with pytest.raises(TypeError):
        cy.plane_moments(x.astype(">f4"))                                   # byte-swapped
    with pytest.raises(ValueError):
        cy.rows_forward(x, np.ones(7, np.float32), b, 1e-5, False, out)     # wrong length
    ro = np.empty_like(x)
    ro.setflags(write=False)
    with pytest.raises(ValueError):
        cy.rows_forward(x, w, b, 1e-5, False, ro)                           # read-only out
    x3 = np.ones((2, 3, 5), np.float32)
    p = np.ones((1, 3), np.float32)
    with pytest.raises(ValueError):
        cy.channels_first_affine(x3, np.ones((2, 4), np.float32), p, p, np.empty_like(x3))
    with pytest.raises(ValueError):
        cy.channels_first_affine(x3, np.ones((3, 3), np.float32), np.ones((3, 3), np.float32),
                                 np.ones((3, 3), np.float32), np.empty_like(x3))   # N' not 1 or N
    with pytest.raises(ValueError):
        cy.channels_last_grad_sums(x3, x3[:1], p)
    # empty arrays (the public layer handles them first): an error, never a crash
    for shape in [(0, 5), (3, 0)]:
        with pytest.raises(ValueError):
            cy.plane_moments(np.ones(shape, np.float32))
    for shape in [(2, 0, 3), (2, 3, 0), (0, 3, 3)]:
        e = np.ones(shape, np.float32)
        with pytest.raises(ValueError):
            cy.channels_last_moments(e)
        with pytest.raises(ValueError):
            cy.channels_last_grad_sums(e, e, np.ones((1, shape[2]), np.float32))
        with pytest.raises(ValueError):
            cy.channels_first_grad_sums(e, e, np.ones((1, shape[1]), np.float32))
        q = np.ones((1, shape[1]), np.float32)
        cy.channels_first_affine(e, q, q, q, np.empty_like(e))
        cy.channels_first_grad_apply(e, e, q, q, q, q, np.empty_like(e))
    e = np.ones((4, 0), np.float32)
    with pytest.raises(ValueError):
        cy.rows_forward(e, np.ones(0, np.float32), np.ones(0, np.float32), 1e-5, False, e.copy())
    with pytest.raises(ValueError):
        cy.rows_backward(e, e, np.zeros(4), np.ones(4), np.ones(0, np.float32), False, e.copy())


@needs_cython
def test_inputs_not_modified_and_in_place():
    d = _inputs(np.float32)
    x = np.array(d["x2"])
    before = x.copy()
    y = np.empty_like(x)
    cy.rows_forward(x, d["w"], d["b"], 1e-5, False, y)
    np.testing.assert_array_equal(x, before)
    cy.rows_forward(x, d["w"], d["b"], 1e-5, False, x)                     # out is x
    np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- the SIMD builds
# Only the baseline module may be imported here: an AVX2 or AVX-512 build can execute
# its instructions while it is being imported (module init runs compiled code), which
# kills the process with SIGILL on a CPU without them. So the CPU check asks the
# baseline module (`_cpu_simd_level()`), the build files are looked up without
# importing them, and each level runs in its own subprocess with
# NORMKIT_CYTHON_SIMD capping the choice.
SIMD_LEVELS = ("baseline", "avx2", "avx512")


def _build_name(level):
    return "normkit.backends._cython_kernels" + ("" if level == "baseline" else "_" + level)


def _built(level):
    import importlib.util
    return importlib.util.find_spec(_build_name(level)) is not None


def _runnable_levels():
    """The SIMD levels this CPU can run and this install has a build for."""
    cpu = cy._ext._cpu_simd_level() if cy is not None else -1
    return [lvl for i, lvl in enumerate(SIMD_LEVELS) if i <= cpu and _built(lvl)]


# The child checks every kernel of the build it loaded against the NumPy reference
# with this file's own _inputs/_run_all (not tests/test_kernels.py), so it does not
# depend on another test module's internals.
_LEVEL_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import test_cython_runtime as t
    from normkit.backends import cython_backend as cy
    from normkit.backends import numpy_ref as ref
    assert cy.info()["module"] == sys.argv[2], (cy.info()["module"], sys.argv[2])
    cy._ext._set_parallel_min(0)
    cy.set_num_threads(2)
    for dtype in (np.float32, np.float64):
        d = t._inputs(dtype, seed=3)
        # tolerances: see test_parallel_paths_match_reference
        tol = t._tolerance(dtype)
        for i, (g, w) in enumerate(zip(t._run_all(cy, d), t._run_all(ref, d))):
            np.testing.assert_allclose(g, w, **tol, err_msg=f"output {i}, {dtype.__name__}")
    print("ok", cy.info()["module"], cy.info()["simd"])
""")


@needs_cython
@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_simd_level_matches_reference(level):
    """Each SIMD build this CPU runs, loaded through the backend with the level capped,
    is the module expected for that level and gives the reference numbers."""
    cpu = cy._ext._cpu_simd_level()
    if SIMD_LEVELS.index(level) > cpu:
        pytest.skip(f"this CPU runs SIMD levels up to {SIMD_LEVELS[cpu]}, not {level}")
    if not _built(level):
        pytest.skip(f"the {level} build was not compiled (non-x86 host or NORMKIT_NATIVE=1)")
    env = dict(os.environ, NORMKIT_CYTHON_SIMD=level, NUMBA_DISABLE_JIT="1")
    proc = subprocess.run(
        [sys.executable, "-c", _LEVEL_CHILD, os.path.dirname(__file__), _build_name(level)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ok {_build_name(level)}" in proc.stdout


@needs_cython
def test_picks_the_best_build():
    if os.environ.get("NORMKIT_CYTHON_SIMD", "auto") != "auto":
        pytest.skip("NORMKIT_CYTHON_SIMD caps the choice")
    levels = _runnable_levels()
    assert levels[0] == "baseline"
    assert cy.info()["module"] == _build_name(levels[-1])


# ---------------------------------------------------------------- extension missing
def test_missing_extension_leaves_normkit_working():
    code = textwrap.dedent("""
        import sys
        import numpy as np

        class NoExtension:                # as if setup.py never compiled the .pyx
            def find_spec(self, name, path=None, target=None):
                if name.startswith("normkit.backends._cython_kernels"):
                    raise ImportError(f"simulated: {name} was not built")
                return None
        sys.meta_path.insert(0, NoExtension())

        import normkit
        from normkit.backends import resolve
        assert "cython" not in normkit.available_backends(), normkit.available_backends()
        assert "numpy" in normkit.available_backends()
        x = np.arange(12.0).reshape(3, 4)
        mean, m2 = resolve("numpy").plane_moments(x)
        assert np.allclose(mean, [1.5, 5.5, 9.5]) and np.allclose(m2, 5.0)
        auto = resolve("auto")
        assert auto.NAME != "cython"
        auto.plane_moments(x)
        try:
            normkit.set_backend("cython")
        except normkit.BackendUnavailableError as exc:
            print(exc)
        else:
            raise SystemExit("set_backend('cython') did not raise")
        try:
            with normkit.use_backend("cython"):
                pass
        except normkit.BackendUnavailableError:
            pass
        else:
            raise SystemExit("use_backend('cython') did not raise")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    msg = proc.stdout
    assert "cython" in msg and "not available" in msg
    assert "pip install -e ." in msg                  # says how to build it
    assert "Cython extension" in msg
