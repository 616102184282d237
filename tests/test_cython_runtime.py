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

import _bounds_extra as BX
import _cases as K
import ml_dtypes
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
BF16 = ml_dtypes.bfloat16
DTYPES = [np.float32, np.float64, np.float16, BF16]
HALF = [np.float16, BF16]


def _param_dtype(dtype):
    """The kernels' parameter dtype for data of `dtype` (normkit/backends/_spec.py)."""
    return np.float64 if dtype == np.float64 else np.float32


def _inputs(dtype, seed=0, n=3, c=5, s=2500, rows=40, k=777):
    rng = np.random.default_rng(seed)

    def arr(*shape, loc=0.5, dt=dtype):
        a = (rng.standard_normal(shape) * 2 + loc).astype(dt)
        a.setflags(write=False)
        return a

    def par(*shape):
        return arr(*shape, dt=_param_dtype(dtype))
    d = dict(
        x3=arr(n, c, s, loc=100.0), dy3=arr(n, c, s),
        # channels-last with N == 1 and a long S: the BatchNorm NHWC statistics split
        x3l=arr(1, 9000, c, loc=100.0), dy3l=arr(1, 9000, c),
        x2=arr(rows, k), dy2=arr(rows, k), w=par(k), b=par(k),
        p1=par(1, c), p2=par(1, c), p3=par(1, c), p4=par(1, c),
        pn=par(n, c), long=arr(2, 70000),
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
    # training BatchNorm: one task per channel
    x = d["x3"]
    y = np.empty_like(x)
    out += be.channels_first_batch_forward(x, w[:x.shape[1]], b[:x.shape[1]], 1e-5, y)
    out.append(y)
    return out


def _bounds_all(d, dtype, eps=1e-5):
    """Error bounds of _run_all's outputs against the NumPy reference, in its order: the
    case table's bound of each kernel on these inputs (tests/_cases.py: reduction
    lengths up to 70000, unit roundoff of the dtype, the data's conditioning -- x3 is
    N(100, 2^2)), as tests/test_kernels.py states them kernel by kernel."""
    b = []
    for x in (d["x2"], d["long"], d["x3l"], d["x3"]):            # mean, M2
        b += [K.bound_mean(x, 1), K.bound_m2(x, 1)]
    x2, w = d["x2"], d["w"]
    for rms in (False, True):
        b += [0.0 if rms else K.bound_mean(x2, 1), K.bound_rstd(x2, 1, eps, rms),
              K.bound_normalized(x2, 1, eps, w, None if rms else d["b"], dtype, rms)]
        b += BX.bound_rows_backward(d["dy2"], x2, d["mean"], d["rstd"], w, rms, dtype)
    for x, dy, last in ((d["x3"], d["dy3"], False), (d["x3l"], d["dy3l"], True)):
        axis = 1 if last else 2
        put = (lambda p: _f64(p)[:, None, :]) if last else (lambda p: _f64(p)[:, :, None])
        dy64 = _f64(dy)
        for params in ((d["p1"], d["p2"], d["p3"], d["p4"]), (d["pn"],) * 4):
            if last and params[0].shape[0] != 1:
                continue
            shift, p1, p2, p3 = map(put, params)
            xc = _f64(x) - shift
            b.append(K.bound_elementwise(dtype, xc * p1, p2))                 # affine
            b += [K.bound_sum(np.abs(dy64).sum(axis=axis), x.shape[axis], dtype),
                  K.bound_sum(np.abs(dy64 * xc).sum(axis=axis), x.shape[axis], dtype)]
            b.append(K.bound_elementwise(dtype, p1 * dy64, p2 * xc, p3))      # grad_apply
            b += [K.bound_elementwise(dtype, xc * p1, p2, res) for res in (0.0, dy, dy)]
    for x, g in ((d["x3"], 5), (d["x3"], 1), (d["long"].reshape(2, 1, 70000), 1)):
        n, c, s = x.shape
        w, bias = (_f64(d[k][:c]).reshape(1, g, c // g, 1) for k in ("w", "b"))
        blocks = x.reshape(n * g, -1)
        b += [K.bound_mean(blocks, 1).reshape(n, g), K.bound_rstd(blocks, 1, eps).reshape(n, g),
              K.bound_normalized(x.reshape(n, g, c // g, s), (2, 3), eps, w, bias,
                                 dtype).reshape(x.shape)]
    x = d["x3"]
    n, c, s = x.shape
    channels = np.moveaxis(x, 1, 0).reshape(c, n * s)
    w, bias = (_f64(d[k][:c]).reshape(1, c, 1) for k in ("w", "b"))
    b += [K.bound_mean(channels, 1), K.bound_m2(channels, 1),
          K.bound_normalized(x, (0, 2), eps, w, bias, dtype)]
    return b


def _f64(a):
    return np.asarray(a, np.float64)


def _assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(_f64(u), _f64(v))


def _assert_close(got, want, d, dtype, what=""):
    """Each output of _run_all within its bound (_bounds_all). The reference rounds its
    float32 outputs to float32 too: one more u32 of them (16-bit: in ``narrowing``)."""
    bounds = _bounds_all(d, dtype)
    for i, (g, w, b) in enumerate(zip(got, want, bounds, strict=True)):
        if g.dtype == np.float32 and dtype == np.float32:
            b = b + K.unit_roundoff(np.float32) * np.abs(_f64(w))
        K.assert_within(g, w, b, f"output {i}, {np.dtype(dtype).name} {what}")


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
@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_thread_count(parallel_everywhere, dtype):
    d = _inputs(dtype)
    cy.set_num_threads(1)
    serial = _run_all(cy, d)
    for n in (2, 3):
        cy.set_num_threads(n)
        _assert_same(_run_all(cy, d), serial)


@needs_cython
@pytest.mark.parametrize("dtype", DTYPES)
def test_parallel_paths_match_reference(parallel_everywhere, dtype):
    cy.set_num_threads(2)
    d = _inputs(dtype, seed=1)
    _assert_close(_run_all(cy, d), _run_all(ref, d), d, dtype)


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
    for (m, m2), y in zip(res, [x, x * 2, x + 1]):
        rm, rm2 = ref.plane_moments(y)
        # the case table's bounds of a 4096-term float64 mean and M2 (tests/_cases.py)
        K.assert_within(m, rm, K.bound_mean(y, 1), "mean")
        K.assert_within(m2, rm2, K.bound_m2(y, 1), "M2")


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
    for dtype in t.DTYPES:
        d = t._inputs(dtype, seed=3)
        # tolerances: see _bounds_all
        t._assert_close(t._run_all(cy, d), t._run_all(ref, d), d, dtype)
    t._check_conversions(cy._ext)
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


# ---------------------------------------------------------------- 16-bit conversions
def _conversion_sample():
    """float32 bit patterns: every sign/exponent/top-7-mantissa-bit combination (all
    2**16 high halves, so every exponent incl. subnormals, Inf and NaN) with low halves
    that make the float16 and bfloat16 rounding ties (odd and even), the values just
    off them, and the extremes; plus 2**20 random patterns."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0x0000, 0x0001, 0x0fff, 0x1000, 0x1001, 0x1fff, 0x2000, 0x3000, 0x4000,
                    0x5000, 0x6000, 0x7000, 0x7fff, 0x8000, 0x8001, 0x9000, 0xb000, 0xd000,
                    0xf000, 0xffff], np.uint32)
    rand = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint64)
    return np.concatenate([(high[:, None] | low).ravel(), rand.astype(np.uint32)])


def _check_conversions(ext):
    """The kernels' narrowing is NumPy's float32 -> float16 cast and ml_dtypes'
    float32 -> bfloat16 cast bit for bit (round to nearest even, NaN kept, float16
    overflow to Inf); widening every 16-bit pattern is exact, bit for bit."""
    f = _conversion_sample().view(np.float32)
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for row, dtype in (("f16", np.float16), ("bf16", BF16)):
        with np.errstate(over="ignore", invalid="ignore"):
            want = f.astype(dtype).view(np.uint16)
        got = ext._convert(row, f, True)
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, (row, [hex(v) for v in f.view(np.uint32)[bad[:5]]],
                               [hex(v) for v in got[bad[:5]]], [hex(v) for v in want[bad[:5]]])
        wide = ext._convert(row, every, False).view(np.uint32)
        np.testing.assert_array_equal(wide, every.view(dtype).astype(np.float32).view(np.uint32))
        # the block conversions of the elementwise passes (F16C in the AVX2/AVX-512
        # builds): the same bits, except that hardware quiets a signalling NaN, which
        # arithmetic never hands them (NaN stays NaN either way)
        u = f.view(np.uint32)
        snan = ((u & 0x7f800000) == 0x7f800000) & ((u & 0x7fffff) != 0) & ((u & 0x400000) == 0)
        got = ext._convert(row, f, True, True)
        np.testing.assert_array_equal(got[~snan], want[~snan])
        assert np.isnan(got[snan].view(dtype).astype(np.float32)).all()
        wide = ext._convert(row, every, False, True)
        exact = every.view(dtype).astype(np.float32)
        nan = np.isnan(exact)
        np.testing.assert_array_equal(wide.view(np.uint32)[~nan], exact.view(np.uint32)[~nan])
        assert np.isnan(wide[nan]).all()


@needs_cython
def test_half_conversions_are_numpy_casts():
    _check_conversions(cy._ext)


@needs_cython
@pytest.mark.parametrize("dtype", HALF)
def test_half_special_values(dtype):
    """NaN stays NaN, Inf propagates, float16 overflow gives Inf, and an in-place call
    works, on the 16-bit paths."""
    x = np.array([[1.0, np.nan, 3.0, np.inf, -2.0, 0.5, 7.0]], np.float32).astype(dtype)
    w, b = np.ones(7, np.float32), np.zeros(7, np.float32)
    out = np.empty_like(x)
    cy.rows_forward(x, w, b, 1e-5, False, out)
    assert np.isnan(_f64(out)).all()                 # NaN in a row: the whole row is NaN
    x3 = np.array([[[60000.0, -60000.0, 1.0, np.nan, -np.inf]]], np.float32).astype(dtype)
    p = [np.zeros((1, 1), np.float32), np.full((1, 1), 2.0, np.float32),
         np.zeros((1, 1), np.float32)]
    y = np.empty_like(x3)
    cy.channels_first_affine(x3, *p, y)
    with np.errstate(over="ignore"):
        want = (_f64(x3) * 2).astype(np.float32).astype(dtype)     # 120000: Inf in float16
    np.testing.assert_array_equal(_f64(y), _f64(want))
    cy.channels_first_affine(x3.copy(), *p, x3)                # in place
    np.testing.assert_array_equal(_f64(x3), _f64(want))


@needs_cython
@pytest.mark.parametrize("dtype", HALF)
def test_half_argument_errors_name_the_argument(dtype):
    name = np.dtype(dtype).name
    x = np.ones((4, 8), dtype)
    w16 = np.ones(8, dtype)
    f32 = np.ones(8, np.float32)
    with pytest.raises(TypeError, match=f"weight must be float32 .*{name} data.* got {name}"):
        cy.rows_forward(x, w16, f32, 1e-5, False, np.empty_like(x))
    with pytest.raises(TypeError, match=f"out must be {name}"):
        cy.rows_forward(x, f32, f32, 1e-5, False, np.empty((4, 8), np.float32))
    with pytest.raises(TypeError, match="x must be float32 or float64 or float16 or bfloat16"):
        cy.plane_moments(np.ones((4, 8), np.int16))
    x3 = np.ones((2, 3, 5), dtype)
    p64 = np.ones((1, 3))
    with pytest.raises(TypeError, match=f"shift must be float32 .*{name} data.* got float64"):
        cy.channels_first_affine(x3, p64, p64, p64, np.empty_like(x3))
    if dtype == np.float16:
        with pytest.raises(TypeError, match="native byte order"):
            cy.plane_moments(x.astype(">f2"))


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
